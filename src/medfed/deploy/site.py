"""What a site runs for each message from the coordinator: a placeholder echo of FedAvg.

The request is a round number and the global vector (``coordinator.encode_request``); the
reply is the site's local model: half-way from the global vector to the site's own target,
a vector drawn from the site's name (``target``), so that the averages are known in closed
form: after R rounds from zeros, the global vector is ``(1 - 0.5**R)`` times the mean target.
The real site program (``medfed.engine``'s ``SiteRuntime``) replaces this module.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from medfed.rng import KeyedRng, name_key

SIZE = 100
STEP = 0.5


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
