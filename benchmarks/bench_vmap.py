"""Batched local training across sites with ``torch.func`` (``vmap`` + ``functional_call``) against
the per-site loop (issue 13 §1, "torch models where shapes allow").

Workload: one round's local work of K sites (10 and 100), each with N rows (cnn2d: 1 x S x S images;
mlp: D features), without BatchNorm (``norm = none`` or ``group``: BatchNorm's batch statistics tie
a row's output to the other rows of its site's batch, which vmap over sites keeps, but its running
statistics are a side effect vmap cannot return), STEPS SGD steps of B rows with L2 from the same
global model, the same batches on both sides:

- ``loop``: medfed's local optimizer (:func:`medfed.client.optimizer.descend`) site after site, as
  the in-process executor runs it (the parameter view in and out, the eval-mode start loss);
- ``bare``: the functional step below, one site at a time (no framework): what vmap batches;
- ``vmap``: the sites' parameters stacked (K, ...) and one ``vmap(grad(loss))`` per step over the
  stacked parameters and batches (K, B, ...), the same SGD step ``p - lr (g + l2 p)``; the start loss
  from one vmapped forward over every site's rows.

Same math: each side adds the L2 term to the gradient and steps with ``add(g, alpha=-lr)`` as the
optimizer does; only the kernels differ (vmap runs a convolution over K sites as one grouped
convolution), so the trained parameters differ by summation order: the max absolute difference
and the max relative one (over each tensor's max) are printed for float64 and float32.

Threads: torch runs one intra-op thread (the models' default ``threads = 1``), the same for all sides.

Run: python benchmarks/bench_vmap.py [--sites 10,100] [--repeats 3] [--models cnn2d,mlp] [--norm none]
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from medfed.client.optimizer import descend
from medfed.models.registry import make_model
from medfed.rng import KeyedRng

N, BATCH, STEPS, LR, L2 = 32, 8, 5, 0.05, 1e-3
SHAPES = {"cnn2d": (1, 16, 16), "mlp": (64,)}


def federation(k: int, shape: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """K sites' rows (K, N, *shape), labels (K, N) and every step's batch rows (STEPS, K, BATCH)."""
    gen = np.random.default_rng(seed)
    y = (gen.random((k, N)) < 0.5).astype(np.float64)
    X = gen.normal(size=(k, N, *shape))
    X[y == 1] += 0.3  # a signal to learn
    index = np.stack([np.stack([gen.permutation(N)[:BATCH] for _ in range(k)]) for _ in range(STEPS)])
    return X, y, index


def mean_log_loss(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each site's mean log-loss from its logits (K, N), in float64 (as the model protocol reports it)."""
    return (np.logaddexp(0.0, z) - y * z).mean(axis=-1)


def loop_round(model, params, X, y, index):
    """medfed's per-site path: :func:`descend` for every site (what the in-process executor runs)."""
    out = []
    for k in range(X.shape[0]):
        trained, start = descend(model, params, X[k], y[k], [index[t, k] for t in range(STEPS)], LR, L2)
        out.append((trained, start))
    return {name: np.stack([t[name] for t, _ in out]) for name in params}, np.array([s for _, s in out])


class Functional:
    """The network called functionally on parameter tensors: one site's batch loss and its gradient,
    and the same two vmapped over a leading site axis."""

    def __init__(self, model, shape):
        from torch.func import functional_call, grad, vmap

        slot = model._slot(shape)
        self.net, self.decayed, self.dtype = slot.net, set(slot.decayed), model.dtype
        net = self.net

        def batch_loss(theta, xb, yb):
            return F.binary_cross_entropy_with_logits(functional_call(net, theta, (xb,)), yb)

        def logits(theta, x):
            return functional_call(net, theta, (x,))

        self.grad, self.logits = grad(batch_loss), logits
        self.stacked_grad, self.stacked_logits = vmap(grad(batch_loss)), vmap(logits)

    def step(self, theta, g):
        """``p - lr (g + l2 p)`` on the decayed weights, ``p - lr g`` elsewhere (the optimizer's order)."""
        out = {}
        for name, p in theta.items():
            gk = g[name].add(p, alpha=L2) if L2 and name in self.decayed else g[name]
            out[name] = p.add(gk, alpha=-LR)
        return out


def _tensors(params, dtype):
    return {k: torch.as_tensor(v, dtype=dtype) for k, v in params.items()}


def bare_round(fn: Functional, params, X, y, index):
    """The functional step one site at a time (no framework): the per-site loop vmap replaces."""
    theta0 = _tensors(params, fn.dtype)
    Xt, yt = torch.as_tensor(X, dtype=fn.dtype), torch.as_tensor(y, dtype=fn.dtype)
    fn.net.train()
    trained, starts = [], []
    with torch.no_grad():
        for k in range(X.shape[0]):
            starts.append(fn.logits(theta0, Xt[k]).double().numpy())
    for k in range(X.shape[0]):
        theta = theta0
        for t in range(STEPS):
            rows = torch.as_tensor(index[t, k])
            g = fn.grad(theta, Xt[k][rows], yt[k][rows])
            with torch.no_grad():
                theta = fn.step(theta, g)
        trained.append(theta)
    out = {name: torch.stack([t[name] for t in trained]).double().numpy() for name in params}
    return out, mean_log_loss(np.stack(starts), y)


