"""Aggregation steps by name, so a config file can list a pipeline of them.

A pipeline is one *reducing* step (stacked uploads -> one update), then any number of
*update* steps (update -> update, e.g. a server optimizer), then the step that applies the
update to the global model (``apply_delta``, added when the list does not end with it)::

    [pipelines.robust_adam]
    steps = [{step = "trimmed_mean", beta = 0.2}, {step = "server_adam", lr = 0.01}]
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from medfed.errors import ConfigError
from medfed.server import fourier, optimizers, robust, weighting
from medfed.server.aggregate import Aggregator, apply_delta, chain, weighted_mean
from medfed.server.fusion import dynamic_fusion

REDUCING_STEPS: dict[str, Callable[..., Aggregator]] = {
    "weighted_mean": weighted_mean,
    "loss_weighted": weighting.loss_weighted,
    "fair": weighting.fair,
    "fourier": fourier.fourier,
    "guided": weighting.guided,
    "dynamic_fusion": dynamic_fusion,
    **robust.ROBUST_AGGREGATORS,
}
UPDATE_STEPS: dict[str, Callable[..., Aggregator]] = {
    "server_momentum": optimizers.server_momentum,
    "server_adam": optimizers.server_adam,
    "server_yogi": optimizers.server_yogi,
    "server_adagrad": optimizers.server_adagrad,
}
FINAL_STEPS: dict[str, Callable[..., Aggregator]] = {"apply_delta": apply_delta}
STEPS = {**REDUCING_STEPS, **UPDATE_STEPS, **FINAL_STEPS}


def build_step(entry: str | Mapping[str, Any], where: str = "pipeline") -> tuple[str, Aggregator]:
    """One step from ``"name"`` or ``{step = "name", option = value, ...}``."""
    if isinstance(entry, str):
        name, options = entry, {}
    elif isinstance(entry, Mapping) and isinstance(entry.get("step"), str):
        name, options = entry["step"], {k: v for k, v in entry.items() if k != "step"}
    else:
        raise ConfigError(f"{where}: a step is a name or a table with step = \"name\", got {entry!r}")
    if name not in STEPS:
        raise ConfigError(f"{where}: unknown step {name!r}; steps: {', '.join(STEPS)}")
    factory = STEPS[name]
    accepted = inspect.signature(factory).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"{where}: step {name!r} has no option(s) {unknown}; its options: {', '.join(accepted) or 'none'}"
        )
    try:
        return name, factory(**options)
    except TypeError as exc:  # a value of the wrong type reaching the factory
        raise ConfigError(f"{where}: step {name!r}: {exc}") from None


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
