"""The settings and methods of the survey's experiment (§6.3), by name.

Each has a lowercase ``name`` used in configs and on the command line, and a display
name used in tables and in the ``setting`` field of results. Centralized settings
(``cross``, ``single``, ``mix``) are run by the harness with the client's gradient descent;
federated methods are a client rule and a server aggregator handed to the engine.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from medfed.client.local import fedprox_update, fedsgd_gradient, local_sgd_update
from medfed.engine.loop import FederatedAlgorithm
from medfed.errors import ConfigError
from medfed.experiments.config import TrainingSpec
from medfed.server.aggregate import apply_delta, chain, gradient_step, weighted_mean


@dataclass(frozen=True)
class MethodSpec:
    name: str
    display: str
    kind: Literal["centralized", "federated"]
    summary: str
    reference: str
    defaults: Mapping[str, float] = field(default_factory=dict)
    build: Callable[[Mapping[str, float], TrainingSpec], FederatedAlgorithm] | None = None
    rounds: Callable[[TrainingSpec], int] = lambda t: t.rounds
    uploads: str = ""  # what a site sends: "delta", "gradient" or "params"; "" for centralized settings


def _fedavg(opts, training):
    return FederatedAlgorithm("fedavg", local_sgd_update, chain(weighted_mean(), apply_delta()))


def _fedprox(opts, training):
    rule = functools.partial(fedprox_update, mu=opts["mu"])
    return FederatedAlgorithm("fedprox", rule, chain(weighted_mean(), apply_delta()))


def _fedsgd(opts, training):
    lr = opts.get("server_lr") or training.lr
    return FederatedAlgorithm("fedsgd", fedsgd_gradient, chain(weighted_mean(), gradient_step(lr)))


METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in [
        MethodSpec(
            "cross", "Cross", "centralized",
            "train on one site, test on each other site (domain shift baseline)", "survey §6.3 (1)",
        ),
        MethodSpec(
            "single", "Single", "centralized",
            "train and test within each site separately", "survey §6.3 (2)",
        ),
        MethodSpec(
            "mix", "Mix", "centralized",
            "pool all sites' training rows (no privacy): the centralized upper bound", "survey §6.3 (3)",
        ),
        MethodSpec(
            "fedavg", "FedAvg", "federated",
            "local iterations from the global model; server averages deltas weighted by examples",
            "McMahan et al., 2017", build=_fedavg, uploads="delta",
        ),
        MethodSpec(
            "fedsgd", "FedSGD", "federated",
            "sites send gradients at the global model; server averages and steps "
            "(local_steps such exchanges per round; server_lr 0 = the training lr)",
            "McMahan et al., 2017", defaults={"server_lr": 0.0}, build=_fedsgd,
            rounds=lambda t: t.rounds * t.local_steps, uploads="gradient",
        ),
        MethodSpec(
            "fedprox", "FedProx", "federated",
            "FedAvg with a proximal term (mu/2)||w - w_global||^2 in the local objective",
            "Li et al., 2020", defaults={"mu": 0.1}, build=_fedprox, uploads="delta",
        ),
    ]
}


def resolve_methods(names: list[str], options: Mapping[str, Mapping[str, float]]) -> list[tuple[MethodSpec, dict]]:
    """Look up names and merge options over defaults, rejecting unknown names and options."""
    out = []
    seen = set()
    for raw in names:
        name = raw.strip().lower()
        if name not in METHODS:
            raise ConfigError(f"unknown method {raw!r}; available: {', '.join(METHODS)}")
        if name in seen:
            raise ConfigError(f"method {name!r} is listed twice")
        seen.add(name)
        spec = METHODS[name]
        opts = dict(spec.defaults)
        for key, value in options.get(name, {}).items():
            if key not in spec.defaults:
                allowed = ", ".join(spec.defaults) or "none"
                raise ConfigError(f"method {name!r} has no option {key!r}; its options: {allowed}")
            opts[key] = float(value)
        out.append((spec, opts))
    for name in options:
        if name not in METHODS:
            raise ConfigError(f"method_options names unknown method {name!r}; available: {', '.join(METHODS)}")
    return out
