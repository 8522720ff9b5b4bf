"""The Ray executor's cost per round against the in-process executor, and Flower's simulation
(which also runs its ClientApps on Ray) on the same workload, in one run.

Workload (issue 13): K sites x 20 rows x 90 features, logistic regression, FedAvg, 10 full-batch
local steps per round. medfed's two executors run in interleaved pairs (alternating which goes
first) on one local Ray (``num_cpus=2``, started once; each Ray run starts its actors, which is
start-up, not round time). A round's time is the gap between consecutive rounds' ends (medfed:
the driver's per-round ``evaluate`` hook; Flower: its strategy's ``evaluate_fn``), median over
the rounds after the first. Flower runs in a child process (benchmarks/flower_fedavg.py: its own
Ray instance, started by ``flwr.simulation.run_simulation``); its wall time includes that start.
Run: python benchmarks/bench_ray.py [--sites 10,100] [--rounds 8] [--pairs 3] [--no-flower]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from flower_fedavg import simulate

ROWS, FEATURES, STEPS, LR = 20, 90, 10, 0.1


def site_data(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Site ``k``'s rows, drawn from its own seed (Flower's ClientApp draws the same)."""
    gen = np.random.default_rng(1000 + k)
    X = gen.normal(size=(ROWS, FEATURES))
    y = (X[:, :5].sum(axis=1) + gen.normal(size=ROWS) > 0).astype(np.float64)
    return X, y


def medfed_run(n_sites: int, rounds: int, executor: str) -> dict:
    from medfed.client import LocalData, LocalTraining, local_sgd_update
    from medfed.engine import FederatedAlgorithm, run_federated
    from medfed.models import LogisticRegression
    from medfed.rng import KeyedRng
    from medfed.server import apply_delta, chain, weighted_mean

    sites = [LocalData(f"site-{k}", *site_data(k)) for k in range(n_sites)]
    model = LogisticRegression()
    algorithm = FederatedAlgorithm("fedavg", local_sgd_update, chain(weighted_mean(), apply_delta()))
    ends: list[float] = []

    def stamp(params):
        ends.append(time.perf_counter())
        return {}

    t0 = time.perf_counter()
    run = run_federated(algorithm, model.init(FEATURES), sites, LocalTraining(model, LR, STEPS), rounds,
                        KeyedRng(0), evaluate=stamp, eval_every=1, executor=executor)
    wall = time.perf_counter() - t0
    gaps = np.diff(ends)
    return {"wall_s": wall, "first_round_s": ends[0] - t0, "ms_per_round": 1e3 * float(np.median(gaps)),
            "params": np.concatenate([run.params["weight"], run.params["bias"]])}


def flower_site_rows(n_sites: int, partition: int) -> tuple[np.ndarray, np.ndarray]:
    """What Flower's ClientApp ``partition`` trains on (flower_fedavg.py calls it)."""
    return site_data(partition)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sites", default="10,100")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=3, help="interleaved (inprocess, ray) pairs per size")
    parser.add_argument("--no-flower", action="store_true")
    args = parser.parse_args()
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    rows = []
    try:
        for n in (int(s) for s in args.sites.split(",")):
            times = {"inprocess": [], "ray": []}
            for i in range(args.pairs):
                order = ("inprocess", "ray") if i % 2 == 0 else ("ray", "inprocess")
                runs = {kind: medfed_run(n, args.rounds, kind) for kind in order}
                same = bool(np.array_equal(runs["inprocess"]["params"], runs["ray"]["params"]))
                for kind, r in runs.items():
                    times[kind].append(r)
            row = {"sites": n, "identical_params": same}
            for kind, rs in times.items():
                row[kind] = {"ms_per_round": statistics.median(r["ms_per_round"] for r in rs),
                             "wall_s": statistics.median(r["wall_s"] for r in rs),
                             "first_round_s": statistics.median(r["first_round_s"] for r in rs)}
            row["ray_overhead_ms_per_round"] = row["ray"]["ms_per_round"] - row["inprocess"]["ms_per_round"]
            row["ray_over_inprocess"] = row["ray"]["ms_per_round"] / row["inprocess"]["ms_per_round"]
            rows.append(row)
    finally:
        ray.shutdown()
    if not args.no_flower:  # after our Ray is down: Flower starts its own
        for row in rows:
            flower = simulate("bench_ray", row["sites"], args.rounds, steps=STEPS, lr=LR, l2=0.0)
            row["flower_simulation"] = {k: v for k, v in flower.items() if k not in ("params", "per_round_s")}
    print(json.dumps({"rounds": args.rounds, "pairs": args.pairs, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
