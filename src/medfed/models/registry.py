"""Models by name: the numpy fast path for tables and the torch families for images.

``make_model(name, sample_shape, **options)`` builds one; ``MODELS`` maps each name to its
factory and ``MODEL_OPTIONS`` to its options with their defaults. Torch is imported only
when a torch model is built, so the table path (and ``medfed`` start-up) never loads it.

Parameter naming convention of the torch models (what partial-sharing methods key on; the
predicates below are the one definition of it):

- ``body.{i}.conv.weight`` / ``body.{i}.linear.weight`` (and ``.bias`` when ``norm="none"``):
  block ``i`` of the CNN or MLP;
- ``body.{i}.norm.{weight,bias,running_mean,running_var}``: block ``i``'s BatchNorm or
  GroupNorm (GroupNorm has no running statistics); ``norm.*``: ``torch_logistic``'s
  optional normalization of its input;
- ``head.weight``, ``head.bias``: the final linear layer, the task's outputs (one logit, K
  logits, one value; :class:`~medfed.models.torch_models.Head`);
- the U-Nets (``unet2d``, ``unet3d``, :mod:`medfed.models.unet`): ``body.*`` MONAI's encoder and
  decoder levels with their norm layers named ``...adn.norm.*``, ``head.conv.*`` the last
  (transposed) convolution giving the per-pixel class logits.

The numpy ``logistic`` model's ``weight`` and ``bias`` are neither norm nor head parameters.

**Tasks** (:mod:`medfed.data.tasks`). ``logistic`` is the generalized linear model of the task:
binary logistic regression, for ``multiclass`` the softmax model (``softmax``: the multinomial
generalization, one score per class), for ``regression`` least squares (``linear``: the
identity link instead of the logit) and for ``multilabel`` K independent logistic regressions
(``multilabel_logistic``), all numpy, all with the same L2 and session protocol
(:mod:`medfed.models.glm`); they may be named directly. The torch models train every one of
these tasks with the task's head (softmax, sigmoids or one output) on the same body, scaled as
the numpy model of the task.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from medfed.data.extras import missing_extra
from medfed.errors import ConfigError
from medfed.models.glm import LinearRegression, MultilabelLogistic, SoftmaxRegression
from medfed.models.logistic import LogisticRegression
from medfed.models.losses import RobustLoss, check_task
from medfed.models.robust import ROBUST_GLMS

NORMS = ("batch", "group", "none")
OPTIMIZERS = ("sgd", "adam")
DTYPES = ("float32", "float64")
DEVICES = ("auto", "cpu", "cuda")
NORM_STATISTICS = ("running_mean", "running_var")

_TORCH_COMMON: dict[str, Any] = {
    "optimizer": "sgd", "dtype": "float32", "device": "auto", "eval_batch": 512, "recalibrate": True, "threads": 1,
}

MODEL_OPTIONS: dict[str, dict[str, Any]] = {
    "logistic": {},
    "softmax": {},
    "linear": {},
    "multilabel_logistic": {},
    "torch_logistic": {"norm": "none", **_TORCH_COMMON},
    "mlp": {"norm": "batch", "hidden": (64, 32), **_TORCH_COMMON},
    "cnn2d": {"norm": "batch", "channels": (8, 16, 32), **_TORCH_COMMON},
    "cnn3d": {"norm": "batch", "channels": (4, 8, 16), **_TORCH_COMMON},
    "unet2d": {"norm": "batch", "channels": (8, 16, 32), **_TORCH_COMMON},
    "unet3d": {"norm": "batch", "channels": (4, 8, 16), **_TORCH_COMMON},
}
"""Each model's options and their defaults. ``norm``: normalization after each hidden layer
(``torch_logistic``: of its input); ``hidden``/``channels``: widths of the MLP's/CNN's blocks;
``optimizer``: the local optimizer (a fresh one per ``descend`` call, i.e. per round);
``dtype``: the torch compute type; ``device``: ``auto`` = CUDA when present; ``eval_batch``:
rows per chunk when evaluating; ``threads``: torch's intra-op CPU threads inside the model's
calls. The numbers depend on it (torch's CPU kernels split their sums by thread count, see
:mod:`medfed.models.torch_models`), so it is a model option: the default 1 gives a seed the
same numbers whatever ``torch.set_num_threads`` says; more threads are faster on large images
and reproduce only with the same value on the same kind of machine."""

SAMPLE_DIMS = {"logistic": (1, "feature vectors (d,)"), "softmax": (1, "feature vectors (d,)"),
               "linear": (1, "feature vectors (d,)"), "multilabel_logistic": (1, "feature vectors (d,)"),
               "cnn2d": (3, "2D images (C, H, W)"), "cnn3d": (4, "3D images (C, D, H, W)"),
               "unet2d": (3, "2D images (C, H, W)"), "unet3d": (4, "3D images (C, D, H, W)")}
"""Sample dimensionality a model requires; models not listed take any (they flatten)."""


# --- naming convention ------------------------------------------------------------------


def is_norm(name: str) -> bool:
    """A normalization layer's parameter or statistic (``...norm.weight``, ``norm.running_var``)."""
    return "norm" in name.split(".")[:-1]


