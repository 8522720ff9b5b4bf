"""What the coordinator runs inside the ServerApp: a placeholder bare FedAvg over echo rounds.

``drive(link, run_config)`` learns the sites' nodes, runs ``rounds`` rounds of a float64
vector of ``site.SIZE`` averaged over the sites that answered, and writes ``echo.json`` to
the run config's ``out`` folder (the final vector, and per round who answered, who was
missing and why, when the round ended, and its seconds in all, in Flower's Grid calls and
waiting for replies). ``medfed.engine``'s ``Driver`` replaces this.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from medfed.deploy import site as echo_site
from medfed.errors import ConfigError

RESULT = "echo.json"


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
    vector = np.zeros(echo_site.SIZE)
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
