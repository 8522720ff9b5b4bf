"""Every setting and method by name, the config's pipelines, and the command-line flags
their options declare.

Each has a lowercase ``name`` used in configs and on the command line, and a display
name used in tables and in the ``setting`` field of results. Centralized settings
(``cross``, ``single``, ``mix``) are run by the harness with the client's gradient descent;
federated methods are a client rule and a server aggregator handed to the engine.
:func:`resolve` finds a method from its name and options alone, so a site with no
experiment config builds the same method as the coordinator.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from medfed.client.local import fedprox_update, local_sgd_update
from medfed.client.reporting import with_round_report
from medfed.engine.loop import FederatedAlgorithm
from medfed.errors import ConfigError
from medfed.methods.client_end import CLIENT_METHODS
from medfed.methods.contrastive import CONTRASTIVE
from medfed.methods.images import IMAGE_METHODS
from medfed.methods.method import Method
from medfed.methods.multitask import MULTITASK
from medfed.methods.options import OptionValue
from medfed.methods.server_end import SERVER_METHODS
from medfed.methods.steps import build_pipeline
from medfed.methods.survey import SURVEY_EXPERIMENT

METHODS: dict[str, Method] = {
    m.name: m for m in [*SURVEY_EXPERIMENT, *SERVER_METHODS, *CLIENT_METHODS, *IMAGE_METHODS, MULTITASK, CONTRASTIVE]
}
"""Every setting and method by its config/CLI name: the survey's experiment (§6), then the
server end (§3.3) and the client end (§3.2)."""


@dataclass(frozen=True)
class MethodFlag:
    """A command-line flag (``--server-lr``) that sets option ``option`` of every method run
    that declares it; ``help`` is the option's general meaning, ``methods`` who declares it."""

    flag: str
    option: str
    type: Literal["float", "int", "str"]
    help: str
    methods: tuple[str, ...]


def _method_flags(methods: Sequence[Method]) -> dict[str, MethodFlag]:
    """The flags the methods' options declare, by option name; a flag must mean one option of
    one type everywhere, so that one command-line flag can set it for every method."""
    found: dict[str, MethodFlag] = {}
    for m in methods:
        for o in m.options:
            if not o.flag:
                continue
            if o.type not in ("float", "int", "str"):
                raise TypeError(f"method {m.name!r} option {o.name!r}: only numbers and strings are flags, not {o.type}")
            seen = found.get(o.name)
            if seen is None:
                clash = next((f for f in found.values() if f.flag == o.flag), None)
                if clash is not None:
                    raise TypeError(f"{o.flag} is declared for options {clash.option!r} and {o.name!r}")
                found[o.name] = MethodFlag(o.flag, o.name, o.type, o.help.split(";")[0], (m.name,))
            elif (seen.flag, seen.type) != (o.flag, o.type):
                raise TypeError(f"method {m.name!r} declares option {o.name!r} as {o.flag} ({o.type}), "
                                f"others as {seen.flag} ({seen.type})")
            else:
                found[o.name] = MethodFlag(seen.flag, o.name, o.type, seen.help, (*seen.methods, m.name))
    return found


METHOD_FLAGS: dict[str, MethodFlag] = _method_flags(list(METHODS.values()))
"""Option name -> the command-line flag that sets it (``mu`` -> ``--mu``), from the options' schemas."""


class Pipeline(Protocol):
    """A server pipeline as the config lists it (the experiment's ``PipelineSpec`` is one)."""

    @property
    def steps(self) -> Sequence[str | Mapping[str, Any]]: ...

    @property
    def client(self) -> str: ...

    @property
    def mu(self) -> float: ...

    @property
    def display(self) -> str | None: ...


# a pipeline's own clients; any other client is a registered client-end method (pipeline_client)
PIPELINE_RULES = ("fedavg", "fedprox")
FEDAVG_SERVER = ["weighted_mean", "apply_delta"]
CLIENT_END = "survey §3.2"


def pipeline_client(name: str, pipeline: Pipeline) -> Method | None:
    """The registered method whose site rule a pipeline's ``client`` names (None: FedAvg's or
    FedProx's local SGD, the pipeline's own ``mu``). It must be a federated method that uploads a
    delta and runs no phase of its own (a client-end method, survey §3.2: a server-end one is a
    server, which the pipeline's steps replace); that its server is FedAvg's is checked when it is built."""
    client = str(pipeline.client).strip().lower()
    if client in PIPELINE_RULES:
        return None
    method = METHODS.get(client)
    usable = [m.name for m in METHODS.values() if m.family == CLIENT_END and m.uploads == "delta" and m.pretrain is None]
    if method is None or method.name not in usable:
        raise ConfigError(f"pipelines.{name}: client {pipeline.client!r} is not a site rule a pipeline can run; "
                          f"allowed: {', '.join(dict.fromkeys([*PIPELINE_RULES, *usable]))}")
    return method


