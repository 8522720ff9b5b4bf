"""DP-SGD's local step against the plain one, numpy logistic model, in the same run.

One site of 300 rows x 90 features, batch 32 (Poisson rate 32/300 for DP-SGD, fixed batches
for the plain loop), 100 steps, L2 0.01; the two timed in interleaved pairs, alternating which
runs first; the ratio per pair, median and range. Issue 10's goal: at most 2x.
Run: python benchmarks/bench_dp_sgd.py [--pairs 21]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from medfed.client.dp_sgd import DpSgd, dp_sgd_descend
from medfed.client.local import batch_indices
from medfed.client.optimizer import descend
from medfed.models import LogisticRegression
from medfed.rng import KeyedRng


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=21)
    args = parser.parse_args()
    gen = np.random.default_rng(0)
    X, y = gen.normal(0, 1, (300, 90)), (gen.random(300) > 0.5).astype(float)
    model = LogisticRegression()
    params = model.init_params((90,), KeyedRng(0))

    def plain():
        descend(model, params, X, y, batch_indices(300, 32, 100, KeyedRng(1)), 0.1, 0.01)

    def private():
        dp_sgd_descend(model, params, X, y, 100, 32, 0.1, 0.01, KeyedRng(1), DpSgd(1.0, 1.0))

    ratios, plain_s = [], []
    for i in range(args.pairs):
        times = {}
        for f in (plain, private) if i % 2 == 0 else (private, plain):
            start = time.perf_counter()
            f()
            times[f.__name__] = time.perf_counter() - start
        ratios.append(times["private"] / times["plain"])
        plain_s.append(times["plain"])
    print(json.dumps({"plain_us_per_step": 1e4 * statistics.median(plain_s),
                      "ratio_median_of_pairs": statistics.median(ratios),
                      "ratio_range": [min(ratios), max(ratios)]}, indent=1))


if __name__ == "__main__":
    main()
