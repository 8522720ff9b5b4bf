"""Cold-process wall time of `medfed reproduce` on adni-like with 5 repeats (issue 2: <= 2 s).

Each run is a fresh interpreter (imports included). The baseline in the same run is the
cost of starting Python and importing numpy, which no numpy program can avoid; the
script prints both and their ratio, and the ratio to the 2 s budget.
Run: python benchmarks/bench_reproduce.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    out = tempfile.mkdtemp()
    cmd = [sys.executable, "-m", "medfed.cli.app", "reproduce", "--dataset", "adni-like", "--repeats", "5", "--out", out]
    base_cmd = [sys.executable, "-c", "import numpy"]
    wall(cmd)  # first run writes bytecode caches, as any installed package has them
    ours = [wall(cmd) for _ in range(args.runs)]
    base = [wall(base_cmd) for _ in range(args.runs)]
    result = {
        "reproduce_wall_s": {"min": min(ours), "median": statistics.median(ours), "max": max(ours)},
        "python_plus_numpy_wall_s": {"min": min(base), "median": statistics.median(base)},
        "ratio_to_python_plus_numpy": statistics.median(ours) / statistics.median(base),
        "ratio_to_2s_budget": statistics.median(ours) / 2.0,
    }
    # ru_maxrss of children is the largest peak of any child so far, in KiB on Linux
    result["reproduce_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    with open(f"{out}/results.json") as fh:
        result["in_process_runtime_s"] = json.load(fh)["runtime_s"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
