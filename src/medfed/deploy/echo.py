"""A bare FedAvg over echo rounds: the plumbing check of a deployment and Flower's floor.

No medfed method runs here: each site moves a float64 vector half-way to a target drawn from
its name, and the coordinator averages what the sites sent, so after R rounds from zeros the
global vector is ``(1 - 0.5**R)`` times the mean target, known in closed form. It measures
what the runtime itself costs (``benchmarks/bench_flower_floor.py``) and checks TLS, node
authentication and the link without a study (run config ``program = "echo"``).

``drive(link, run_config)`` learns the sites' nodes, runs ``rounds`` rounds and writes
``echo.json`` to ``out`` (the final vector, and per round who answered, who was missing and
why, and when the round ended); ``handle(payload, node_config)`` is a site's answer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from medfed.errors import ConfigError
from medfed.rng import KeyedRng, name_key

SIZE = 100
STEP = 0.5
RESULT = "echo.json"


def target(site: str, size: int = SIZE) -> np.ndarray:
    """The vector a site pulls the model towards, drawn from its name alone."""
    return KeyedRng(0, (name_key(site),)).generator.normal(size=size)


def decode_request(payload: bytes) -> tuple[int, np.ndarray]:
    header, vector = payload[:8], payload[8:]
    return int(np.frombuffer(header, "<i8")[0]), np.frombuffer(vector, "<f8")


def handle(payload: bytes, node_config: Mapping[str, object]) -> bytes:
    """The site's reply (its local model, float64 bytes) to one request."""
    _, global_vector = decode_request(payload)
    local = global_vector + STEP * (target(str(node_config["site"]), global_vector.size) - global_vector)
    return local.astype("<f8").tobytes()


def encode_request(round_: int, vector: np.ndarray) -> bytes:
    return np.asarray([round_], "<i8").tobytes() + np.asarray(vector, "<f8").tobytes()


def drive(link, run_config: Mapping[str, object]) -> dict:
    """Run the echo rounds through ``link`` (a :class:`medfed.deploy.link.FlowerLink`)."""
    from medfed.experiments.report import write_atomically

    sites = [s for s in str(run_config.get("sites", "")).split(",") if s]
    if not sites:
        raise ConfigError("run config 'sites' names no site")
    rounds = int(run_config.get("rounds", 2))
    timeout_s = float(run_config.get("round-timeout-s", 60))
    out = Path(str(run_config["out"]))
    started = time.time()
    nodes = link.sites(sites, timeout_s)
    record: dict = {"sites": nodes, "started": started, "sites_known": time.time(), "rounds": []}
    vector = np.zeros(SIZE)
    for r in range(rounds):
        start, grid_s, wait_s = time.perf_counter(), link.grid_s, link.wait_s
        replies = link.exchange({s: encode_request(r, vector) for s in nodes}, timeout_s)
        uploads = {s: np.frombuffer(v, "<f8") for s, v in replies.items() if isinstance(v, bytes)}
        if uploads:
            vector = np.mean([uploads[s] for s in sorted(uploads)], axis=0)
        record["rounds"].append({"round": r, "answered": sorted(uploads), "ended": time.time(),
                                 "missing": {s: v for s, v in replies.items() if isinstance(v, str)},
                                 "wall_s": time.perf_counter() - start, "grid_s": link.grid_s - grid_s,
                                 "wait_s": link.wait_s - wait_s})
    record["vector"] = vector.tolist()
    write_atomically(out, {RESULT: lambda: (json.dumps(record, indent=1) + "\n").encode()}, as_set=False)
    return record
