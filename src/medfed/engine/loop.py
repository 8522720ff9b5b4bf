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
from medfed.comm.policy import sharing_policy
from medfed.engine.selection import select_sites
from medfed.rng import KeyedRng, name_key
from medfed.server.aggregate import Aggregator, stack_uploads
from medfed.server.validate import screen_uploads

LocalUpdate = Callable[..., tuple[Any, Any]]


Personalize = Callable[..., dict[str, np.ndarray]]


@dataclass(frozen=True)
class FederatedAlgorithm:
    """A federated method as the engine sees it: a client rule and a server aggregator.

    Optional pieces, for methods that need them:

    - ``broadcast(server_state) -> dict``: extra keyword arguments sent down with the global
      model each round (SCAFFOLD's server control variate). They reach the local rule as
      keyword arguments.
    - ``personalize(global_params, data, training, client_state, rng, **message) -> params``: a
      site's personal model after the last round (fine-tuning, Ditto, APFL, PFA). Its metrics
      are reported next to the global model's. ``message`` is what ``broadcast`` makes of the
      final server state (PFA's last shared frequency band).
    - ``private(name) -> bool``: parameters that never leave a site (FedBN, FedPer). Uploads
      carry the others only; the boundary enforces it (:func:`medfed.comm.policy.sharing_policy`)
      and the server keeps its copy of a private parameter unchanged.
    """

    name: str
    local_update: LocalUpdate
    aggregator: Aggregator
    broadcast: Callable[[Any], dict[str, Any]] | None = None
    personalize: Personalize | None = None
    private: Callable[[str], bool] | None = None


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """What happened in one communication round."""

    round: int
    sites: tuple[str, ...]
    train_loss: float  # example-weighted training loss of the global model the sites received
    bytes_up: int
    report: dict | None = None
    evaluation: dict | None = None
    rejected: dict[str, str] = field(default_factory=dict)  # site -> why the server refused its upload
    skipped: str | None = None  # why the global model was left unchanged this round


@dataclass
class FederatedRun:
    params: dict[str, np.ndarray]
    history: list[RoundRecord]
    client_states: dict[str, Any] = field(default_factory=dict)
    server_state: Any = None
    personal: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

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
    max_update_norm: float | None = None,
) -> FederatedRun:
    """Run ``rounds`` communication rounds and return the final global model and history.

    Randomness is keyed: selection by ``rng.child(round)``, a site's local work by
    ``rng.child(round, name_key(site name))``, so a site draws the same numbers wherever it
    stands in the list and whichever order the sites are visited in. ``evaluate`` (global params -> metrics) runs every ``eval_every``
    rounds and after the last one.

    Every upload is screened (:func:`~medfed.server.validate.screen_uploads`): a malformed
    one, or one whose norm exceeds ``max_update_norm``, is left out of the round and named in
    the round's ``rejected``. If fewer than ``min_sites`` uploads remain, the global model
    stays as it was and the round records why.

    A site's state (control variate, personal model) advances only when the server used its
    upload: after a rejected upload, or in a skipped round, it stays exactly as it was, as if
    the site had not taken part, so state that must move with the server's (SCAFFOLD's
    ``c_i`` with ``c``) never drifts from it.
    """
    boundary = boundary or UploadBoundary()
    if algorithm.private is not None:
        boundary = UploadBoundary([*boundary.transforms, sharing_policy(algorithm.private)])
    params = {k: np.array(v, dtype=np.float64, copy=True) for k, v in init_params.items()}
    server_state = algorithm.aggregator.init(params)
    client_states: dict[str, Any] = {s.name: None for s in sites}
    history: list[RoundRecord] = []
    update, aggregate = algorithm.local_update, algorithm.aggregator.apply
    site_keys = [name_key(s.name) for s in sites]
    site_training = [training.for_site(s.n) for s in sites]  # local epochs become per-site steps
    everyone = select_sites(len(sites), fraction, min_sites, rng) if fraction >= 1.0 else None
    for r in range(rounds):
        chosen = everyone if everyone is not None else select_sites(len(sites), fraction, min_sites, rng.child(r, 0))
        bytes_before = boundary.bytes_sent
        uploads = []
        pending: dict[str, Any] = {}  # each site's state after this round, kept once the server uses its upload
        message = algorithm.broadcast(server_state) if algorithm.broadcast else {}
        for i in chosen.tolist():
            site = sites[i]
            upload, pending[site.name] = update(
                params, site, site_training[i], client_states[site.name], rng.child(r, 1, site_keys[i]), **message
            )
            uploads.append(boundary.transmit(upload))
        shared = params if algorithm.private is None else {k: v for k, v in params.items() if not algorithm.private(k)}
        accepted, rejected = screen_uploads(uploads, shared, max_norm=max_update_norm)
        report = skipped = None
        if len(accepted) < max(1, min(min_sites, len(uploads))):
            skipped = f"{len(accepted)} valid upload(s), fewer than the {min_sites} required"
            loss = float("nan")
            names = tuple(u.site for u in accepted)
        else:
            stack = stack_uploads(accepted)
            params, server_state, report = aggregate(stack, server_state, params, r)
            client_states.update((name, pending[name]) for name in stack.sites)
            w = stack.weights
            loss = float(stack.metrics["loss"] @ w / w.sum()) if "loss" in stack.metrics else float("nan")
            names = stack.sites
        evaluation = None
        if evaluate is not None and eval_every and ((r + 1) % eval_every == 0 or r == rounds - 1):
            evaluation = evaluate(params)
        history.append(
            RoundRecord(r, names, loss, boundary.bytes_sent - bytes_before, report, evaluation, rejected, skipped)
        )
    personal = {}
    if algorithm.personalize is not None:
        message = algorithm.broadcast(server_state) if algorithm.broadcast else {}
        for i, site in enumerate(sites):
            personal[site.name] = algorithm.personalize(
                params, site, site_training[i], client_states[site.name], rng.child(rounds, 2, site_keys[i]), **message
            )
    return FederatedRun(params, history, client_states, server_state, personal)
