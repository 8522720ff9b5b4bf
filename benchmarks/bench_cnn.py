"""Local training speed of the 2D CNN: medfed's TorchModel.descend vs a bare torch loop, same run.

Workload: one site of N images (1 x S x S, S = 64 and 32), cnn2d with BatchNorm (channels
8, 16, 32), STEPS mini-batch SGD steps of 32 images with L2, as one federated round's local
work. Both sides do the same math: the full-data eval-mode loss at the start (the model
protocol returns it), then the same batches. medfed adds the parameter view's conversion
(numpy float64 in, out). Prints images per second of training for both and the ratio, and
the time per round of FedAvg over 3 sites through ``run_federated``. For scale, also the
bare loop's rate without the start loss (the eval pass over the site's N images).

Threads: the bare loop runs with torch's thread count (``--threads``); medfed's model computes
with its own ``threads`` option, given the same count for the like-for-like comparison. The
default model (``threads = 1``, the same numbers whatever the thread count) is reported beside,
so the price of reproducibility on this machine is ``medfed_images_per_s`` over
``medfed_threads_1_images_per_s``.

Run: python benchmarks/bench_cnn.py [--repeats 5] [--threads 0]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from medfed.client import LocalData, LocalTraining, local_sgd_update
from medfed.client.local import batch_indices
from medfed.client.optimizer import descend
from medfed.engine import FederatedAlgorithm, run_federated
from medfed.models.registry import make_model
from medfed.rng import KeyedRng
from medfed.server import apply_delta, chain, weighted_mean

N, BATCH, STEPS, LR, L2 = 256, 32, 20, 0.05, 1e-3
SITES = (256, 200, 150)


def make_site(size: int, n: int, seed: int = 0) -> LocalData:
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.float64)
    X = rng.normal(size=(n, 1, size, size)).astype(np.float32)
    X[y == 1, :, : size // 2] += 0.5
    return LocalData(f"site-{seed}", X, y)


def bare_round(net, params, site, batches, decayed, start_loss=True):
    """The same round without the framework: load, eval loss, SGD steps with L2 on weights."""
    X, y = torch.from_numpy(site.X), torch.from_numpy(site.y).float()
    loss0 = None
    with torch.no_grad():
        for name, t in net.state_dict(keep_vars=True).items():
            if name in params:
                t.copy_(params[name])
        if start_loss:
            net.eval()
            loss0 = F.binary_cross_entropy_with_logits(net(X), y).item()
    net.train()
    weights = dict(net.named_parameters())
    for rows in batches:
        idx = torch.from_numpy(rows)
        for p in weights.values():
            p.grad = None
        F.binary_cross_entropy_with_logits(net(X[idx]), y[idx]).backward()
        with torch.no_grad():
            for name, p in weights.items():
                g = p.grad.add(p, alpha=L2) if name in decayed else p.grad
                p.add_(g, alpha=-LR)
    return loss0


def local_training(size: int, repeats: int) -> dict:
    # the bare loop does not recompute BatchNorm statistics after its steps, so the like-for-like
    # comparison turns medfed's recalibration off; the default (with it) is reported beside
    threads = torch.get_num_threads()
    model = make_model("cnn2d", (1, size, size), recalibrate=False, threads=threads)
    default_model = make_model("cnn2d", (1, size, size), threads=threads)
    one_thread_model = make_model("cnn2d", (1, size, size), recalibrate=False)
    site = make_site(size, N)
    params = model.init_params((1, size, size), KeyedRng(0))
    batches = list(batch_indices(N, BATCH, STEPS, KeyedRng(1)))
    net = model.network((1, size, size))
    torch_params = {k: torch.from_numpy(v).float() for k, v in params.items()}
    decayed = {k for k in params if k.endswith(".weight") and ".norm." not in k and not k.startswith("norm.")}

    def ours():
        descend(model, params, site.X, site.y, batches, LR, L2)

    def ours_default():
        descend(default_model, params, site.X, site.y, batches, LR, L2)

    def ours_one_thread():
        descend(one_thread_model, params, site.X, site.y, batches, LR, L2)

    def bare():
        bare_round(net, torch_params, site, batches, decayed)

    def bare_steps_only():
        bare_round(net, torch_params, site, batches, decayed, start_loss=False)

    ours(), ours_default(), ours_one_thread(), bare()  # warm up (first-call allocations)
    t_ours, t_default, t_one, t_bare, t_steps = [], [], [], [], []
    runs = ((ours, t_ours), (ours_default, t_default), (ours_one_thread, t_one), (bare, t_bare), (bare_steps_only, t_steps))
    for _ in range(repeats):  # interleaved, so machine drift hits all
        for fn, times in runs:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    images = STEPS * BATCH
    return {
        "image": f"1x{size}x{size}",
        "medfed_images_per_s": images / min(t_ours),
        "bare_images_per_s": images / min(t_bare),
        "ratio_time_medfed_over_bare": min(t_ours) / min(t_bare),
        "medfed_threads_1_images_per_s": images / min(t_one),
        "medfed_with_bn_recalibration_images_per_s": images / min(t_default),
        "ratio_with_bn_recalibration": min(t_default) / min(t_bare),
        "bare_without_start_loss_images_per_s": images / min(t_steps),
    }


def fedavg_round(size: int, repeats: int, threads: int, rounds: int = 3) -> dict:
    model = make_model("cnn2d", (1, size, size), threads=threads)
    sites = [make_site(size, n, seed=k) for k, n in enumerate(SITES)]
    algorithm = FederatedAlgorithm("fedavg", local_sgd_update, chain(weighted_mean(), apply_delta()))
    training = LocalTraining(model, LR, 10, BATCH, L2)
    init = model.init_params((1, size, size), KeyedRng(0))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_federated(algorithm, init, sites, training, rounds, KeyedRng(1))
        times.append((time.perf_counter() - t0) / rounds)
    return {"image": f"1x{size}x{size}", "model_threads": threads, "sites": list(SITES), "local_steps": 10, "batch": BATCH,
            "s_per_round": min(times)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "local_training": [local_training(s, args.repeats) for s in (64, 32)],
        "fedavg_3_sites": [
            fedavg_round(s, max(1, args.repeats // 2), t) for s in (64, 32) for t in sorted({1, torch.get_num_threads()})
        ],
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
