"""The federated round loop. It knows no method: a method supplies its local update rule
and its aggregator, and the loop runs selection, local training, upload (through the one
:class:`~medfed.comm.UploadBoundary`), aggregation and broadcast.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medfed.client.local import LocalData, LocalTraining
from medfed.comm.boundary import UploadBoundary
from medfed.engine.selection import select_sites
from medfed.rng import KeyedRng, name_key
from medfed.server.aggregate import Aggregator, stack_uploads

LocalUpdate = Callable[..., tuple[Any, Any]]


@dataclass(frozen=True)
class FederatedAlgorithm:
    """A federated method as the engine sees it: a client rule and a server aggregator."""

    name: str
    local_update: LocalUpdate
    aggregator: Aggregator


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """What happened in one communication round."""

    round: int
    sites: tuple[str, ...]
    train_loss: float  # example-weighted training loss of the global model the sites received
    bytes_up: int
    report: dict | None = None
    evaluation: dict | None = None


@dataclass
class FederatedRun:
    params: dict[str, np.ndarray]
    history: list[RoundRecord]
    client_states: dict[str, Any] = field(default_factory=dict)
    server_state: Any = None

    @property
    def train_loss(self) -> np.ndarray:
        return np.array([r.train_loss for r in self.history])


def run_federated(
    algorithm: FederatedAlgorithm,
    init_params: Mapping[str, np.ndarray],
    sites: Sequence[LocalData],
    training: LocalTraining,
    rounds: int,
    rng: KeyedRng,
    *,
    fraction: float = 1.0,
    min_sites: int = 1,
    boundary: UploadBoundary | None = None,
    evaluate: Callable[[Mapping[str, np.ndarray]], dict] | None = None,
    eval_every: int = 0,
) -> FederatedRun:
    """Run ``rounds`` communication rounds and return the final global model and history.

    Randomness is keyed: selection by ``rng.child(round)``, a site's local work by
    ``rng.child(round, name_key(site name))``, so a site draws the same numbers wherever it
    stands in the list and whichever order the sites are visited in. ``evaluate`` (global params -> metrics) runs every ``eval_every``
    rounds and after the last one.
    """
    boundary = boundary or UploadBoundary()
    params = {k: np.array(v, dtype=np.float64, copy=True) for k, v in init_params.items()}
    server_state = algorithm.aggregator.init(params)
    client_states: dict[str, Any] = {s.name: None for s in sites}
    history: list[RoundRecord] = []
    update, aggregate = algorithm.local_update, algorithm.aggregator.apply
    site_keys = [name_key(s.name) for s in sites]
    everyone = select_sites(len(sites), fraction, min_sites, rng) if fraction >= 1.0 else None
    for r in range(rounds):
        chosen = everyone if everyone is not None else select_sites(len(sites), fraction, min_sites, rng.child(r, 0))
        bytes_before = boundary.bytes_sent
        uploads = []
        for i in chosen.tolist():
            site = sites[i]
            upload, client_states[site.name] = update(
                params, site, training, client_states[site.name], rng.child(r, 1, site_keys[i])
            )
            uploads.append(boundary.transmit(upload))
        stack = stack_uploads(uploads)
        params, server_state, report = aggregate(stack, server_state, params, r)
        w = stack.weights
        loss = float(stack.metrics["loss"] @ w / w.sum()) if "loss" in stack.metrics else float("nan")
        evaluation = None
        if evaluate is not None and eval_every and ((r + 1) % eval_every == 0 or r == rounds - 1):
            evaluation = evaluate(params)
        history.append(
            RoundRecord(r, stack.sites, loss, boundary.bytes_sent - bytes_before, report, evaluation)
        )
    return FederatedRun(params, history, client_states, server_state)