def is_norm_statistic(name: str) -> bool:
    """A normalization layer's running mean or variance (BatchNorm's statistics)."""
    return is_norm(name) and name.rsplit(".", 1)[-1] in NORM_STATISTICS


def is_head(name: str) -> bool:
    """A parameter of the final (output) layer."""
    return name.split(".", 1)[0] == "head"


def is_decoder(name: str) -> bool:
    """A parameter of a U-Net's decoder: its up-sampling blocks (``...up.*``) and the head."""
    return is_head(name) or "up" in name.split(".")[:-1]


# --- options ----------------------------------------------------------------------------


def _widths(model: str, key: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, str):
        try:
            value = [int(part) for part in value.split(",") if part.strip()]
        except ValueError:
            value = None
    elif isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    ok = isinstance(value, Sequence) and len(value) > 0 and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value
    )
    if not ok:
        raise ConfigError(f"model {model!r} option {key!r} must be one or more positive whole numbers (e.g. 32,16)")
    return tuple(int(v) for v in value)


def check_options(model: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The model's options with defaults filled in, or a ConfigError naming the option and what it takes."""
    if model not in MODEL_OPTIONS:
        raise ConfigError(f"unknown model {model!r}; available: {', '.join(MODEL_OPTIONS)}")
    defaults = MODEL_OPTIONS[model]
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ConfigError(f"model {model!r} has no option {unknown[0]!r}; its options: {', '.join(defaults) or 'none'}")
    out = {**defaults, **options}
    choices = {"norm": NORMS, "optimizer": OPTIMIZERS, "dtype": DTYPES, "device": DEVICES}
    for key, allowed in choices.items():
        if key in out and out[key] not in allowed:
            raise ConfigError(f"model {model!r} option {key!r} must be one of {', '.join(allowed)}; got {out[key]!r}")
    for key in ("hidden", "channels"):
        if key in out:
            out[key] = _widths(model, key, out[key])
    if "recalibrate" in out and not isinstance(out["recalibrate"], bool):
        raise ConfigError(f"model {model!r} option 'recalibrate' takes true or false, got {out['recalibrate']!r}")
    for key in ("eval_batch", "threads"):
        v = out.get(key, 1)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"model {model!r} option {key!r} must be a positive whole number, got {v!r}")
    return out


def check_sample_shape(model: str, sample_shape: Sequence[int]) -> tuple[int, ...]:
    """``sample_shape`` as a tuple, or a ConfigError when the model cannot take such samples."""
    shape = tuple(int(s) for s in sample_shape)
    if not shape or any(s < 1 for s in shape):
        raise ConfigError(f"model {model!r}: samples of shape {shape} are empty")
    if model in SAMPLE_DIMS:
        dims, what = SAMPLE_DIMS[model]
        if len(shape) != dims:
            fits = [m for m in MODEL_OPTIONS if SAMPLE_DIMS.get(m, (len(shape),))[0] == len(shape)]
            raise ConfigError(
                f"model {model!r} takes {what}; these samples have shape {shape}: choose one of {', '.join(fits)}"
            )
    return shape


# --- factories --------------------------------------------------------------------------


def _logistic(**options: Any) -> LogisticRegression:
    check_options("logistic", options)
    return LogisticRegression()


def _softmax(n_classes: int | None = None, **options: Any) -> SoftmaxRegression:
    check_options("softmax", options)
    return SoftmaxRegression(n_classes)


def _linear(**options: Any) -> LinearRegression:
    check_options("linear", options)
    return LinearRegression()


def _multilabel(n_classes: int | None = None, **options: Any) -> MultilabelLogistic:
    check_options("multilabel_logistic", options)
    return MultilabelLogistic(n_classes)


