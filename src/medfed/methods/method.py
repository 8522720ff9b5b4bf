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
from medfed.models.registry import MODEL_OPTIONS

OptionValue = float | int | bool | str | dict[str, float]


@dataclass(frozen=True)
class BuildContext:
    """What a method may know when it is built: the training sites' names, in order; what
    the setup exchange shares about each site (its label counts, for FedSLD; its example
    count, for weighting by examples); and the sites' local optimizer (``"sgd"`` or
    ``"adam"``), which methods whose server rule assumes plain SGD steps check."""

    site_names: tuple[str, ...]
    seed: int = 0
    label_counts: Mapping[str, tuple[float, float]] | None = None
    site_sizes: Mapping[str, float] | None = None
    optimizer: str = "sgd"


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


def local_optimizer(model: str = "logistic", model_options: Mapping[str, Any] | None = None) -> str:
    """The optimizer a site's local steps use with ``model`` and its options: the option
    ``optimizer`` where the model has one (torch models), else ``"sgd"`` (the numpy model's
    plain gradient descent)."""
    return str({"optimizer": "sgd", **MODEL_OPTIONS.get(model, {}), **(model_options or {})}["optimizer"])


def context_for(
    site_names: Sequence[str],
    seed: int = 0,
    label_counts: Mapping[str, tuple[float, float]] | None = None,
    *,
    model: str = "logistic",
    model_options: Mapping[str, Any] | None = None,
) -> BuildContext:
    """The build context for these training sites. Label counts shared at setup also give
    each site's example count (their sum); ``model`` and its options give the local optimizer."""
    sizes = None if label_counts is None else {site: float(sum(c)) for site, c in label_counts.items()}
    return BuildContext(tuple(site_names), seed, label_counts, sizes, local_optimizer(model, model_options))


def require_sgd(method: str, context: BuildContext, rule: str) -> None:
    """Refuse to build ``method`` when the sites' local optimizer is not plain SGD.

    ``rule`` names the part of the method that holds only for SGD steps; the message gives the fix.
    """
    if context.optimizer != "sgd":
        raise ConfigError(
            f"method {method!r} assumes plain SGD local steps ({rule}), but the model's local optimizer is "
            f"{context.optimizer!r}; use --model-option optimizer=sgd (model_options.optimizer = \"sgd\")"
        )


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
