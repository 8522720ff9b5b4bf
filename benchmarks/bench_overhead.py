"""Framework overhead: medfed FedAvg vs a bare numpy loop doing the same math, same run.

Workload (issue 2, §6): 2 sites, 50 rounds, 10 full-batch local steps, 90 features,
logistic regression with L2. The two loops are timed in interleaved pairs (alternating which goes first), and the ratio
medfed / bare is taken per pair, so a drifting machine moves both sides of every ratio alike;
prints the median ratio with its 10-90 % range and the ratio of the best times.
Run: python benchmarks/bench_overhead.py [--pairs 40]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from medfed.client import LocalData, LocalTraining, local_sgd_update
from medfed.engine import FederatedAlgorithm, run_federated
from medfed.models import LogisticRegression
from medfed.rng import KeyedRng
from medfed.server import apply_delta, chain, weighted_mean

N_FEATURES, ROUNDS, STEPS, LR, L2 = 90, 50, 10, 0.1, 0.01
SITE_ROWS = (342, 288)  # ADNI-1 / ADNI-2 training rows at an 80/20 split


def make_sites(seed: int = 0) -> list[LocalData]:
    rng = np.random.default_rng(seed)
    sites = []
    for i, n in enumerate(SITE_ROWS):
        X = rng.normal(size=(n, N_FEATURES))
        y = (X[:, :5].sum(axis=1) + rng.normal(size=n) > 0).astype(np.float64)
        sites.append(LocalData(f"site-{i}", X, y))
    return sites


def bare_fedavg(sites: list[LocalData]) -> np.ndarray:
    """The same math without the framework: weights and bias as one loop of numpy calls."""
    w, b = np.zeros(N_FEATURES), 0.0
    total = sum(s.n for s in sites)
    for _ in range(ROUNDS):
        new_w, new_b = np.zeros(N_FEATURES), 0.0
        for s in sites:
            lw, lb = w.copy(), b
            for _ in range(STEPS):
                z = s.X @ lw + lb
                r = 1.0 / (1.0 + np.exp(-z)) - s.y
                gw = s.X.T @ r / s.n + L2 * lw
                lw -= LR * gw
                lb -= LR * r.sum() / s.n
            new_w += (s.n / total) * lw
            new_b += (s.n / total) * lb
        w, b = new_w, new_b
    return np.concatenate([w, [b]])


def medfed_fedavg(sites: list[LocalData]) -> np.ndarray:
    model = LogisticRegression()
    algorithm = FederatedAlgorithm("fedavg", local_sgd_update, chain(weighted_mean(), apply_delta()))
    training = LocalTraining(model, LR, STEPS, None, L2)
    run = run_federated(algorithm, model.init(N_FEATURES), sites, training, ROUNDS, KeyedRng(0))
    return np.concatenate([run.params["weight"], run.params["bias"]])


def timed(fn, sites) -> float:
    t0 = time.perf_counter()
    fn(sites)
    return time.perf_counter() - t0


def interleaved(sites, pairs: int) -> tuple[list[float], list[float]]:
    """``pairs`` timings of each loop, run back to back in alternating order (bare first in
    even pairs, medfed first in odd ones), so machine drift and warm-up hit both alike."""
    bare, ours = [], []
    for i in range(pairs):
        if i % 2 == 0:
            bare.append(timed(bare_fedavg, sites))
            ours.append(timed(medfed_fedavg, sites))
        else:
            ours.append(timed(medfed_fedavg, sites))
            bare.append(timed(bare_fedavg, sites))
    return bare, ours


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=40, help="interleaved (bare, medfed) timing pairs")
    args = parser.parse_args()
    sites = make_sites()
    diff = np.abs(bare_fedavg(sites) - medfed_fedavg(sites)).max()
    interleaved(sites, 4)  # warm caches and branch predictors for both
    bare, ours = interleaved(sites, args.pairs)
    ratios = np.array(ours) / np.array(bare)  # per pair: both measured under the same conditions
    out = {
        "pairs": args.pairs,
        "bare_ms_per_round": {"min": 1e3 * min(bare) / ROUNDS, "median": 1e3 * float(np.median(bare)) / ROUNDS},
        "medfed_ms_per_round": {"min": 1e3 * min(ours) / ROUNDS, "median": 1e3 * float(np.median(ours)) / ROUNDS},
        "ratio_median_of_pairs": float(np.median(ratios)),
        "ratio_pairs_p10_p90": [float(np.percentile(ratios, 10)), float(np.percentile(ratios, 90))],
        "ratio_of_minima": min(ours) / min(bare),
        "max_abs_param_diff": float(diff),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