CLASSIFIERS = ("torch_logistic", "mlp", "cnn2d", "cnn3d")
UNETS = ("unet2d", "unet3d")
TORCH_MODELS = (*CLASSIFIERS, *UNETS)
TASK_MODELS = {"binary": ("logistic", *CLASSIFIERS), "multiclass": ("softmax", *CLASSIFIERS),
               "regression": ("linear", *CLASSIFIERS), "multilabel": ("multilabel_logistic", *CLASSIFIERS),
               "segmentation": UNETS}
"""The models each task can train: its numpy GLM and every torch classifier (with the task's head);
segmentation only the U-Nets (per-pixel logits, :mod:`medfed.models.unet`)."""
GLM = {"binary": "logistic", "multiclass": "softmax", "regression": "linear", "multilabel": "multilabel_logistic"}
"""What ``--model logistic`` builds for each task: the task's generalized linear model."""


def task_model(name: str, task: str) -> str:
    """The model ``name`` resolves to for ``task`` (``logistic`` -> the task's GLM), or a ConfigError
    naming the models the task can train."""
    key = str(name).strip().lower()
    if key == "logistic" and task in GLM:
        return GLM[task]
    if key in MODELS and key not in TASK_MODELS[task]:
        raise ConfigError(f"model {name!r} cannot train a {task} task; choose one of {', '.join(TASK_MODELS[task])}"
                          + (" (or logistic, which picks it)" if task in GLM and task != "binary" else ""))
    return key


def _torch(arch: str, task: str = "binary", n_classes: int | None = None, loss: RobustLoss | None = None, **options: Any):
    # torch loads here, only when a torch model is asked for; without it, one line saying how to get it
    try:
        importlib.import_module("torch")
    except ImportError:
        raise ConfigError(missing_extra("torch", f"model {arch!r}")) from None
    from medfed.models.torch_models import TorchModel

    return TorchModel(arch, task=task, n_outputs=n_classes, loss=loss, **options)


MODELS: dict[str, Callable[..., Any]] = {
    "logistic": _logistic,
    "softmax": _softmax,
    "linear": _linear,
    "multilabel_logistic": _multilabel,
    **{arch: functools.partial(_torch, arch) for arch in TORCH_MODELS},
}
"""Model name -> factory taking the model's options as keyword arguments."""


def make_model(name: str, sample_shape: Sequence[int] | None = None, *, task: str = "binary",
               n_classes: int | None = None, loss: RobustLoss | None = None, **options: Any):
    """The model called ``name`` with ``options`` for ``task`` (:func:`task_model`; a multiclass
    or multilabel model has ``n_classes`` outputs, one per class or label); with ``sample_shape``, also check that it can take such
    samples (the numpy models: tables only; ``cnn2d``/``cnn3d``: 2D/3D images). ``loss``: a
    noise-robust classification loss (:func:`medfed.models.losses.make_loss`; None = the task's own)."""
    key = str(name).strip().lower()
    if key not in MODELS:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(MODELS)}")
    key = task_model(key, task)
    check_task(loss, task)
    full = check_options(key, options)  # before torch is imported: a typo fails fast and cheaply
    if sample_shape is not None:
        check_sample_shape(key, sample_shape)
        if key in UNETS:
            check_unet_grid(key, sample_shape, full["channels"])
    if loss is not None and key in ROBUST_GLMS:
        return ROBUST_GLMS[key](loss) if key == "logistic" else ROBUST_GLMS[key](n_classes, loss)
    if key in ("softmax", "multilabel_logistic"):
        return MODELS[key](n_classes, **options)
    if key in TORCH_MODELS:
        return MODELS[key](task=task, n_classes=n_classes, loss=loss, **options)
    return MODELS[key](**options)


def check_unet_grid(model: str, sample_shape: Sequence[int], channels: Sequence[int]) -> None:
    """A ConfigError unless every spatial axis of ``sample_shape`` halves ``len(channels) - 1`` times
    (the U-Net's stride-2 levels, :mod:`medfed.models.unet`)."""
    factor = 2 ** (len(channels) - 1)
    if len(channels) < 2:
        raise ConfigError(f"model {model!r} option 'channels' needs at least 2 levels (e.g. 8,16,32), got {tuple(channels)}")
    if any(int(s) % factor for s in sample_shape[1:]):
        raise ConfigError(f"model {model!r}: images of shape {tuple(sample_shape)} do not halve {len(channels) - 1} "
                          f"times; every spatial size must be a multiple of {factor} (fewer 'channels' levels, or "
                          "resize the images)")


def n_elements(sample_shape: Sequence[int]) -> int:
    """Values in one sample (the input width of models that flatten it)."""
    return math.prod(int(s) for s in sample_shape)
