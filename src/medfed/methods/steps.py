"""Aggregation steps by name, with their options declared once, so a config file can list a
pipeline of them.

A pipeline is one *reducing* step (stacked uploads -> one update), then any number of
*update* steps (update -> update, e.g. a server optimizer), then the step that applies the
update to the global model (``apply_delta``, added when the list does not end with it)::

    [pipelines.robust_adam]
    steps = [{step = "trimmed_mean", beta = 0.2}, {step = "server_adam", lr = 0.01}]

Each step's options mirror its factory in :mod:`medfed.server` (names and defaults; a test
keeps them equal) and carry the allowed values, which the factories no longer check: the
methods built on a step (FedAdam on ``server_adam``, Krum on ``krum``) take their options
from here, so a hyperparameter is declared once whether a method or a pipeline sets it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from medfed.errors import ConfigError
from medfed.methods.options import Option, Range, above, at_least, choice, closed, number, validate, whole
from medfed.server import fourier, optimizers, robust, weighting
from medfed.server.aggregate import Aggregator, apply_delta, chain, weighted_mean
from medfed.server.fusion import dynamic_fusion

UNIT_OPEN = Range(0.0, 1.0, high_open=True)  # decay rates: [0, 1)
SHARE = Range(0.0, 1.0, low_open=True)  # a share of each kernel axis' frequencies: (0, 1]

LR = number("lr", 1.0, "server learning rate", range=above(0))
BETA1 = number("beta1", 0.9, "first-moment decay", range=UNIT_OPEN)
BETA2 = number("beta2", 0.99, "second-moment decay", range=UNIT_OPEN)
TAU = number("tau", 1e-9, "adaptivity: added to the root of the second moment", range=above(0))
INITIAL_V = number("initial_v", 0.0, "the second moment's start (the paper: tau**2)", range=at_least(0))
F = whole("f", 1, "the number of corrupted sites tolerated", range=at_least(0))
TEMPERATURE = number("temperature", 1.0, "softmax temperature of the weights", range=above(0))
START = number("start", 0.7, "shared share of each kernel axis' frequencies at the first round", range=SHARE)
END = number("end", 0.95, "shared share of each kernel axis' frequencies at the last round", range=SHARE)

# The methods' name for a server step's learning rate; --server-lr sets it for every method run.
SERVER_LR = LR.but(name="server_lr", flag="--server-lr")


def fourier_order(options: Mapping[str, Any]) -> str | None:
    """PFA's share only grows over the rounds."""
    if options["start"] > options["end"]:
        return f"start ({options['start']:g}) must not exceed end ({options['end']:g}): the shared share only grows"
    return None


@dataclass(frozen=True)
class Step:
    """A server step a pipeline may list: its factory, its role in the chain, its options."""

    factory: Callable[..., Aggregator]
    role: Literal["reduce", "update", "final"]
    options: tuple[Option, ...] = ()
    check: Callable[[Mapping[str, Any]], str | None] | None = None

    def option(self, name: str) -> Option:
        return next(o for o in self.options if o.name == name)


