"""Local training speed of the 2D U-Net: medfed's local optimizer vs a bare MONAI/torch loop, and
the time per FedAvg round of 3 sites at 64 x 64 (issue 11 §6).

Workload: one site of N phantom images with lesion masks (``mni-phantom``, ``task=segmentation``,
1 x S x S, S = 64), ``unet2d`` (MONAI's UNet, channels 8, 16, 32, BatchNorm), STEPS mini-batch
SGD steps of BATCH images with L2 on the convolution weights, Dice + cross-entropy (MONAI's
``DiceCELoss``): one federated round's local work. Both sides do the same math: the eval-mode
loss on all N images at the start (the model protocol returns it; medfed computes it in float64
from the logits, the bare loop in float32), then the same batches, the same SGD step
``p - lr (g + l2 p)``:

- ``medfed``: :func:`medfed.client.optimizer.descend` through the model's session (the parameter
  view in, numpy float64 out), with BatchNorm recalibration off like the bare loop; the default
  model (recalibration on: one more train-mode forward over the N images) is reported beside;
- ``bare``: ``monai.networks.nets.UNet`` built with the same arguments, the same initial weights
  loaded by position (medfed only renames MONAI's modules), a plain loop.

The two runs are interleaved (medfed, bare, medfed, bare ...) so machine load hits both; the ratio
is the median over the pairs of medfed's time over the bare loop's (goal <= 1.1), in wall-clock
time and in this process's CPU time: with one thread the CPU time is the work done, which other
programs on a shared machine inflate far less than the wall clock (images/s are per CPU second). The trained
parameters of both sides are compared (max absolute difference) to show that the math is the same.

FedAvg: 3 sites of SITES images at 64 x 64 through ``run_federated`` (the engine ``medfed run``
drives), local_sgd_update and weighted_mean + apply_delta, STEPS local steps; seconds per round.

Threads: one intra-op thread on both sides (the models' default ``threads = 1``), so the numbers
do not depend on what else the machine runs on its other cores.

Run: python benchmarks/bench_unet.py [--repeats 7] [--size 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from medfed.client import LocalData, LocalTraining, local_sgd_update
from medfed.client.local import batch_indices
from medfed.client.optimizer import descend
from medfed.data.datasets import load_dataset
from medfed.engine import FederatedAlgorithm, run_federated
from medfed.models.registry import make_model
from medfed.rng import KeyedRng
from medfed.server import apply_delta, chain, weighted_mean

N, BATCH, STEPS, LR, L2 = 64, 16, 10, 0.05, 1e-3
CHANNELS = (8, 16, 32)
SITES = (64, 48, 32)


def phantom_sites(size: int, sizes: tuple[int, ...]) -> list[LocalData]:
    """Sites of 2D phantom images with their lesion masks (int64)."""
    fed = load_dataset("mni-phantom", task="segmentation", size=size, n_sites=len(sizes), n_per_site=max(sizes))
    return [LocalData(s.name, s.X[:n].astype(np.float32), s.y[:n].astype(np.int64)) for s, n in zip(fed.sites, sizes)]


def bare_unet(size: int, params: dict[str, np.ndarray]):
    """MONAI's UNet as medfed builds it, holding ``params`` (medfed's names map to MONAI's by position)."""
    from monai.networks.nets import UNet

    net = UNet(2, 1, 2, CHANNELS, (2,) * (len(CHANNELS) - 1), act="relu", norm="batch", bias=False)
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}  # not in the view
    assert [tuple(v.shape) for v in state.values()] == [v.shape for v in params.values()], "layouts differ"
    net.load_state_dict({k: torch.from_numpy(v).float() for k, v in zip(state, params.values())}, strict=False)
    return net


def bare_round(net, start_state, site: LocalData, batches, decayed) -> float:
    """The same round without the framework: load, eval-mode loss on all rows, SGD steps with L2."""
    from monai.losses import DiceCELoss

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    X, y = torch.from_numpy(site.X), torch.from_numpy(site.y).unsqueeze(1)
    net.load_state_dict(start_state)
    with torch.no_grad():
        net.eval()
        loss0 = loss_fn(net(X), y).item()
    net.train()
    weights = dict(net.named_parameters())
    for rows in batches:
        idx = torch.from_numpy(rows)
        for p in weights.values():
            p.grad = None
        loss_fn(net(X[idx]), y[idx]).backward()
        with torch.no_grad():
            for name, p in weights.items():
                g = p.grad.add(p, alpha=L2) if name in decayed else p.grad
                p.add_(g, alpha=-LR)
    return loss0


