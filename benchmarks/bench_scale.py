"""Scale (issue 13 §4): ms/round and peak memory of FedAvg at K = 2, 100, 1,000, 10,000 sites.

Workload: every site 20 rows x 90 features (standard normal; y from the first 5 features plus
noise), logistic regression with L2, 10 full-batch local steps per round, full participation.
Columns, each a function ``(X, y, rounds) -> seconds of each round`` in :data:`RUNNERS` (the Ray
executor adds its own there):

- ``inprocess``, ``vectorized``: medfed's executors under its driver (screening, records, commit);
  a round's time is the time between the driver's reports of consecutive rounds, so the setup
  (stacking the rows, the setup exchange) is left out;
- ``hand``: a hand-vectorized numpy loop doing the same math: all sites as one (K, 20, 90) array,
  batched matrix products for each step, each site's loss at the global model, the weighted mean;
- ``ray`` (when Ray is installed): medfed's Ray executor, one actor per CPU of a Ray started on this
  machine; its memory column is the driver process's peak only (Ray's raylet, GCS and actor
  processes are not counted);
- ``flower`` (when flwr is installed): Flower's simulation of the same FedAvg (benchmarks/
  flower_fedavg.py: its ClientApps on its Ray backend, 2 CPUs), in a child process; a round is the
  gap between its strategy's evaluations. Up to :data:`FLOWER_MAX_SITES` sites (beyond, a round
  takes minutes: the cell says ``skipped``); its memory is the peak summed resident set of its whole
  process tree (Ray's GCS, raylet and workers included), sampled during the timed run.

Timing: for each K the runners go in turn, ``--repeats`` times in rotated order (so drift hits all
alike); a cell is the median per-round time over every repeat's rounds after its first (warm-up).
Memory: the peak resident set (``VmHWM``, Linux) of a fresh process that builds the K sites and runs
2 rounds on the runner: everything a user pays, interpreter and the sites' rows included.
Run: python benchmarks/bench_scale.py [--sizes 2,100,1000,10000] [--repeats 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
from flower_fedavg import simulate

from medfed.client import LocalData, LocalTraining, local_sgd_update
from medfed.engine import FederatedAlgorithm
from medfed.engine.driver import Driver
from medfed.engine.executors import local_executor
from medfed.engine.protocol import programs
from medfed.models import LogisticRegression
from medfed.rng import KeyedRng
from medfed.server import apply_delta, chain, weighted_mean

ROWS, FEATURES, STEPS, LR, L2 = 20, 90, 10, 0.1, 0.01
SIZES = (2, 100, 1_000, 10_000)
FLOWER_MAX_SITES = 1_000  # Flower measured 5.2 s a round at 1,000 sites (issue 13): 10,000 would take hours
GOAL_RATIO, GOAL_MB = 1.5, {1_000: 150, 10_000: 600}  # vectorized / hand; peak memory (issue 13 §1)


def make_rows(k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The federation's rows, (k, ROWS, FEATURES) and (k, ROWS)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((k, ROWS, FEATURES))
    y = (X[..., :5].sum(axis=-1) + rng.standard_normal((k, ROWS)) > 0).astype(np.float64)
    return X, y


def medfed_runner(executor: str) -> Callable[[np.ndarray, np.ndarray, int], list[float]]:
    """A runner for one of medfed's local executors: FedAvg under the driver, timed per round."""

    def run(X: np.ndarray, y: np.ndarray, rounds: int) -> list[float]:
        sites = [LocalData(f"site-{i}", X[i], y[i]) for i in range(X.shape[0])]
        model = LogisticRegression()
        algorithm = FederatedAlgorithm("fedavg", local_sgd_update, chain(weighted_mean(), apply_delta()))
        site, server = programs(algorithm, LocalTraining(model, LR, STEPS, None, L2), [s.name for s in sites])
        rng = KeyedRng(0)
        stamps: list[float] = []
        runner = local_executor(executor, site, sites, rng)
        driver = Driver(server, runner, rounds, rng, observe=lambda record: stamps.append(time.perf_counter()))
        stamps.append(time.perf_counter())
        run.params = driver.run(model.init(FEATURES)).params
        runner.close()
        return list(np.diff(stamps))

    return run