def vmap_round(fn: Functional, params, X, y, index):
    """Every site's steps at once: parameters stacked (K, ...), one vmapped gradient per step."""
    k = X.shape[0]
    theta = {name: t.expand(k, *t.shape).clone() for name, t in _tensors(params, fn.dtype).items()}
    Xt, yt = torch.as_tensor(X, dtype=fn.dtype), torch.as_tensor(y, dtype=fn.dtype)
    fn.net.train()
    with torch.no_grad():
        start = mean_log_loss(fn.stacked_logits(theta, Xt).double().numpy(), y)
    sites = torch.arange(k)[:, None]
    for t in range(STEPS):
        rows = torch.as_tensor(index[t])
        g = fn.stacked_grad(theta, Xt[sites, rows], yt[sites, rows])
        with torch.no_grad():
            theta = fn.step(theta, g)
    return {name: v.double().numpy() for name, v in theta.items()}, start


def difference(a, b) -> tuple[float, float]:
    """Max absolute difference over the parameters, and max relative to each tensor's max magnitude."""
    absolute = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    relative = max(float(np.max(np.abs(a[k] - b[k])) / max(np.max(np.abs(a[k])), 1e-300)) for k in a)
    return absolute, relative


def timed(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3, out


def measure(arch: str, k: int, norm: str, repeats: int) -> dict:
    shape = SHAPES[arch]
    X, y, index = federation(k, shape)
    row = {"model": arch, "norm": norm, "sites": k}
    for dtype in ("float64", "float32"):
        model = make_model(arch, norm=norm, dtype=dtype, device="cpu", threads=1)
        params = model.init_params(shape, KeyedRng(1).child(0))
        # the head starts at zero (every model starts at p = 0.5); move it so every layer's gradient is nonzero
        params = {n: v + 0.05 if n.startswith("head.") else v for n, v in params.items()}
        fn = Functional(model, shape)
        X_, y_ = X.astype(dtype), y
        loop_ms, (loop_p, loop_s) = timed(functools.partial(loop_round, model, params, X_, y_, index), repeats)
        bare_ms, (bare_p, _) = timed(functools.partial(bare_round, fn, params, X_, y_, index), repeats)
        vmap_ms, (vmap_p, vmap_s) = timed(functools.partial(vmap_round, fn, params, X_, y_, index), repeats)
        absolute, relative = difference(loop_p, vmap_p)
        row[dtype] = {
            "loop_ms": round(loop_ms, 2), "bare_ms": round(bare_ms, 2), "vmap_ms": round(vmap_ms, 2),
            "speedup_vs_loop": round(loop_ms / vmap_ms, 2), "speedup_vs_bare": round(bare_ms / vmap_ms, 2),
            "max_abs_diff": absolute, "max_rel_diff": relative,
            "bare_vs_loop_abs_diff": difference(loop_p, bare_p)[0],
            "start_loss_max_abs_diff": float(np.max(np.abs(loop_s - (vmap_s + 0.5 * L2 * sum(
                float(np.vdot(params[n], params[n])) for n in fn.decayed))))),
        }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default="10,100")
    parser.add_argument("--models", default="cnn2d,mlp")
    parser.add_argument("--norm", default="none", choices=("none", "group"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [measure(arch, int(k), args.norm, args.repeats) for arch in args.models.split(",")
            for k in args.sites.split(",")]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{N} rows/site, {STEPS} SGD steps of {BATCH} rows, lr {LR}, l2 {L2}, 1 thread; ms per round (best of "
          f"{args.repeats}); diff: trained parameters, vmap vs medfed's loop")
    print(f"{'model':6} {'norm':5} {'K':>4} {'dtype':7} {'loop':>9} {'bare':>9} {'vmap':>8} {'x loop':>7} "
          f"{'x bare':>7} {'max abs diff':>13} {'max rel diff':>13}")
    for r in rows:
        for dtype in ("float64", "float32"):
            m = r[dtype]
            print(f"{r['model']:6} {r['norm']:5} {r['sites']:4d} {dtype:7} {m['loop_ms']:9.1f} {m['bare_ms']:9.1f} "
                  f"{m['vmap_ms']:8.1f} {m['speedup_vs_loop']:7.2f} {m['speedup_vs_bare']:7.2f} "
                  f"{m['max_abs_diff']:13.3g} {m['max_rel_diff']:13.3g}")


if __name__ == "__main__":
    main()