def local_training(size: int, repeats: int) -> dict:
    shape = (1, size, size)
    model = make_model("unet2d", shape, task="segmentation", n_classes=2, recalibrate=False)
    default_model = make_model("unet2d", shape, task="segmentation", n_classes=2)
    site = phantom_sites(size, (N,))[0]
    params = model.init_params(shape, KeyedRng(0))
    batches = list(batch_indices(N, BATCH, STEPS, KeyedRng(1)))
    net = bare_unet(size, params)
    start_state = {k: v.clone() for k, v in net.state_dict().items()}
    decayed = {k for k, p in net.named_parameters() if p.ndim > 1}  # convolution weights: medfed's L2 set

    def ours():
        return descend(model, params, site.X, site.y, batches, LR, L2)

    def ours_default():
        return descend(default_model, params, site.X, site.y, batches, LR, L2)

    def bare():
        return bare_round(net, start_state, site, batches, decayed)

    torch.set_num_threads(1)  # the bare loop's threads; medfed's model sets its own (threads = 1)
    trained, start_ours = ours()  # warm up (first-call allocations), and the math check
    start_bare = bare()
    bare_trained = {k: v.double().numpy() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(trained.values(), bare_trained.values()))
    ours_default()
    times = {"ours": [], "bare": [], "default": []}  # (wall, cpu) seconds per run
    for _ in range(repeats):  # interleaved, so machine drift hits all
        for name, fn in (("ours", ours), ("bare", bare), ("default", ours_default)):
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    images = STEPS * BATCH

    def ratios(name: str, clock: int) -> list[float]:
        return [a[clock] / b[clock] for a, b in zip(times[name], times["bare"])]

    def rate(name: str) -> float:
        return images / statistics.median(t[1] for t in times[name])

    return {
        "image": f"1x{size}x{size}", "n": N, "batch": BATCH, "steps": STEPS, "channels": list(CHANNELS),
        "medfed_images_per_cpu_s": rate("ours"),
        "bare_images_per_cpu_s": rate("bare"),
        "ratio_cpu_medfed_over_bare_median_of_pairs": statistics.median(ratios("ours", 1)),
        "ratio_wall_medfed_over_bare_median_of_pairs": statistics.median(ratios("ours", 0)),
        "ratio_cpu_pairs": [round(r, 3) for r in ratios("ours", 1)],
        "medfed_with_bn_recalibration_images_per_cpu_s": rate("default"),
        "ratio_cpu_with_bn_recalibration_median_of_pairs": statistics.median(ratios("default", 1)),
        # medfed returns the objective (data term + L2 term), the bare loop the data term
        "start_objective_medfed": start_ours, "start_data_loss_bare": start_bare,
        "max_abs_param_diff_after_round": diff,
    }


def fedavg_round(size: int, repeats: int, rounds: int = 2) -> dict:
    shape = (1, size, size)
    model = make_model("unet2d", shape, task="segmentation", n_classes=2)
    sites = phantom_sites(size, SITES)
    algorithm = FederatedAlgorithm("fedavg", local_sgd_update, chain(weighted_mean(), apply_delta()))
    training = LocalTraining(model, LR, STEPS, BATCH, L2)
    init = model.init_params(shape, KeyedRng(0))
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        run_federated(algorithm, init, sites, training, rounds, KeyedRng(1))
        walls.append((time.perf_counter() - wall) / rounds)
        cpus.append((time.process_time() - cpu) / rounds)
    return {"image": f"1x{size}x{size}", "sites": list(SITES), "local_steps": STEPS, "batch": BATCH,
            "wall_s_per_round_median": statistics.median(walls), "cpu_s_per_round_median": statistics.median(cpus)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    out = {
        "torch": torch.__version__,
        "local_training": local_training(args.size, args.repeats),
        "fedavg_3_sites": fedavg_round(args.size, max(1, args.repeats // 3)),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
