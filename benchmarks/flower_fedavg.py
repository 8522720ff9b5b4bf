"""Flower's simulation of the benchmarks' FedAvg workload, run in a child process (shared by
bench_scale.py and bench_ray.py).

The workload: each site's logistic regression (L2 ``l2``) trained for ``steps`` full-batch steps
of rate ``lr`` from the global model, FedAvg over all sites (equal rows: a plain mean). Flower
runs its ClientApps on the Ray backend of ``flwr.simulation.run_simulation`` (``num_cpus`` CPUs,
one per ClientApp). A round's time is the gap between consecutive calls of the strategy's
``evaluate_fn`` (the first call evaluates the initial arrays, before round 1), so the start of
Flower and Ray is not round time; ``ms_per_round`` is the median over the rounds after the first. Memory: the peak over time of the summed resident set of the
child and every process below it (Ray's GCS, raylet and workers are the child's descendants),
sampled every 0.2 s from /proc by the parent.

Site data: ``rows(module, k, partition)`` imports ``module`` in the ClientApp's process and calls
its ``flower_site_rows(k, partition)``; the caller's module caches what it builds per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _tree_rss_mb(root: int) -> float:
    """Summed resident set (MB) of ``root`` and its descendants, from /proc (Linux)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = dict(line.split(":", 1) for line in open(f"/proc/{entry}/status").read().splitlines()
                          if ":" in line)
        except OSError:  # the process ended while we read
            continue
        parents[int(entry)] = int(fields["PPid"])
        rss[int(entry)] = int(fields.get("VmRSS", "0 kB").split()[0])
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [p for p, parent in parents.items() if parent == pid and p not in tree]
        tree.update(children)
        frontier += children
    return sum(rss.get(p, 0) for p in tree) / 1024


def simulate(module: str, n_sites: int, rounds: int, *, steps: int, lr: float, l2: float,
             num_cpus: int = 2, timeout_s: float = 1800) -> dict:
    """Run Flower's simulation in a child process: ``{"ms_per_round", "per_round_s", "wall_s",
    "peak_mb", "params"}`` (``params``: the final weight and bias, as lists) or ``{"error": ...}``."""
    command = [sys.executable, str(HERE / "flower_fedavg.py"), module, str(n_sites), str(rounds), str(steps),
               repr(lr), repr(l2), str(num_cpus)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            peak[0] = max(peak[0], _tree_rss_mb(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return {"error": f"timed out after {timeout_s:.0f} s"}
    finally:
        done.set()
        sampler.join()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (err.strip().splitlines() or ["no output"])[-1]}
    return {**json.loads(lines[-1]), "peak_mb": peak[0]}


def _child(module: str, n_sites: int, rounds: int, steps: int, lr: float, l2: float, num_cpus: int) -> None:
    import importlib
    import logging

    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    logging.getLogger("flwr").setLevel(logging.ERROR)
    client, server = ClientApp(), ServerApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        X, y = importlib.import_module(module).flower_site_rows(n_sites, int(context.node_config["partition-id"]))
        n = X.shape[0]
        w, b = (a.copy() for a in msg.content["arrays"].to_numpy_ndarrays())
        for _ in range(steps):
            r = 1.0 / (1.0 + np.exp(-(X @ w + b))) - y
            w -= lr * (X.T @ r / n + l2 * w)
            b -= lr * r.sum() / n
        reply = RecordDict({"arrays": ArrayRecord([w, b]), "metrics": MetricRecord({"num-examples": n})})
        return Message(reply, reply_to=msg)

    ends: list[float] = []
    final: list[list[float]] = []

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=n_sites)

        def stamp(server_round, arrays):
            ends.append(time.perf_counter())
            final[:] = [a.tolist() for a in arrays.to_numpy_ndarrays()]
            return None

        features = importlib.import_module(module).flower_site_rows(n_sites, 0)[0].shape[1]
        strategy.start(grid, ArrayRecord([np.zeros(features), np.zeros(1)]), num_rounds=rounds, evaluate_fn=stamp)

    t0 = time.perf_counter()
    run_simulation(server, client, num_supernodes=n_sites,
                   backend_config={"init_args": {"num_cpus": num_cpus, "include_dashboard": False},
                                   "client_resources": {"num_cpus": 1}})
    gaps = np.diff(ends)  # ends[0]: the strategy's evaluation of the initial arrays, before round 1
    print(json.dumps({"wall_s": time.perf_counter() - t0, "ms_per_round": 1e3 * float(np.median(gaps[1:])),
                      "per_round_s": gaps.tolist(), "rounds": len(ends) - 1, "params": final}))


if __name__ == "__main__":
    name, k, r, s, rate, decay, cpus = sys.argv[1:8]
    _child(name, int(k), int(r), int(s), float(rate), float(decay), int(cpus))
