"""The settings and methods of the survey's experiment (§6.3), by name.

Each has a lowercase ``name`` used in configs and on the command line, and a display
name used in tables and in the ``setting`` field of results. Centralized settings
(``cross``, ``single``, ``mix``) are run by the harness with the client's gradient descent;
federated methods are a client rule and a server aggregator handed to the engine.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from medfed.client.local import fedprox_update, fedsgd_gradient, local_sgd_update
from medfed.client.reporting import with_round_report
from medfed.engine.loop import FederatedAlgorithm
from medfed.errors import ConfigError
from medfed.experiments.client_methods import CLIENT_METHODS
from medfed.experiments.config import PipelineSpec
from medfed.experiments.image_methods import IMAGE_METHODS
from medfed.experiments.server_methods import SERVER_METHODS
from medfed.experiments.spec import MethodSpec, OptionValue, check_number
from medfed.server.aggregate import apply_delta, chain, gradient_step, weighted_mean
from medfed.server.steps import build_pipeline


def _fedavg(opts, training, context):
    return FederatedAlgorithm("fedavg", local_sgd_update, chain(weighted_mean(), apply_delta()))


def _fedprox(opts, training, context):
    rule = functools.partial(fedprox_update, mu=check_number("fedprox", "mu", opts["mu"], low=0.0))
    return FederatedAlgorithm("fedprox", rule, chain(weighted_mean(), apply_delta()))


def _fedsgd(opts, training, context):
    lr = check_number("fedsgd", "server_lr", opts["server_lr"], low=0.0) or training.lr
    return FederatedAlgorithm("fedsgd", fedsgd_gradient, chain(weighted_mean(), gradient_step(lr)))


_SURVEY_EXPERIMENT = [
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
        rounds=lambda t: t.rounds * t.local_steps, uploads="gradient", flags=("server_lr",),
    ),
    MethodSpec(
        "fedprox", "FedProx", "federated",
        "FedAvg with a proximal term (mu/2)||w - w_global||^2 in the local objective",
        "Li et al., 2020", defaults={"mu": 0.1}, build=_fedprox, uploads="delta", flags=("mu",),
    ),
]

METHODS: dict[str, MethodSpec] = {
    m.name: m for m in [*_SURVEY_EXPERIMENT, *SERVER_METHODS, *CLIENT_METHODS, *IMAGE_METHODS]
}
"""Every setting and method by its config/CLI name: the survey's experiment (§6), then the
server end (§3.3) and the client end (§3.2)."""


def coerce_option(method: str, key: str, value: Any, default: OptionValue) -> OptionValue:
    """Cast a configured option to its default's type, or say what the option takes."""
    where = f"method {method!r} option {key!r}"
    if isinstance(default, dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} takes a table of site name = number, got {value!r}")
        out = {}
        for site, number in value.items():
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                raise ConfigError(f"{where}: site {site!r} has {number!r}; a number is required")
            out[str(site)] = float(number)
        return out
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} takes true or false, got {value!r}")
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where} takes a string, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where} takes a number, got {value!r}")
    if isinstance(default, int):
        if float(value) != int(value):
            raise ConfigError(f"{where} takes a whole number, got {value!r}")
        return int(value)
    return float(value)


def pipeline_method(name: str, pipeline: PipelineSpec) -> MethodSpec:
    """A method from a pipeline listed in the config (``[pipelines.NAME]``)."""
    where = f"pipelines.{name}"
    build_pipeline(pipeline.steps, where)  # fail at resolution, not in the middle of a run
    uses_fusion = any(
        (s if isinstance(s, str) else s.get("step")) == "dynamic_fusion" for s in pipeline.steps
    )

    def build(opts, training, context):
        rule = functools.partial(fedprox_update, mu=pipeline.mu) if pipeline.client == "fedprox" else local_sgd_update
        if uses_fusion:
            rule = with_round_report(rule, {}, jitter=0.5)
        return FederatedAlgorithm(name, rule, build_pipeline(pipeline.steps, where))

    steps = " -> ".join(s if isinstance(s, str) else s["step"] for s in pipeline.steps)
    return MethodSpec(
        name, pipeline.display or name, "federated", f"{pipeline.client} client; server: {steps}",
        "pipeline from the config", build=build, uploads="delta", family="config pipelines",
    )


def resolve_methods(
    names: list[str],
    options: Mapping[str, Mapping[str, Any]],
    pipelines: Mapping[str, PipelineSpec] | None = None,
) -> list[tuple[MethodSpec, dict]]:
    """Look up names (registered methods, then the config's pipelines) and merge options over
    defaults, rejecting unknown names and options."""
    pipelines = pipelines or {}
    clash = sorted({n.lower() for n in pipelines} & set(METHODS))
    if clash:
        raise ConfigError(f"pipelines {clash} reuse a method's name; give the pipeline another name")
    known = {**METHODS, **{n.lower(): pipeline_method(n, p) for n, p in pipelines.items()}}
    out = []
    seen = set()
    for raw in names:
        name = raw.strip().lower()
        if name not in known:
            raise ConfigError(f"unknown method {raw!r}; available: {', '.join(known)}")
        if name in seen:
            raise ConfigError(f"method {name!r} is listed twice")
        seen.add(name)
        spec = known[name]
        opts = dict(spec.defaults)
        for key, value in options.get(name, {}).items():
            if key not in spec.defaults:
                allowed = ", ".join(spec.defaults) or "none"
                raise ConfigError(f"method {name!r} has no option {key!r}; its options: {allowed}")
            opts[key] = coerce_option(name, key, value, spec.defaults[key])
        out.append((spec, opts))
    for name in options:
        if name not in known:
            raise ConfigError(f"method_options names unknown method {name!r}; available: {', '.join(METHODS)}")
        if name not in seen:  # as for a flag (--mu) that no method run takes: an option must not be ignored
            raise ConfigError(
                f"[method_options.{name}] sets options of {name!r}, which is not among the methods run "
                f"({', '.join(seen)}); add {name!r} to the methods (--methods) or remove its options"
            )
    return out
