"""Every method's one-repeat `medfed run` wall time against FedAvg's (issue 13 §3: no method above 2x).

Each run is a fresh interpreter (`python -m medfed.cli.app run ...`, one method, `--repeats 1`,
defaults otherwise, no plots), so imports and first-call setup count as a user pays them. Each
method's run sits between two FedAvg runs on the same data set; its ratio is to the mean of those
two, so a drifting machine moves both sides alike. The table also gives the experiment's own time
(results.json's ``runtime_s``, in the process) and its ratio: what the method costs past the
imports every run shares. With ``--pairs N`` the sandwich is repeated N
times and the median ratio is reported. Methods come from the registry, in `medfed methods` order
(the survey's settings cross/single/mix too). A method whose defaults the data set refuses (Krum,
Multi-Krum and Bulyan need more sites at f=1 than heart-disease's 4 or breast-cancer's 3) is timed at
``--byzantine 0`` and says so in its note. Each method runs once untimed first (its refusal shows there).
Measured (2 shared cores, --pairs 3): every method within 0.7-1.4x of FedAvg's cold command (0.4-0.5 s,
mostly imports) on both data sets; in the process the largest are the methods' own work, inherent:
APFL 1.86x (two models' gradients per step), FedSGD 1.87x / 1.45x (a gradient exchange per local
step at the global model), Ditto 1.49x (a personal model trained beside the global one).
Run: python benchmarks/bench_method_costs.py [--datasets heart-disease,breast-cancer] [--pairs 1]
     [--methods a,b] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass


# an installed package has its bytecode compiled: let the runs cache it (outside the source tree),
# even where the caller's environment says not to (PYTHONDONTWRITEBYTECODE)
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
ENV["PYTHONPYCACHEPREFIX"] = os.path.join(tempfile.gettempdir(), "medfed-costs-pycache")


class Refused(Exception):
    """The run stopped with medfed's one-line error (exit 2), e.g. Krum on too few sites."""


@dataclass(frozen=True)
class Timing:
    wall_s: float  # the command, interpreter start and imports included
    run_s: float  # results.json's runtime_s: the experiment itself, in the process


def wall(dataset: str, method: str, out: str, extra: tuple[str, ...] = ()) -> Timing:
    cmd = [sys.executable, "-m", "medfed.cli.app", "run", "--dataset", dataset, "--methods", method,
           "--repeats", "1", "--no-plots", "--out", out, *extra]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    if done.returncode == 2:
        raise Refused(done.stderr.strip().splitlines()[-1])
    done.check_returncode()
    seconds = time.perf_counter() - t0
    with open(os.path.join(out, "results.json")) as fh:
        return Timing(seconds, json.load(fh)["runtime_s"])


def measure(dataset: str, methods: list[str], pairs: int) -> list[dict]:
    out = tempfile.mkdtemp(prefix="medfed-costs-")
    wall(dataset, "fedavg", out)  # writes bytecode caches, as an installed package has them
    rows = []
    for method in methods:
        extra, note = (), ""
        try:
            wall(dataset, method, out)  # a refusal shows here, before any timing
        except Refused:
            # the Byzantine rules refuse the default f=1 on few sites (heart-disease 4, breast-cancer 3): time
            # them at f=0, the same code path with no site discarded
            extra, note = ("--byzantine", "0"), "defaults refused on these sites; timed at --byzantine 0"
        seconds, ratios, run_s, run_ratios = [], [], [], []
        for _ in range(pairs):
            before = wall(dataset, "fedavg", out)
            t = wall(dataset, method, out, extra)
            after = wall(dataset, "fedavg", out)
            seconds.append(t.wall_s)
            ratios.append(t.wall_s / ((before.wall_s + after.wall_s) / 2))
            run_s.append(t.run_s)
            run_ratios.append(t.run_s / ((before.run_s + after.run_s) / 2))
        rows.append({"dataset": dataset, "method": method, "seconds": statistics.median(seconds),
                     "ratio": statistics.median(ratios), "run_s": statistics.median(run_s),
                     "run_ratio": statistics.median(run_ratios), "note": note})
        r = rows[-1]
        print(f"{dataset:14s} {method:15s} {r['seconds']:6.2f} s {r['ratio']:5.2f}x   in-process {r['run_s']:6.3f} s "
              f"{r['run_ratio']:5.2f}x  {note}", flush=True)
    return rows


def main() -> None:
    from medfed.methods.registry import METHODS

    parser = argparse.ArgumentParser()
    parser.add_argument("--datasets", default="heart-disease,breast-cancer")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--pairs", type=int, default=1)
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    for dataset in args.datasets.split(","):
        rows += measure(dataset, args.methods.split(","), args.pairs)
    print("\n| data set | method | seconds | ratio to FedAvg | in-process s | its ratio | note |\n"
          "|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        flag = "  **> 2x**" if r["ratio"] > 2 else ""
        print(f"| {r['dataset']} | {r['method']} | {r['seconds']:.2f} | {r['ratio']:.2f}{flag} | {r['run_s']:.3f} | "
              f"{r['run_ratio']:.2f} | {r['note']} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