STEPS: dict[str, Step] = {
    "weighted_mean": Step(weighted_mean, "reduce"),
    "loss_weighted": Step(weighting.loss_weighted, "reduce", (
        TEMPERATURE.but(default=weighting.LOSS_WEIGHTED_TEMPERATURE, help="T of n_k exp(-loss_k / T)"),)),
    "fair": Step(weighting.fair, "reduce", (
        number("q", 1.0, "fairness exponent; 0 = FedAvg", range=at_least(0)),
        LR.but(default=0.1, help="the sites' learning rate (L = 1/lr)"),
        choice("weighting", "examples", weighting.FAIR_WEIGHTINGS, "site weights p_k: by examples or uniform"),
        number("loss_offset", 0.0, "added to each site's loss (Flower: 1e-10)", range=at_least(0)),
    )),
    "fourier": Step(fourier.fourier, "reduce", (
        START, END, whole("rounds", 1, "rounds over which the share grows from start to end", range=at_least(1)),
    ), fourier_order),
    "guided": Step(weighting.guided, "reduce", (
        choice("rule", "agreement", weighting.GUIDED_RULES, "agreement of the sites' signs, or the positive part"),
        number("agreement", 1.0, "weighted share of sites that must not oppose a component", range=closed(0, 1)),
    )),
    "dynamic_fusion": Step(dynamic_fusion, "reduce", (
        number("deadline", math.inf, "seconds a site may take (inf = no deadline)", range=Range(0, math.inf, True)),
        number("bar", 0.0, "the local accuracy a site must reach", range=closed(0, 1)),
    )),
    "median": Step(robust.median, "reduce"),
    "trimmed_mean": Step(robust.trimmed_mean, "reduce", (
        number("beta", 0.1, "fraction trimmed at each end", range=Range(0.0, 0.5, high_open=True)),)),
    "krum": Step(robust.krum, "reduce", (F,)),
    "multikrum": Step(robust.multikrum, "reduce", (
        F, whole("m", 0, "updates averaged (0 = K - f)", range=at_least(0)))),
    "bulyan": Step(robust.bulyan, "reduce", (F,)),
    "dos": Step(robust.dos, "reduce", (TEMPERATURE,)),
    "server_momentum": Step(optimizers.server_momentum, "update", (
        LR, number("momentum", 0.0, "heavy-ball momentum", range=UNIT_OPEN))),
    "server_adam": Step(optimizers.server_adam, "update", (
        LR.but(default=0.1), BETA1, BETA2, TAU,
        choice("bias_correction", "flower", optimizers.BIAS_CORRECTIONS, "Flower's, Kingma & Ba's or none"),
        INITIAL_V,
    )),
    "server_yogi": Step(optimizers.server_yogi, "update", (LR.but(default=0.01), BETA1, BETA2, TAU.but(default=1e-3),
                                                           INITIAL_V)),
    "server_adagrad": Step(optimizers.server_adagrad, "update", (
        LR.but(default=0.1), TAU, BETA1.but(default=0.0, help="first-moment decay (Flower: 0)"), INITIAL_V)),
    "apply_delta": Step(apply_delta, "final", (LR.but(help="scale of the update added to the model"),)),
}
REDUCING_STEPS = {name: s for name, s in STEPS.items() if s.role == "reduce"}
UPDATE_STEPS = {name: s for name, s in STEPS.items() if s.role == "update"}
FINAL_STEPS = {name: s for name, s in STEPS.items() if s.role == "final"}


def build_step(entry: str | Mapping[str, Any], where: str = "pipeline") -> tuple[str, Aggregator]:
    """One step from ``"name"`` or ``{step = "name", option = value, ...}``."""
    if isinstance(entry, str):
        name, given = entry, {}
    elif isinstance(entry, Mapping) and isinstance(entry.get("step"), str):
        name, given = entry["step"], {k: v for k, v in entry.items() if k != "step"}
    else:
        raise ConfigError(f"{where}: a step is a name or a table with step = \"name\", got {entry!r}")
    if name not in STEPS:
        raise ConfigError(f"{where}: unknown step {name!r}; steps: {', '.join(STEPS)}")
    step = STEPS[name]
    return name, step.factory(**validate(f"{where}: step {name!r}", step.options, given, step.check))


def build_pipeline(entries: Sequence[str | Mapping[str, Any]], where: str = "pipeline") -> Aggregator:
    """A chain from a list of steps, checked for shape: reduce, update*, apply_delta."""
    if not entries:
        raise ConfigError(f"{where}: steps is empty; start with a reducing step ({', '.join(REDUCING_STEPS)})")
    built = [build_step(e, where) for e in entries]
    names = [n for n, _ in built]
    if names[0] not in REDUCING_STEPS:
        raise ConfigError(
            f"{where}: the first step must reduce the sites' uploads to one ({', '.join(REDUCING_STEPS)}), "
            f"got {names[0]!r}"
        )
    for i, n in enumerate(names[1:], 1):
        if n in REDUCING_STEPS:
            raise ConfigError(f"{where}: step {i + 1} ({n!r}) reduces uploads, but they were reduced by step 1")
        if n in FINAL_STEPS and i != len(names) - 1:
            raise ConfigError(f"{where}: {n!r} applies the update to the model and must be the last step")
    steps = [a for _, a in built]
    if names[-1] not in FINAL_STEPS:
        steps.append(apply_delta())
    return chain(*steps)
