"""What a method is: names, reference, an option schema declared once, how to build it.

Kept apart from the registry (:mod:`medfed.methods.registry`) so that each family of
methods can declare its methods in its own module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from medfed.engine.loop import FederatedAlgorithm
from medfed.errors import ConfigError
from medfed.methods.options import Option, OptionValue, defaults, validate
from medfed.models.registry import MODEL_OPTIONS


class Training(Protocol):
    """The training settings a method's build may read (the experiment's ``TrainingSpec`` is
    one); passed in, so that a method never imports the experiment layer above it."""

    @property
    def rounds(self) -> int: ...

    @property
    def local_steps(self) -> int: ...

    @property
    def lr(self) -> float: ...


@dataclass(frozen=True)
class BuildContext:
    """What a method may know when it is built: the training sites' names, in order; what
    the setup exchange shares about each site (its label counts, for FedSLD; its example
    count, for weighting by examples); and the sites' local optimizer (``"sgd"`` or
    ``"adam"``), which methods whose server rule assumes plain SGD steps check."""

    site_names: tuple[str, ...]
    seed: int = 0
    label_counts: Mapping[str, tuple[float, ...]] | None = None
    site_sizes: Mapping[str, float] | None = None
    optimizer: str = "sgd"
    teacher: Any = None  # a distilling method's teacher (medfed.client.distill.Teacher), loaded by the caller


@dataclass(frozen=True)
class Method:
    """A setting of the experiment, by name.

    ``options`` is the method's option schema, declared once (:class:`~medfed.methods.options.Option`);
    :meth:`validate` checks given options against it when the study is built, and
    ``build(options, training, context)`` receives only what :meth:`validate` returned and
    returns the engine's :class:`FederatedAlgorithm`. ``check(options)``, when given, says what
    is wrong between options (or None). ``personal`` says the method also produces a personal
    model per site, reported next to the global one. ``caveat(options)``, when given, returns
    what a reader must know about the numbers the method produces under those options (e.g. a
    reading that cannot learn a parameter's sign), or None; results carry it and the table
    shows it as a note on the method's rows. ``unlabeled`` says the method learns from the sites'
    unlabeled training rows (``LocalData.X_unlabeled``); every other method leaves them out. A
    method whose options switch that (distill's ``unlabeled``) gives a callable of its options;
    ask :meth:`uses_unlabeled`.
    ``pretrain``, when given, builds a phase the harness runs before this method's own rounds.
    """

    name: str
    display: str
    kind: Literal["centralized", "federated"]
    summary: str
    reference: str
    options: tuple[Option, ...] = ()
    build: Callable[[Mapping[str, Any], Training, BuildContext], FederatedAlgorithm] | None = None
    rounds: Callable[[Training], int] = lambda t: t.rounds
    uploads: str = ""  # what a site sends: "delta", "gradient" or "params"; "" for centralized settings
    personal: bool = False
    global_model: bool = True  # False: the shared part alone is no model (FedBN, FedPer); only personal rows
    family: str = "survey §6"  # where the method sits in the survey: §6 experiment, §3.2 client end, §3.3 server end
    caveat: Callable[[Mapping[str, Any]], str | None] | None = None
    check: Callable[[Mapping[str, Any]], str | None] | None = None
    # the targets the method can train (medfed.data.tasks): refused at build time for others
    tasks: tuple[str, ...] = ("binary", "multiclass", "regression", "multilabel", "segmentation")
    unlabeled: bool | Callable[[Mapping[str, Any]], bool] = False
    # a first federated run whose final model starts this one (contrastive pretraining):
    # ``pretrain(options, training, context) -> Pretraining`` (medfed.methods.contrastive)
    pretrain: Callable[[Mapping[str, Any], Training, BuildContext], Any] | None = None

    @property
    def defaults(self) -> dict[str, OptionValue]:
        return defaults(self.options)

    @property
    def flags(self) -> tuple[str, ...]:
        """The names of the options that are also command-line flags."""
        return tuple(o.name for o in self.options if o.flag)

    def uses_unlabeled(self, options: Mapping[str, Any]) -> bool:
        """Whether the method, under these (validated) options, learns from the unlabeled rows."""
        return bool(self.unlabeled(options) if callable(self.unlabeled) else self.unlabeled)

    def validate(self, options: Mapping[str, Any]) -> dict[str, OptionValue]:
        """Every option of the method, ``options`` checked and cast, defaults for the rest; one
        ConfigError naming the method, the option and what it takes otherwise."""
        return validate(f"method {self.name!r}", self.options, options, self.check)


def local_optimizer(model: str = "logistic", model_options: Mapping[str, Any] | None = None) -> str:
    """The optimizer a site's local steps use with ``model`` and its options: the option
    ``optimizer`` where the model has one (torch models), else ``"sgd"`` (the numpy model's
    plain gradient descent)."""
    return str({"optimizer": "sgd", **MODEL_OPTIONS.get(model, {}), **(model_options or {})}["optimizer"])


def context_for(
    site_names: Sequence[str],
    seed: int = 0,
    label_counts: Mapping[str, tuple[float, ...]] | None = None,
    *,
    model: str = "logistic",
    model_options: Mapping[str, Any] | None = None,
    teacher: Any = None,
) -> BuildContext:
    """The build context for these training sites. Label counts shared at setup also give
    each site's example count (their sum); ``model`` and its options give the local optimizer."""
    sizes = None if label_counts is None else {site: float(sum(c)) for site, c in label_counts.items()}
    return BuildContext(tuple(site_names), seed, label_counts, sizes, local_optimizer(model, model_options), teacher)


def require_sgd(method: str, context: BuildContext, rule: str) -> None:
    """Refuse to build ``method`` when the sites' local optimizer is not plain SGD.

    ``rule`` names the part of the method that holds only for SGD steps; the message gives the fix.
    """
    if context.optimizer != "sgd":
        raise ConfigError(
            f"method {method!r} assumes plain SGD local steps ({rule}), but the model's local optimizer is "
            f"{context.optimizer!r}; use --model-option optimizer=sgd (model_options.optimizer = \"sgd\")"
        )