def _client_rule(name: str, client: Method, algorithm: FederatedAlgorithm) -> FederatedAlgorithm:
    """``algorithm``'s site half, refused when its server is not FedAvg's: a server that sends
    the sites state (SCAFFOLD's control variate) or weighs their uploads its own way is part of
    the method, and a pipeline's steps would replace it."""
    steps = [s.name for s in getattr(algorithm.aggregator, "steps", ())] or [algorithm.aggregator.name]
    if algorithm.broadcast is not None or steps != FEDAVG_SERVER:
        raise ConfigError(f"pipelines.{name}: client {client.name!r} needs its own server ({' -> '.join(steps)}"
                          f"{', with a broadcast' if algorithm.broadcast is not None else ''}); a pipeline replaces "
                          "the server, so use a client whose server is FedAvg's")
    return algorithm


def pipeline_method(name: str, pipeline: Pipeline) -> Method:
    """A method from a pipeline listed in the config (``[pipelines.NAME]``): its server steps
    after a site rule, FedAvg's or FedProx's local SGD or any client-end method's
    (``client = "semisupervised"``), whose option schema, tasks and capabilities it takes on
    (its options are set as the pipeline's: ``[method_options.NAME]``)."""
    where = f"pipelines.{name}"
    build_pipeline(pipeline.steps, where)  # fail at resolution, not in the middle of a run
    client = pipeline_client(name, pipeline)
    uses_fusion = any(
        (s if isinstance(s, str) else s.get("step")) == "dynamic_fusion" for s in pipeline.steps
    )

    def build(opts, training, context):
        if client is not None:
            algorithm = _client_rule(name, client, client.build(opts, training, context))
            rule = algorithm.local_update
        else:
            algorithm = None
            rule = functools.partial(fedprox_update, mu=pipeline.mu) if pipeline.client == "fedprox" else local_sgd_update
        if uses_fusion:
            rule = with_round_report(rule, {}, jitter=0.5)
        server = build_pipeline(pipeline.steps, where)
        if algorithm is None:
            return FederatedAlgorithm(name, rule, server)
        return dataclasses.replace(algorithm, name=name, local_update=rule, aggregator=server)

    steps = " -> ".join(s if isinstance(s, str) else s["step"] for s in pipeline.steps)
    summary = f"{pipeline.client} client; server: {steps}"
    if client is None:
        return Method(name, pipeline.display or name, "federated", summary, "pipeline from the config", build=build,
                      uploads="delta", family="config pipelines")
    return Method(
        name, pipeline.display or name, "federated", summary, f"pipeline from the config; client: {client.reference}",
        options=client.options, build=build, uploads="delta", personal=client.personal,
        global_model=client.global_model, family="config pipelines", caveat=client.caveat, check=client.check,
        tasks=client.tasks, unlabeled=client.unlabeled,
    )


def _known(pipelines: Mapping[str, Pipeline] | None) -> dict[str, Method]:
    """The registered methods and the config's pipelines, by lowercase name."""
    pipelines = pipelines or {}
    clash = sorted({n.lower() for n in pipelines} & set(METHODS))
    if clash:
        raise ConfigError(f"pipelines {clash} reuse a method's name; give the pipeline another name")
    return {**METHODS, **{n.lower(): pipeline_method(n, p) for n, p in pipelines.items()}}


def _lookup(known: Mapping[str, Method], raw: str) -> tuple[str, Method]:
    """The lowercase name a config keys ``raw``'s options by, and the method."""
    name = raw.strip().lower()
    if name not in known:
        raise ConfigError(f"unknown method {raw!r}; available: {', '.join(known)}")
    return name, known[name]


def resolve(
    name: str, options: Mapping[str, Any] | None = None, pipelines: Mapping[str, Pipeline] | None = None
) -> tuple[Method, dict[str, OptionValue]]:
    """The method called ``name`` (a registered one, or one of ``pipelines``) and its options,
    checked and completed with defaults: all a site needs to build the same method as the
    coordinator, with no experiment config."""
    _, method = _lookup(_known(pipelines), name)
    return method, method.validate(options or {})


def resolve_methods(
    names: list[str],
    options: Mapping[str, Mapping[str, Any]],
    pipelines: Mapping[str, Pipeline] | None = None,
) -> list[tuple[Method, dict]]:
    """Look up names (registered methods, then the config's pipelines) and check each one's
    options against its schema, rejecting unknown names and options and methods named twice."""
    known = _known(pipelines)
    out = []
    seen = set()
    for raw in names:
        name, method = _lookup(known, raw)
        if name in seen:
            raise ConfigError(f"method {name!r} is listed twice")
        seen.add(name)
        out.append((method, method.validate(options.get(name, {}))))
    for name in options:
        if name not in known:
            raise ConfigError(f"method_options names unknown method {name!r}; available: {', '.join(METHODS)}")
        if name not in seen:  # as for a flag (--mu) that no method run takes: an option must not be ignored
            raise ConfigError(
                f"[method_options.{name}] sets options of {name!r}, which is not among the methods run "
                f"({', '.join(seen)}); add {name!r} to the methods (--methods) or remove its options"
            )
    return out