def hand_loop(X: np.ndarray, y: np.ndarray, rounds: int) -> list[float]:
    """The same math written as one numpy program over all sites, by hand."""
    k, n, d = X.shape
    share = np.full(k, 1.0 / k)  # equal sites: the example weights
    w, b = np.zeros(d), 0.0
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        W, B = np.repeat(w[None, :], k, axis=0), np.full(k, b)
        for step in range(STEPS):
            z = np.matmul(X, W[:, :, None])[..., 0] + B[:, None]
            if step == 0:  # each site's loss at the global model, as the sites report it
                loss = (np.logaddexp(0.0, z).sum(axis=1) - (y * z).sum(axis=1)) / n + 0.5 * L2 * (w @ w)
            r = 1.0 / (1.0 + np.exp(-z)) - y
            W -= LR * (np.matmul(r[:, None, :], X)[:, 0, :] / n + L2 * W)
            B -= LR * r.sum(axis=1) / n
        w, b = share @ W, float(share @ B)
        hand_loop.loss = float(share @ loss)
        times.append(time.perf_counter() - start)
    hand_loop.params = {"weight": w, "bias": np.array([b])}
    return times


_ROWS_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def flower_site_rows(k: int, partition: int) -> tuple[np.ndarray, np.ndarray]:
    """Site ``partition``'s rows of the ``k``-site federation, built once per process (Flower's
    ClientApps call this in Ray's long-lived workers)."""
    if k not in _ROWS_CACHE:
        _ROWS_CACHE[k] = make_rows(k)
    X, y = _ROWS_CACHE[k]
    return X[partition], y[partition]


def flower_runner(X: np.ndarray, y: np.ndarray, rounds: int) -> list[float]:
    """Flower's simulation on make_rows(K) (rebuilt in its workers from the same seed); its
    process tree's peak memory is kept in ``flower_runner.peak_mb``."""
    result = simulate("bench_scale", X.shape[0], rounds, steps=STEPS, lr=LR, l2=L2)
    if "error" in result:
        raise RuntimeError(f"Flower's simulation failed at {X.shape[0]} sites: {result['error']}")
    flower_runner.peak_mb = result["peak_mb"]
    flower_runner.params = {"weight": np.array(result["params"][0]), "bias": np.array(result["params"][1])}
    return result["per_round_s"]


RUNNERS: dict[str, Callable[[np.ndarray, np.ndarray, int], list[float]]] = {
    "inprocess": medfed_runner("inprocess"),
    "vectorized": medfed_runner("vectorized"),
    "hand": hand_loop,
}
"""Column name -> runner; add an executor's column here."""
if importlib.util.find_spec("ray") is not None:  # the scale extra: one actor per CPU, Ray started here once
    RUNNERS["ray"] = medfed_runner("ray")
if importlib.util.find_spec("flwr") is not None:
    RUNNERS["flower"] = flower_runner


def rounds_for(k: int) -> int:
    """Rounds per timed run: enough to time, few enough that 10,000 serial sites finish."""
    return {2: 40, 100: 20, 1_000: 6}.get(k, 3)


