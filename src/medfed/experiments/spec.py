"""What the experiment layer knows about a method: names, reference, options, how to build it.

Kept apart from the registry (:mod:`medfed.experiments.methods`) so that each family of
methods can declare its specs in its own module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from medfed.engine.loop import FederatedAlgorithm
from medfed.errors import ConfigError
from medfed.experiments.config import TrainingSpec

OptionValue = float | int | bool | str | dict[str, float]


@dataclass(frozen=True)
class BuildContext:
    """What a method may know when it is built: the training sites' names, in order, and
    (for methods that share them at setup, such as FedSLD) each site's label counts."""

    site_names: tuple[str, ...]
    seed: int = 0
    label_counts: Mapping[str, tuple[float, float]] | None = None


@dataclass(frozen=True)
class MethodSpec:
    """A setting of the experiment, by name.

    ``defaults`` fixes each option's type: a float, int, bool or str, or a dict (site name ->
    number) for per-site profiles. ``build(opts, training, context)`` returns the engine's
    :class:`FederatedAlgorithm`. ``personal`` says the method also produces a personal model
    per site, reported next to the global one. ``caveat(opts)``, when given, returns what a
    reader must know about the numbers the method produces under those options (e.g. a
    reading that cannot learn a parameter's sign), or None; results carry it and the table
    shows it as a note on the method's rows.
    """

    name: str
    display: str
    kind: Literal["centralized", "federated"]
    summary: str
    reference: str
    defaults: Mapping[str, OptionValue] = field(default_factory=dict)
    build: Callable[[Mapping[str, Any], TrainingSpec, BuildContext], FederatedAlgorithm] | None = None
    rounds: Callable[[TrainingSpec], int] = lambda t: t.rounds
    uploads: str = ""  # what a site sends: "delta", "gradient" or "params"; "" for centralized settings
    personal: bool = False
    global_model: bool = True  # False: the shared part alone is no model (FedBN, FedPer); only personal rows
    family: str = "survey §6"  # where the method sits in the survey: §6 experiment, §3.2 client end, §3.3 server end
    flags: Sequence[str] = ()  # option names that are also command-line flags
    caveat: Callable[[Mapping[str, Any]], str | None] | None = None


def context_for(
    site_names: Sequence[str], seed: int = 0, label_counts: Mapping[str, tuple[float, float]] | None = None
) -> BuildContext:
    return BuildContext(tuple(site_names), seed, label_counts)


def check_number(method: str, key: str, value: Any, *, low: float, high: float | None = None,
                 low_open: bool = False, whole: bool = False) -> float:
    """A finite number in the allowed range, or a ConfigError saying what the option takes."""
    import math

    above = f"> {low:g}" if low_open else f">= {low:g}"
    allowed = f"{'a whole number' if whole else 'a number'} {above}" + (f" and <= {high:g}" if high is not None else "")
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (high is None or value <= high)
    ok = ok and (not whole or float(value) == int(value))
    if not ok:
        raise ConfigError(f"method {method!r} option {key!r} must be {allowed}, got {value!r}")
    return int(value) if whole else float(value)
