"""DP-SGD's local step against the plain one, in the same run: numpy logistic and cnn2d.

- numpy logistic: one site of 300 rows x 90 features, batch 32, 100 steps, L2 0.01.
- cnn2d (GroupNorm: DP-SGD refuses BatchNorm; channels 8, 16, 32, float32, threads 1) on
  mni-phantom-sized images (1 x 32 x 32), one site of 256 images, batch 32, 20 steps, L2 1e-3.

DP-SGD draws Poisson batches at rate 32/n, the plain loop fixed batches of 32; both through
:mod:`medfed.client.optimizer` with SGD. The two are timed in interleaved pairs, alternating
which runs first; the ratio per pair, median and range. Issue 10's goals: at most 2x
(logistic) and 3x (cnn2d). For cnn2d also against the plain steps alone: ``descend`` also
evaluates the start loss on all rows (the loss the site reports), which DP-SGD does not.
Run: python benchmarks/bench_dp_sgd.py [--pairs 21] [--cnn-pairs 7] [--cnn-size 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from medfed.client.dp_sgd import DpSgd, dp_sgd_descend
from medfed.client.local import batch_indices
from medfed.client.optimizer import descend, gradient_terms, make_optimizer
from medfed.models import LogisticRegression
from medfed.rng import KeyedRng


def interleaved(plain, private, pairs: int, work: int) -> dict:
    """``pairs`` timings of each, back to back in alternating order; per-pair ratios."""
    plain(), private()  # warm up (first-call allocations, torch.func's first trace)
    ratios, plain_s, private_s = [], [], []
    for i in range(pairs):
        times = {}
        for f in (plain, private) if i % 2 == 0 else (private, plain):
            start = time.perf_counter()
            f()
            times[f] = time.perf_counter() - start
        ratios.append(times[private] / times[plain])
        plain_s.append(times[plain])
        private_s.append(times[private])
    return {"plain_us_per_step": 1e6 * statistics.median(plain_s) / work,
            "dp_sgd_us_per_step": 1e6 * statistics.median(private_s) / work,
            "ratio_median_of_pairs": statistics.median(ratios),
            "ratio_range": [min(ratios), max(ratios)]}


def logistic(pairs: int) -> dict:
    gen = np.random.default_rng(0)
    X, y = gen.normal(0, 1, (300, 90)), (gen.random(300) > 0.5).astype(float)
    model = LogisticRegression()
    params = model.init_params((90,), KeyedRng(0))

    def plain():
        descend(model, params, X, y, batch_indices(300, 32, 100, KeyedRng(1)), 0.1, 0.01)

    def private():
        dp_sgd_descend(model, params, X, y, 100, 32, 0.1, 0.01, KeyedRng(1), DpSgd(1.0, 1.0))

    return {"model": "logistic", "rows": 300, "features": 90, "batch": 32, "steps": 100,
            **interleaved(plain, private, pairs, 100)}


def cnn2d(pairs: int, size: int) -> dict:
    from medfed.models.registry import make_model

    n, batch, steps = 256, 32, 20
    gen = np.random.default_rng(0)
    y = (np.arange(n) % 2).astype(np.float64)
    X = gen.normal(size=(n, 1, size, size)).astype(np.float32)
    X[y == 1, :, : size // 2] += 0.5
    model = make_model("cnn2d", (1, size, size), norm="group", optimizer="sgd")
    init = model.init_params((1, size, size), KeyedRng(0))
    params = {k: v + 0.05 * gen.normal(size=v.shape) for k, v in init.items()}  # off the zero head

    def plain():
        descend(model, params, X, y, batch_indices(n, batch, steps, KeyedRng(1)), 0.05, 1e-3)

    def private():
        dp_sgd_descend(model, params, X, y, steps, batch, 0.05, 1e-3, KeyedRng(1), DpSgd(1.0, 1.0))

    def plain_steps():
        """descend's loop without its start loss (an eval pass over the site's rows DP-SGD skips)."""
        with model.session(params, X, y) as session:
            optimizer = make_optimizer(model, session, 0.05)
            terms = gradient_terms(session, optimizer.fold, l2=1e-3)
            for rows in batch_indices(n, batch, steps, KeyedRng(1)):
                optimizer.step(session.values, session.gradient(rows)[0], terms)
            session.parameters()

    return {"model": "cnn2d", "norm": "group", "image": f"1x{size}x{size}", "rows": n, "batch": batch,
            "steps": steps, **interleaved(plain, private, pairs, steps),
            "against_steps_without_start_loss": interleaved(plain_steps, private, pairs, steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=21, help="timing pairs, numpy logistic")
    parser.add_argument("--cnn-pairs", type=int, default=7, help="timing pairs, cnn2d (0: skip)")
    parser.add_argument("--cnn-size", type=int, default=32, help="image side, cnn2d (mni-phantom's default: 32)")
    args = parser.parse_args()
    out = [logistic(args.pairs)]
    if args.cnn_pairs:
        out.append(cnn2d(args.cnn_pairs, args.cnn_size))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