def peak_mb(runner: str, k: int) -> float:
    """Peak RSS (MB) of a fresh process building ``k`` sites and running 2 rounds on ``runner``."""
    out = subprocess.run([sys.executable, __file__, "--memory-of", runner, str(k)], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def memory_of(runner: str, k: int) -> None:
    X, y = make_rows(k)
    RUNNERS[runner](X, y, 2)
    # VmHWM: this process image's own peak (ru_maxrss would carry the parent's over fork and exec)
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    print(int(status["VmHWM"].split()[0]) / 1024)  # kB


def agreement(names: list[str], k: int = 100) -> dict[str, float]:
    """Max relative difference of each runner's final model from the in-process executor's."""
    X, y = make_rows(k)
    finals = {}
    for name in names:
        run = RUNNERS[name]
        run(X, y, 3)
        finals[name] = np.concatenate([run.params["weight"], run.params["bias"]])
    ref = finals["inprocess"]
    return {name: float(np.max(np.abs(p - ref) / np.abs(ref))) for name, p in finals.items() if name != "inprocess"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--runners", default=",".join(RUNNERS))
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--json")
    parser.add_argument("--memory-of", nargs=2, metavar=("RUNNER", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:
        memory_of(args.memory_of[0], int(args.memory_of[1]))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    names = args.runners.split(",")
    table: dict[int, dict[str, dict[str, float]]] = {}
    for k in sizes:
        X, y = make_rows(k)
        here = [n for n in names if n != "flower" or k <= FLOWER_MAX_SITES]
        per_round: dict[str, list[float]] = {name: [] for name in here}
        flower_mb: list[float] = []
        for rep in range(args.repeats):
            order = here[rep % len(here):] + here[: rep % len(here)]
            for name in order:
                per_round[name] += RUNNERS[name](X, y, rounds_for(k) + 1)[1:]  # the first round warms up
                if name == "flower":
                    flower_mb.append(flower_runner.peak_mb)
        table[k] = {name: {"ms": 1e3 * float(np.median(t))} for name, t in per_round.items()}
        if not args.no_memory:
            for name in here:
                table[k][name]["mb"] = max(flower_mb) if name == "flower" else peak_mb(name, k)
        print(f"K={k}: " + ", ".join(f"{n} {c['ms']:.2f} ms" for n, c in table[k].items()), file=sys.stderr)
    ray = "ray" in names and "inprocess" in names
    flower = "flower" in names and "inprocess" in names

    def cell(row: dict, name: str, key: str, width: int, digits: int) -> str:
        return f"{row[name][key]:{width}.{digits}f}" if name in row else f"{'skipped':>{width}}"

    print(f"{'K':>7} | " + " | ".join(f"{n + ' ms':>14}" for n in names) + " | vectorized/hand | inprocess/vectorized"
          + (" | ray/inprocess" if ray else "") + (" | flower/inprocess" if flower else "")
          + ("" if args.no_memory else " | " + " | ".join(f"{n + ' MB':>13}" for n in names)))
    for k, row in table.items():
        cells = " | ".join(cell(row, n, "ms", 14, 2) for n in names)
        ratio = row["vectorized"]["ms"] / row["hand"]["ms"] if {"vectorized", "hand"} <= set(row) else float("nan")
        both = {"vectorized", "inprocess"} <= set(row)
        speed = row["inprocess"]["ms"] / row["vectorized"]["ms"] if both else float("nan")
        mem = "" if args.no_memory else " | " + " | ".join(cell(row, n, "mb", 13, 0) for n in names)
        over = f" | {row['ray']['ms'] / row['inprocess']['ms']:13.1f}" if ray else ""
        if flower:
            over += (f" | {row['flower']['ms'] / row['inprocess']['ms']:16.1f}" if "flower" in row
                     else f" | {'skipped':>16}")
        print(f"{k:>7} | {cells} | {ratio:15.2f} | {speed:20.1f}{over}{mem}")
    if flower:
        print(f"flower: skipped above {FLOWER_MAX_SITES:,} sites; its MB is its whole process tree's (Ray included)")
    print(f"goal: vectorized/hand <= {GOAL_RATIO} at 100, 1,000, 10,000; vectorized peak MB <= "
          + ", ".join(f"{v} at {k:,}" for k, v in GOAL_MB.items()))
    diff = agreement(names) if {"inprocess"} <= set(names) else {}
    print("max relative difference from inprocess (100 sites, 3 rounds): "
          + ", ".join(f"{n} {d:.1e}" for n, d in diff.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"table": {str(k): v for k, v in table.items()}, "agreement": diff}, f, indent=2)


if __name__ == "__main__":
    main()
