"""Torch models behind medfed's parameter view: logistic regression, an MLP, small 2D and 3D CNNs.

:class:`TorchModel` follows the model protocol of the numpy
:class:`~medfed.models.logistic.LogisticRegression` exactly (``init_params``,
``predict_proba``, ``loss``, ``gradient``, ``per_example_gradients``, ``session``, ``name``),
so every client rule, the local optimizer (:mod:`medfed.client.optimizer`) and every aggregator
run on it unchanged; the model holds no optimizer and no method's term. Torch tensors never cross its boundary: parameters come in
and go out as an ordered mapping ``name -> float64 numpy array``.

The parameter view holds every trainable parameter and BatchNorm's running statistics
(``running_mean``, ``running_var``), named by the convention in
:mod:`medfed.models.registry` (``body.{i}.conv|linear|norm.*``, ``norm.*``, ``head.*``).
BatchNorm's ``num_batches_tracked`` is left out: with the fixed momentum 0.1 used here it
never enters the math.

Objective on (X, y), n rows, z_i the head's output for row i, by task (:class:`Head`)::

    L = mean_i loss(z_i, y_i) + (l2 / 2) * sum ||W||²

    binary      one logit      loss = log(1 + exp(z)) - y z                   (the numpy ``logistic``)
    multiclass  K logits       loss = logsumexp(z) - z[y]                     (the numpy ``softmax``)
    regression  one output     loss = (z - y)² / 2                            (the numpy ``linear``)
    multilabel  K logits       loss = sum_k log(1 + exp(z_k)) - y_k z_k       (the numpy ``multilabel_logistic``)

each scaled as the numpy generalized linear model of the task (:mod:`medfed.models.glm`), so a
``torch_logistic`` equals it in float64. W runs over the weights of the conv/linear layers and the
head, as in the numpy models (not biases, not normalization parameters). BatchNorm layers run in train mode (batch
statistics, running statistics updated) in a training session's steps and in eval mode (running
statistics) in ``predict_proba``, ``loss``, ``gradient`` and the session's start loss (taken from
the first full-batch step's own pass where train and eval mode compute the same: no BatchNorm or
dropout; :meth:`TorchSession.gradient`).

Threads and reproducibility: on the CPU, torch's kernels split their sums across intra-op
threads, so the rounding of a sum depends on the thread count. Measured with torch 2.13
(oneDNN 3.12, MKL 2024.2), 1 vs 2 threads: oneDNN's convolution weight gradient (and the
conv bias gradient), MKL's matrix products with a long inner axis (a 1024-wide linear layer's
forward), BatchNorm1d, and reductions over more than ~32k values differ in the last bits
(cnn2d's conv weight gradients: a median 10-24 ulp per entry, 2-4e-6 of their norm);
convolution forward and input gradient, BatchNorm2d/3d, GroupNorm, pooling, the loss and
Adam do not. Training amplifies it: a Single cnn2d on mni-phantom (Adam, 100 steps) stays
within 2e-6 relative for 25 steps, then jumps to 2e-3 by step 30 and 0.12 by step 100, where
6 of 30 test predictions flip (ACC 0.833 vs 0.767). So the thread count is a model option
(``threads``, default 1): every call below runs torch with exactly that many intra-op threads
and restores the caller's count after, so a seed gives the same numbers whatever
``torch.set_num_threads`` the caller (or a forked repeat worker) uses. More threads are
faster on an idle machine (2 threads: 1.6-1.8x the images/s of ``benchmarks/bench_cnn.py``;
on a loaded one, several times slower) and give numbers that hold for that value only;
repeats in parallel (``--workers``) use the cores without changing a number. Still outside
this: a different CPU instruction set or torch build may pick other kernels.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medfed.errors import ConfigError
from medfed.models.glm import _half_mean_square, _mean_cross_entropy, cross_entropy_rows, mean_multilabel_log_loss, softmax
from medfed.models.distill import Distillation, packed_mean_loss
from medfed.models.losses import RobustLoss, binary_ce_rows, check_task
from medfed.models.registry import (
    check_options,
    check_sample_shape,
    is_head,
    is_norm,
    n_elements,
)

Params = Mapping[str, np.ndarray]


# set in children forked after this module loaded: the parent may have used torch's OpenMP
# pool, and a child that then runs more than one intra-op thread hangs (see below)
_FORKED = False


def _one_thread_in_forked_children() -> None:
    # torch's OpenMP thread pool does not survive fork: a forked child (the harness's repeat
    # workers) that runs a parallel region after its parent did hangs, and one whose parent
    # did not still oversubscribes the cores (workers x threads). One intra-op thread per
    # forked child avoids both; as torch's DataLoader does for its workers.
    global _FORKED
    _FORKED = True
    torch.set_num_threads(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_one_thread_in_forked_children)


@contextmanager
def _intra_op_threads(n: int, model: str):
    """torch's intra-op thread count set to ``n`` inside, the caller's restored after."""
    if n > 1 and _FORKED:
        raise ConfigError(
            f"model {model!r} option 'threads' is {n}, but this is a forked worker process, where torch's "
            "thread pool may not have survived the fork and more than one thread can hang; use threads=1 "
            "or run the repeats serially (--workers 1)"
        )
    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fixed_threads(method):
    """Run a :class:`TorchModel` method under the model's ``threads`` option (see the module docstring)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with _intra_op_threads(self.options["threads"], self.name):
            return method(self, *args, **kwargs)

    return wrapper


_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_BATCH_NORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _norm_layer(kind: str, channels: int, dims: int) -> nn.Module | None:
    """BatchNorm over (rows, spatial positions); GroupNorm over groups of up to 4 channels'
    worth (``gcd(channels, 4)`` groups), independent of the batch; or none."""
    if kind == "batch":
        return _BATCH_NORMS[dims](channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(channels, 4), channels)
    return None


class _Block(nn.Module):
    """``layer -> norm -> ReLU -> (max-pool)``; the layer is registered as ``conv`` or ``linear``."""

    def __init__(self, kind: str, layer: nn.Module, norm: nn.Module | None, pool: nn.Module | None) -> None:
        super().__init__()
        self.kind = kind
        self.add_module(kind, layer)
        self.norm = norm
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = getattr(self, self.kind)(x)
        if self.norm is not None:
            x = self.norm(x)
        x = F.relu(x)
        return x if self.pool is None else self.pool(x)


class Network(nn.Module):
    """``[flatten] -> [norm] -> body blocks -> [global average pool] -> head``: the head's outputs
    per sample, a scalar where the head has one (binary, regression)."""

    def __init__(self, body: Sequence[nn.Module], head: nn.Linear, *, flatten: bool, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.flatten = flatten
        self.norm = norm
        self.body = nn.Sequential(*body)
        self.head = head

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's features per sample (everything before the head): what contrastive
        pretraining (:mod:`medfed.client.contrastive`) trains."""
        if self.flatten:
            x = x.flatten(1)
        if self.norm is not None:
            x = self.norm(x)
        x = self.body(x)
        if x.dim() > 2:  # global average pooling over the spatial axes
            x = x.mean(dim=tuple(range(2, x.dim())))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x)).squeeze(-1)


def build_network(arch: str, sample_shape: Sequence[int], options: Mapping, outputs: int = 1) -> Network:
    """The torch module of architecture ``arch`` for samples of ``sample_shape``, with ``outputs``
    head outputs.

    Conv/linear layers carry a bias only without normalization (a norm layer's own shift
    makes it redundant). CNN blocks use 3-wide kernels (padding 1) and halve each spatial
    axis after every block but the last (ceil mode, so a size-1 axis survives).
    """
    if arch in ("unet2d", "unet3d"):
        from medfed.models.unet import build_unet

        return build_unet(arch, sample_shape, options, outputs)
    norm = options["norm"]
    bias = norm == "none"
    if arch == "torch_logistic":
        d = n_elements(sample_shape)
        return Network([], nn.Linear(d, outputs), flatten=True, norm=_norm_layer(norm, d, 1))
    if arch == "mlp":
        blocks, width = [], n_elements(sample_shape)
        for w in options["hidden"]:
            blocks.append(_Block("linear", nn.Linear(width, w, bias=bias), _norm_layer(norm, w, 1), None))
            width = w
        return Network(blocks, nn.Linear(width, outputs), flatten=True)
    dims = {"cnn2d": 2, "cnn3d": 3}[arch]
    conv, pool = (nn.Conv2d, nn.MaxPool2d) if dims == 2 else (nn.Conv3d, nn.MaxPool3d)
    blocks, width = [], int(sample_shape[0])
    channels = options["channels"]
    for i, c in enumerate(channels):
        last = i == len(channels) - 1
        blocks.append(
            _Block("conv", conv(width, c, 3, padding=1, bias=bias), _norm_layer(norm, c, dims),
                   None if last else pool(2, ceil_mode=True))
        )
        width = c
    return Network(blocks, nn.Linear(width, outputs), flatten=False)


@dataclass
class _Slot:
    """A built network for one sample shape, with its parameter view's tensors in order."""

    net: Network
    names: tuple[str, ...]
    tensors: tuple[torch.Tensor, ...]
    shapes: dict[str, tuple[int, ...]]
    decayed: tuple[str, ...]  # weights under the L2 penalty
    modeless: bool  # train and eval mode compute the same outputs (:func:`_modeless`)


def _modeless(net: nn.Module) -> bool:
    """Whether ``net``'s forward pass is the same in train and eval mode: no BatchNorm (batch vs
    running statistics), no InstanceNorm tracking running statistics, no dropout with p > 0."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return False
        if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats:
            return False
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return False
    return True


def _mean_log_loss(z: np.ndarray, y: np.ndarray) -> float:
    return float((np.logaddexp(0.0, z).sum() - y @ z) / z.shape[0])


HEAD_TASKS = ("binary", "multiclass", "regression", "multilabel", "segmentation")


@dataclass(frozen=True)
class Head:
    """What the network's outputs mean for a task (the module docstring's table): how many there
    are, each row's data term in torch (what training differentiates) and their mean in float64
    numpy from the outputs (what ``loss`` reports, summed as the numpy model of the task sums
    it), the targets' torch dtype and the prediction the metrics read."""

    task: str
    outputs: int
    objective: RobustLoss | Distillation | None = None
    """A noise-robust loss replacing the classification data term (:mod:`medfed.models.losses`), or
    a distilling student's objective on packed targets (:mod:`medfed.models.distill`: column 0 the
    label, NaN where a row has none, then the teacher's softened probabilities)."""

    @classmethod
    def of(cls, task: str, n_outputs: int | None, model: str, objective: RobustLoss | None = None) -> Head:
        # a U-Net's outputs are per pixel (segmentation only); the other networks' per image
        trains = ("segmentation",) if model in ("unet2d", "unet3d") else HEAD_TASKS[:-1]
        if task not in trains:
            raise ConfigError(f"model {model!r} has no head for a {task} task; it trains {', '.join(trains)}")
        check_task(objective, task)
        if task in ("binary", "regression"):
            return cls(task, 1, objective)
        if n_outputs is None or n_outputs < 2:
            what = "labels" if task == "multilabel" else "classes"
            raise ConfigError(f"model {model!r}: a {task} head needs at least 2 {what}, got {n_outputs}")
        return cls(task, int(n_outputs), objective)

    def targets(self, y: np.ndarray) -> np.ndarray:
        """``y`` as the data term takes it: class indices (multiclass), else float64 (packed
        distillation targets too)."""
        if isinstance(self.objective, Distillation):
            return np.asarray(y, dtype=np.float64)
        if self.task in ("multiclass", "segmentation"):
            return np.asarray(y).astype(np.int64)
        return np.asarray(y, dtype=np.float64)

    def torch_loss(self, z: torch.Tensor, y: torch.Tensor, reduction: str, ignore: bool = False) -> torch.Tensor:
        """The rows' data terms (``reduction="none"``), their sum or their mean; binary calls
        exactly what it always did, so its numbers do not move. With a robust ``objective``, its
        rows of each row's (each label's) cross-entropy, differentiated by autograd; with a
        :class:`Distillation`, :func:`_distill_rows` (at weight 0 the plain data term of the labels).
        ``ignore`` (segmentation): masks may hold voxels without a target (:func:`medfed.models.unet.dice_ce`)."""
        if isinstance(self.objective, Distillation):
            plain = dataclasses.replace(self, objective=None)
            if not self.objective.weight:  # the labels' own data term, through the same kernels as plain training
                labels = y[:, 0].contiguous()
                return plain.torch_loss(z, labels.long() if self.task == "multiclass" else labels, reduction)
            per_row = _distill_rows(self.task, self.objective, z, y)
            return per_row if reduction == "none" else per_row.sum() if reduction == "sum" else per_row.mean()
        if self.objective is not None:
            ce = (F.cross_entropy(z, y, reduction="none") if self.task == "multiclass"
                  else F.binary_cross_entropy_with_logits(z, y, reduction="none"))
            per_row = self.objective.rows(ce, xp=torch)
            if self.task == "multilabel":
                per_row = per_row.sum(dim=1)
            return per_row if reduction == "none" else per_row.sum() if reduction == "sum" else per_row.mean()
        if self.task == "binary":
            return F.binary_cross_entropy_with_logits(z, y, reduction=reduction)
        if self.task == "multiclass":
            return F.cross_entropy(z, y, reduction=reduction)
        if self.task == "regression":
            return 0.5 * F.mse_loss(z, y, reduction=reduction)
        if self.task == "segmentation":
            from medfed.models.unet import dice_ce

            return dice_ce(z, y, reduction, ignore=ignore)
        per_row = F.binary_cross_entropy_with_logits(z, y, reduction="none").sum(dim=1)  # multilabel
        return per_row if reduction == "none" else per_row.sum() if reduction == "sum" else per_row.mean()

    def mean_loss(self, z: np.ndarray, y: np.ndarray) -> float:
        """The mean data term at outputs ``z`` (float64) and targets :meth:`targets`."""
        if isinstance(self.objective, Distillation):
            if not self.objective.weight:
                labels = np.ascontiguousarray(y[:, 0])
                plain = dataclasses.replace(self, objective=None)
                return plain.mean_loss(z, plain.targets(labels))
            return packed_mean_loss(self.objective, z, y)
        if self.objective is not None:
            ce = cross_entropy_rows(z, y) if self.task == "multiclass" else binary_ce_rows(z, y)
            return float(self.objective.rows(ce).sum() / z.shape[0])
        if self.task == "binary":
            return _mean_log_loss(z, y)
        if self.task == "multiclass":
            return _mean_cross_entropy(z, y)
        if self.task == "regression":
            return _half_mean_square(z, y)
        if self.task == "segmentation":
            from medfed.models.unet import mean_dice_ce

            return mean_dice_ce(z, y)
        return mean_multilabel_log_loss(z, y)

    def predict(self, z: np.ndarray) -> np.ndarray:
        """The prediction of outputs ``z``: a probability per row (binary), per class (multiclass,
        softmax), per label (multilabel), or the value itself (regression)."""
        if self.task == "multiclass":
            return softmax(z)
        if self.task == "regression":
            return z
        if self.task == "segmentation":
            from medfed.models.unet import softmax_channels

            return softmax_channels(z)
        return 0.5 * (1.0 + np.tanh(0.5 * z))  # the sigmoid, finite for any z


def _distill_rows(task: str, soft: Distillation, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each row's ``(1 - lam) CE + lam T² KL(q_t || p_s^T)`` (:mod:`medfed.models.distill`) from the
    packed targets ``y``; an unlabeled row's (NaN label) cross-entropy is 0. Autograd gives the
    numpy sessions' closed-form gradient, ``(1 - lam) (p - onehot) + lam T (p^T - q_t)``."""
    labels, T, lam = y[:, 0], soft.temperature, soft.weight
    known = ~torch.isnan(labels)
    labels = torch.where(known, labels, torch.zeros_like(labels))
    u = z / T
    if task == "binary":
        q = y[:, 1]
        ce = F.binary_cross_entropy_with_logits(z, labels, reduction="none")
        # KL of two Bernoullis: the cross-entropy of q against sigmoid(u) less q's entropy
        kl = (F.binary_cross_entropy_with_logits(u, q, reduction="none")
              + torch.special.xlogy(q, q) + torch.special.xlogy(1.0 - q, 1.0 - q))
    else:
        q = y[:, 1:]
        ce = F.cross_entropy(z, labels.long(), reduction="none")
        kl = (torch.special.xlogy(q, q) - q * F.log_softmax(u, dim=1)).sum(dim=1)
    return (1.0 - lam) * torch.where(known, ce, torch.zeros_like(ce)) + (lam * T * T) * kl


class TorchModel:
    """A torch architecture seen through the parameter view (the model protocol).

    Stateless like the numpy model: every method takes the parameters explicitly. Internally
    one network per sample shape is built once and reused as scratch space: parameters are
    copied in at each call and read out as float64 numpy arrays at the end (so an instance is
    not for concurrent use from several threads; forked processes are fine).

    :meth:`session` opens one local training (the optimizer, ``sgd`` or ``adam``, lives in
    :mod:`medfed.client.optimizer` and is created afresh for each, so Adam's moments do not
    outlive a round). On CPU, the same parameters, data, batches and ``threads`` option give
    the same numbers, whatever torch's thread count outside the model's calls (on CUDA,
    cuDNN may choose non-deterministic kernels).

    Parameter names (the convention partial sharing keys on, see
    :func:`~medfed.models.registry.is_norm`, ``is_norm_statistic``, ``is_head``)::

        body.{i}.conv.weight | body.{i}.linear.weight [.bias without norm]   block i
        body.{i}.norm.weight | .bias | .running_mean | .running_var          its norm layer
        norm.*                                       torch_logistic's input normalization
        head.weight, head.bias                       the final layer (the task's outputs, :class:`Head`)

    ``task`` (:mod:`medfed.data.tasks`) decides the head; ``n_outputs`` is its width for
    ``multiclass`` (classes) and ``multilabel`` (labels).
    """

    def __init__(self, arch: str, *, task: str = "binary", n_outputs: int | None = None,
                 loss: RobustLoss | None = None, **options) -> None:
        opts = check_options(arch, options)
        if arch == "logistic":
            raise ConfigError("'logistic' is the numpy model; the torch one is 'torch_logistic'")
        self.name = arch
        self.task = task
        self.head = Head.of(task, n_outputs, arch, loss)
        self.options = opts
        self.dtype = _DTYPES[opts["dtype"]]
        device = opts["device"]
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"model {arch!r} option 'device' is 'cuda' but torch sees no CUDA device; use auto or cpu")
        self.device = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
        self._slots: dict[tuple[int, ...], _Slot] = {}

    def with_objective(self, objective: Distillation) -> TorchModel:
        """This model with ``objective`` as its head's loss (a distilling student: packed targets),
        sharing its networks (scratch space, as every call reloads the parameters)."""
        if self.task not in ("binary", "multiclass"):
            raise ConfigError(f"model {self.name!r}: a {self.task} head takes no soft targets (binary or multiclass only)")
        other = copy.copy(self)
        other.head = dataclasses.replace(self.head, objective=objective)
        return other

    def __repr__(self) -> str:
        head = f", task={self.task!r}" + (f", n_outputs={self.head.outputs}" if self.head.outputs > 1 else "")
        return f"TorchModel({self.name!r}{head}, {', '.join(f'{k}={v!r}' for k, v in self.options.items())})"

    # --- the network and the parameter view -------------------------------------------

    def _slot(self, sample_shape: Sequence[int]) -> _Slot:
        key = tuple(int(s) for s in sample_shape)
        slot = self._slots.get(key)
        if slot is None:
            check_sample_shape(self.name, key)
            # module constructors draw their own initial values from torch's global generator;
            # fork it so building a network leaves the caller's torch random state untouched
            with torch.random.fork_rng(devices=[]):
                net = build_network(self.name, key, self.options, self.head.outputs).to(device=self.device, dtype=self.dtype)
            state = net.state_dict(keep_vars=True)
            names = tuple(k for k in state if not k.endswith("num_batches_tracked"))
            decayed = tuple(k for k, _ in net.named_parameters() if k.endswith(".weight") and not is_norm(k))
            slot = _Slot(net, names, tuple(state[k] for k in names), {k: tuple(state[k].shape) for k in names}, decayed,
                         _modeless(net))
            self._slots[key] = slot
        return slot

    def param_shapes(self, sample_shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
        """The parameter view's names and shapes for samples of ``sample_shape``, in order."""
        return dict(self._slot(sample_shape).shapes)

    def thread_limit(self):
        """A context in which torch runs with this model's ``threads`` option (the caller's count
        restored after), for a site's own torch computation on the model's network (contrastive
        pretraining); the model's methods set it themselves."""
        return _intra_op_threads(self.options["threads"], self.name)

    def network(self, sample_shape: Sequence[int]) -> Network:
        """A fresh copy of the torch module (for users who want the module itself)."""
        with torch.random.fork_rng(devices=[]):
            return build_network(self.name, check_sample_shape(self.name, sample_shape), self.options, self.head.outputs)

    def _load(self, slot: _Slot, params: Params) -> None:
        if params.keys() != slot.shapes.keys():
            missing = sorted(set(slot.shapes) - set(params))
            extra = sorted(set(params) - set(slot.shapes))
            raise ConfigError(
                f"model {self.name!r}: parameters do not match the network (missing {missing}, unexpected {extra})"
            )
        with torch.no_grad():
            for name, tensor in zip(slot.names, slot.tensors):
                value = np.asarray(params[name])
                if value.shape != tensor.shape:
                    raise ConfigError(
                        f"model {self.name!r}: parameter {name!r} has shape {value.shape}, the network's is {tuple(tensor.shape)}"
                    )
                if not value.flags.writeable:  # torch.from_numpy warns on read-only arrays
                    value = value.copy()
                tensor.copy_(torch.from_numpy(value))
                if name.endswith("running_var"):
                    # a server step (e.g. an adaptive optimizer) may push an averaged variance
                    # below zero, where BatchNorm would return NaN: read it as zero
                    tensor.clamp_(min=0.0)

    def _read(self, slot: _Slot) -> dict[str, np.ndarray]:
        return {
            name: t.detach().cpu().numpy().astype(np.float64, copy=True) for name, t in zip(slot.names, slot.tensors)
        }

    def _tensor(self, X: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(X), dtype=self.dtype, device=self.device)

    def _targets(self, y: np.ndarray) -> torch.Tensor:
        """The head's targets on the device: class indices as int64, others in the model's dtype."""
        y = self.head.targets(y)
        return torch.as_tensor(y, dtype=None if y.dtype == np.int64 else self.dtype, device=self.device)

    def _penalty(self, slot: _Slot, params: Params, l2: float) -> float:
        if not l2:
            return 0.0
        return 0.5 * l2 * sum(float(np.vdot(params[k], params[k])) for k in slot.decayed)

    def _logits(self, slot: _Slot, X: np.ndarray) -> np.ndarray:
        """Eval-mode outputs of every row (``(n,)``, or ``(n, K)`` for a K-wide head), ``eval_batch``
        rows at a time, as float64."""
        net = slot.net
        net.eval()
        chunk = self.options["eval_batch"]
        width = self.head.outputs
        shape = (width,) if width > 1 else ()
        if self.task == "segmentation":  # per-pixel logits on the image grid
            shape = (width, *X.shape[2:])
        out = np.empty((X.shape[0], *shape), dtype=np.float64)
        with torch.no_grad():
            for start in range(0, X.shape[0], chunk):
                out[start : start + chunk] = net(self._tensor(X[start : start + chunk])).double().cpu().numpy()
        return out

    # --- the model protocol -----------------------------------------------------------

    @_fixed_threads
    def init_params(self, sample_shape: Sequence[int], rng) -> dict[str, np.ndarray]:
        """Initial parameters for samples of ``sample_shape``, drawn from ``rng`` (a
        :class:`~medfed.rng.KeyedRng` or numpy Generator) through a local torch generator.

        Conv/linear weights of the body: He normal (fan-in, ReLU); biases 0. Head: zeros,
        so every model starts at probability 0.5 for every sample (loss log 2) like the
        numpy model; the body's first step then has a zero gradient, its later ones do not.
        Norm layers: weight 1, bias 0, running mean 0, running variance 1. Values are drawn
        in float64 on the CPU and rounded to the model's dtype, so the view round-trips
        through the network exactly and the same seed gives the same model on every device.
        """
        if rng is None:
            raise ConfigError(f"model {self.name!r}: init_params needs an rng (a KeyedRng) to draw initial weights")
        slot = self._slot(sample_shape)
        generator = rng.generator if hasattr(rng, "generator") else rng
        torch_gen = torch.Generator().manual_seed(int(generator.integers(2**63 - 1)))
        out = {}
        for name in slot.names:
            t = torch.zeros(slot.shapes[name], dtype=torch.float64)
            leaf = name.rsplit(".", 1)[-1]
            if is_norm(name):
                if leaf in ("weight", "running_var"):
                    t.fill_(1.0)
            elif leaf == "weight" and not is_head(name):
                nn.init.kaiming_normal_(t, nonlinearity="relu", generator=torch_gen)
            out[name] = t.to(self.dtype).double().numpy()
        return out

    @_fixed_threads
    def predict_proba(self, params: Params, X: np.ndarray) -> np.ndarray:
        """:meth:`predict`: for a binary head the probability of the positive class of each row."""
        return self.predict(params, X)

    @_fixed_threads
    def predict(self, params: Params, X: np.ndarray) -> np.ndarray:
        """The head's prediction for each row of ``X`` (eval mode), float64 (:meth:`Head.predict`)."""
        slot = self._slot(X.shape[1:])
        self._load(slot, params)
        return self.head.predict(self._logits(slot, X))

    @_fixed_threads
    def decision(self, params: Params, X: np.ndarray) -> np.ndarray:
        """The head's outputs for each row of ``X`` (eval mode), float64: the logits AUC ranks by."""
        slot = self._slot(X.shape[1:])
        self._load(slot, params)
        return self._logits(slot, X)

    @_fixed_threads
    def loss(self, params: Params, X: np.ndarray, y: np.ndarray, l2: float = 0.0) -> float:
        """The objective in eval mode; the data term is summed in float64 from the logits."""
        slot = self._slot(X.shape[1:])
        self._load(slot, params)
        return self.head.mean_loss(self._logits(slot, X), self.head.targets(y)) + self._penalty(slot, params, l2)

    @_fixed_threads
    def gradient(
        self, params: Params, X: np.ndarray, y: np.ndarray, l2: float = 0.0, *, with_loss: bool = False
    ) -> tuple[dict[str, np.ndarray], float | None]:
        """Gradient of the objective in eval mode, accumulated over ``eval_batch`` chunks.

        Running statistics get a zero gradient (they are not trained by gradients), so a
        gradient step leaves them where they are.
        """
        slot = self._slot(X.shape[1:])
        self._load(slot, params)
        net = slot.net
        net.eval()
        trainable = dict(net.named_parameters())
        for p in trainable.values():
            p.grad = None
        head = self.head
        y = head.targets(y)
        n = X.shape[0]
        chunk = self.options["eval_batch"]
        z_all = np.empty((n, head.outputs) if head.outputs > 1 else n, dtype=np.float64) if with_loss else None
        for start in range(0, n, chunk):
            z = net(self._tensor(X[start : start + chunk]))
            yb = self._targets(y[start : start + chunk])
            (head.torch_loss(z, yb, "sum") / n).backward()
            if with_loss:
                z_all[start : start + chunk] = z.detach().double().cpu().numpy()
        grads = {}
        for name in slot.names:
            p = trainable.get(name)
            if p is None or p.grad is None:
                grads[name] = np.zeros(slot.shapes[name])
            else:
                grads[name] = p.grad.detach().cpu().numpy().astype(np.float64, copy=True)
                p.grad = None
        if l2:
            for name in slot.decayed:
                grads[name] += l2 * np.asarray(params[name], dtype=np.float64)
        loss = head.mean_loss(z_all, y) + self._penalty(slot, params, l2) if with_loss else None
        return grads, loss

    def session(self, params: Params, X: np.ndarray, y: np.ndarray) -> TorchSession:
        """A training session on ``(X, y)`` from ``params`` (a context manager): the network and
        its tensors stay on the device between the steps the local optimizer
        (:mod:`medfed.client.optimizer`) drives, under the model's ``threads`` option."""
        return TorchSession(self, params, X, y)

    @_fixed_threads
    def per_example_gradients(self, params: Params, X: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        """Each row's gradient of its own data term (leading row axis, float64; the trainable
        parameters only, the L2 term left out), through ``torch.func``: ``vmap`` of ``grad`` of
        the network called functionally on one row. Refused with BatchNorm, whose batch
        statistics make a row's output depend on the other rows."""
        with self.session(params, X, y) as session:
            per = session.example_gradients(np.arange(np.asarray(X).shape[0])).per_example
            return {k: g.double().cpu().numpy() for k, g in per.items()}

    @_fixed_threads
    def input_gradients(self, params: Params, X: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Each row's gradient with respect to its own input (shape of ``X``, float64; eval mode, by
        autograd, ``eval_batch`` rows at a time) of its data term against soft ``targets`` in the form
        :meth:`predict` gives (a probability per row, per class or per label; the value for regression):
        cross-entropy, or the squared error / 2. Against the model's own predictions elsewhere it is the
        gradient of their KL divergence: VAT's adversarial direction (:mod:`medfed.client.vat`)."""
        task = self.head.task
        if task == "segmentation":
            raise ConfigError(f"model {self.name!r}: input gradients are per image, not per pixel (segmentation)")
        slot = self._slot(X.shape[1:])
        self._load(slot, params)
        net = slot.net
        net.eval()
        chunk = self.options["eval_batch"]
        out = np.empty(X.shape, dtype=np.float64)
        for start in range(0, X.shape[0], chunk):
            x = self._tensor(X[start : start + chunk]).requires_grad_(True)
            z = net(x)
            t = torch.as_tensor(np.asarray(targets[start : start + chunk]), dtype=self.dtype, device=self.device)
            if task == "multiclass":
                loss = -(t * F.log_softmax(z, dim=1)).sum()
            elif task == "regression":
                loss = 0.5 * ((z - t) ** 2).sum()
            else:  # binary, multilabel: one sigmoid cross-entropy per output
                loss = F.binary_cross_entropy_with_logits(z, t, reduction="sum")
            (g,) = torch.autograd.grad(loss, x)
            out[start : start + chunk] = g.double().cpu().numpy()
        return out

    @_fixed_threads
    def recalibrate(self, params: Params, X: np.ndarray) -> dict[str, np.ndarray]:
        """``params`` with BatchNorm's running statistics recomputed on ``X`` (see below);
        unchanged for models without BatchNorm or with ``recalibrate = false``."""
        X = np.asarray(X)
        slot = self._slot(X.shape[1:])
        if not self.options.get("recalibrate", True):
            return {k: np.array(v, dtype=np.float64, copy=True) for k, v in params.items()}
        self._load(slot, params)
        slot.net.train()
        self._recalibrate_norm(slot.net, self._tensor(X))
        fresh = self._read(slot)
        # only the statistics change; the other parameters are returned exactly as given
        return {
            k: fresh[k] if k.endswith((".running_mean", ".running_var")) else np.array(v, dtype=np.float64, copy=True)
            for k, v in params.items()
        }

    def _recalibrate_norm(self, net, Xt) -> None:
        """Set BatchNorm's running statistics to the site's data under the final weights.

        During training the running statistics are an exponential average of batch statistics
        taken under weights that kept moving; after a few fast (Adam) steps they lag behind,
        and eval-mode outputs shift: on mni-phantom a Single CNN scored 0.58 training-set
        accuracy in eval mode against a training loss near 0. One no-grad pass in train mode,
        cumulative averaging over chunks, makes them the statistics the final weights see
        (the BN "recalibration" of e.g. Li et al., 2021's FedBN evaluation practice).
        """
        norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms:
            return
        saved = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the chunks below
        with torch.no_grad():
            for start in range(0, Xt.shape[0], self.options["eval_batch"]):
                chunk = Xt[start : start + self.options["eval_batch"]]
                if chunk.shape[0] > 1 or start == 0:
                    net(chunk)
        for m, momentum in zip(norms, saved):
            m.momentum = momentum


def _no_batch_norm(model: TorchModel) -> None:
    if model.options.get("norm") == "batch":
        raise ConfigError(
            f"model {model.name!r} uses BatchNorm, whose batch statistics tie each row's output to the other "
            "rows: per-example gradients (DP-SGD) are not defined; use GroupNorm: --model-option norm=group"
        )


class TorchSession:
    """One local training of a :class:`TorchModel`: parameters loaded once, trained in place.

    ``values`` maps each trainable parameter's name to its tensor (the network's own, on the
    model's device, in its dtype): the optimizer updates them in place under ``torch.no_grad``.
    Running statistics are not in ``values``: BatchNorm updates them itself in train mode, and
    :meth:`parameters` recalibrates them once after training (see :meth:`TorchModel.recalibrate`).
    Entering sets torch's intra-op threads to the model's ``threads`` and disables autograd
    outside :meth:`gradient`; leaving restores both.
    """

    scaled = frozenset()  # autograd's gradient arrives already averaged: the learning rate is not folded in

    def __init__(self, model: TorchModel, params: Params, X: np.ndarray, y: np.ndarray) -> None:
        self.model = model
        self._params = params
        self.X = np.asarray(X)
        self.y = model.head.targets(y)
        self._stack = ExitStack()
        self._trained = False

    def __enter__(self) -> TorchSession:
        model = self.model
        self._stack.enter_context(_intra_op_threads(model.options["threads"], model.name))
        self._stack.enter_context(torch.no_grad())
        try:
            self.slot = slot = model._slot(self.X.shape[1:])
            model._load(slot, self._params)
        except BaseException:  # a bad shape or parameter: leave torch's settings as they were
            self._stack.close()
            raise
        self.penalized = slot.decayed  # the weights under the L2 penalty
        self.values = dict(slot.net.named_parameters())
        self.shapes = {k: slot.shapes[k] for k in self.values}
        self.Xt, self.yt = model._tensor(self.X), model._targets(self.y)
        # masks with voxels left without a target (semi-supervised pseudo-masks), read here, off the torch graph
        self._ignore = model.task == "segmentation" and bool((self.y < 0).any())
        # a full-batch train-mode forward pass is then the start loss's: the same rows in one
        # eval chunk, through the same kernels (see :meth:`gradient`); measured on the CPU only
        self._start_in_step = (slot.modeless and self.X.shape[0] <= model.options["eval_batch"]
                               and model.device.type == "cpu")
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def load(self, name: str, value: np.ndarray) -> torch.Tensor:
        """A parameter-view array (a proximal center, a correction, noise) as a device tensor."""
        return self.model._tensor(value)

    @staticmethod
    def axpy(alpha: float, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``g + alpha * x`` in place (torch's fused kernel)."""
        return g.add_(x, alpha=alpha)

    def loss(self) -> float:
        """The data term of the objective on all rows at the current parameters, eval mode."""
        return self.model.head.mean_loss(self.model._logits(self.slot, self.Xt), self.y)

    def _rows(self, rows: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
        if rows is None:
            return self.Xt, self.yt
        index = torch.as_tensor(rows, device=self.model.device)
        return self.Xt[index], self.yt[index]

    def gradient(self, rows: np.ndarray | None, scale: float = 1.0,
                 row_weights: Callable[[np.ndarray], np.ndarray] | None = None,
                 with_loss: bool = False) -> tuple[dict[str, torch.Tensor], float | None]:
        """The batch's mean data-term gradient in train mode (rows ``rows``, ``None`` = all),
        each row weighted by ``row_weights(y_batch)`` when given: the parameters' ``.grad``
        tensors. ``scale`` is not folded in (:attr:`scaled` is empty). With ``with_loss``, also
        :meth:`loss` at the parameters before this step.

        That loss comes from this step's own forward pass where it covers all rows, the rows fit
        one ``eval_batch`` chunk and the network computes the same in train and eval mode (no
        BatchNorm, no dropout): then its outputs are the eval pass's bit for bit (tested per
        architecture and dtype on the CPU: the same kernels on the same tensor, autograd only
        records), and the separate pass, a forward pass per site per round, is saved. Elsewhere
        (and on a GPU, whose kernel choice was not checked) it is :meth:`loss`, taken before the step."""
        model, net = self.model, self.slot.net
        reuse = with_loss and rows is None and self._start_in_step
        loss = self.loss() if with_loss and not reuse else None
        xb, yb = self._rows(rows)
        if model.options["norm"] == "batch" and model.name in ("mlp", "torch_logistic") and xb.shape[0] < 2:
            raise ConfigError(f"model {model.name!r} with batch norm needs at least 2 rows per batch, got {xb.shape[0]}")
        # medfed sets the mode of the whole (private) network only, so its top flag is every module's: walking
        # a U-Net's 31 modules on every step cost 2-3% of its local training (benchmarks/bench_unet.py)
        if not net.training:
            net.train()
        for p in self.values.values():
            p.grad = None
        with torch.enable_grad():
            z = net(xb)
            if row_weights is None:
                batch_loss = model.head.torch_loss(z, yb, "mean", self._ignore)
            else:
                w = model._tensor(row_weights(self.y if rows is None else self.y[rows]))
                batch_loss = (model.head.torch_loss(z, yb, "none", self._ignore) * w).sum() / xb.shape[0]
            batch_loss.backward()
        if reuse:
            loss = model.head.mean_loss(z.detach().double().cpu().numpy(), self.y)
        self._trained = True
        return {k: p.grad for k, p in self.values.items()}, loss

    def example_gradients(self, rows: np.ndarray) -> TorchRows:
        """The rows' own gradients of their data terms (``torch.func``: ``vmap`` of ``grad`` of
        the network called functionally on one row). Refused with BatchNorm."""
        _no_batch_norm(self.model)
        from torch.func import functional_call, grad, vmap

        net = self.slot.net
        net.train()
        self._trained = True
        xb, yb = self._rows(rows)
        params = {k: p.detach() for k, p in self.values.items()}
        if xb.shape[0] == 0:  # an empty Poisson batch
            return TorchRows({k: torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device) for k, p in params.items()})
        buffers = dict(net.named_buffers())
        head = self.model.head

        def row_loss(theta, x, target):
            z = functional_call(net, (theta, buffers), (x.unsqueeze(0),))
            return head.torch_loss(z, target.unsqueeze(0), "mean")

        return TorchRows(vmap(grad(row_loss), in_dims=(None, 0, 0))(params, xb, yb))

    def parameters(self) -> dict[str, np.ndarray]:
        """The parameter view of the trained network, float64; BatchNorm's running statistics
        recomputed on the session's rows when it trained (the model's ``recalibrate`` option)."""
        if self._trained and self.model.options.get("recalibrate", True):
            self.model._recalibrate_norm(self.slot.net, self.Xt)
            self._trained = False
        return self.model._read(self.slot)


class TorchRows:
    """Per-example gradients (``per_example``: name -> tensor with a leading row axis): their
    L2 ``norms`` over all parameters together (float64 numpy) and any weighted sum of them."""

    def __init__(self, per_example: dict[str, torch.Tensor]) -> None:
        self.per_example = per_example
        rows = next(iter(per_example.values())).shape[0]
        if rows:
            squares = sum(g.flatten(1).square().sum(dim=1) for g in per_example.values())
            self.norms = squares.sqrt().double().cpu().numpy()
        else:  # an empty Poisson batch: its sum is zero
            self.norms = np.zeros(0)

    def weighted_sum(self, factors: np.ndarray) -> dict[str, torch.Tensor]:
        """``sum_i factors_i g_i`` for each parameter, on the device."""
        first = next(iter(self.per_example.values()))
        f = torch.as_tensor(factors, dtype=first.dtype, device=first.device)
        return {k: torch.tensordot(f, g, dims=1) for k, g in self.per_example.items()}


# --- every site's local steps at once (the vectorized executor, issue 13 §1) -------------------


@dataclass(frozen=True)
class StackedTraining:
    """What :func:`train_stacked` returns: each site's trained parameters (name -> (K, ...)
    float64, the parameter view with a leading site axis), its eval-mode logits at the start on
    its rows (K, n) float64 ((K, n, outputs) for a K-wide head), and the names under the L2 penalty
    (for the start objective)."""

    params: dict[str, np.ndarray]
    start_logits: np.ndarray
    decayed: tuple[str, ...]


def stacking_refusal(model: TorchModel) -> str | None:
    """Why ``model``'s local steps cannot be batched across sites with ``vmap``, or None."""
    if model.options.get("norm") == "batch":
        return ("BatchNorm's running statistics are a side effect of each site's forward passes, which vmap "
                "cannot return; use --model-option norm=group or norm=none")
    if model.options.get("optimizer", "sgd") != "sgd":
        return f"its local optimizer {model.options['optimizer']!r} is not batched (plain SGD only)"
    return None


@_fixed_threads
def _train_stacked(model: TorchModel, params: Params, X: np.ndarray, y: np.ndarray, steps: np.ndarray,
                   index: np.ndarray | None, mask: np.ndarray | None, count: np.ndarray, lr: float, l2: float,
                   mu: float) -> StackedTraining:
    from torch.func import functional_call, grad, vmap

    slot = model._slot(X.shape[2:])
    net, decayed = slot.net, slot.decayed
    k = X.shape[0]
    center = {name: model._tensor(np.asarray(v)) for name, v in params.items()}
    theta = {name: c.expand(k, *c.shape).clone() for name, c in center.items()}
    Xt, yt = model._tensor(X), model._targets(y)
    net.eval()  # no BatchNorm (refused): eval and train mode compute the same
    with torch.no_grad():
        start = vmap(lambda th, x: functional_call(net, th, (x,)))(theta, Xt).double().cpu().numpy()

    head = model.head

    def batch_loss(th, xb, yb, mb, nb):
        per_row = head.torch_loss(functional_call(net, th, (xb,)), yb, "none")
        return (per_row * mb).sum() / nb  # the site's own rows' mean (padding weighs 0)

    def plain_loss(th, xb, yb):
        return head.torch_loss(functional_call(net, th, (xb,)), yb, "mean")

    masked = mask is not None
    step_grad = vmap(grad(batch_loss)) if masked else vmap(grad(plain_loss))
    mt, nt = (model._tensor(np.ascontiguousarray(mask)), model._tensor(count)) if masked else (None, None)
    active = torch.as_tensor(steps, device=model.device)
    sites = torch.arange(k, device=model.device)[:, None]
    for t in range(int(steps.max())):
        if index is None:
            xb, yb, mb = Xt, yt, mt
        else:
            rows = torch.as_tensor(index[t], device=model.device)
            xb, yb = Xt[sites, rows], yt[sites, rows]
            mb = None if mt is None else mt[t]
        g = step_grad(theta, xb, yb, mb, nt) if masked else step_grad(theta, xb, yb)
        with torch.no_grad():
            moving = active > t  # a site past its own step count (local epochs) stands still
            for name, p in theta.items():
                gk = g[name]  # the optimizer's terms in its order: L2, then the proximal pull
                if l2 and name in decayed:
                    gk = gk.add(p, alpha=l2)
                if mu:
                    gk = gk.add(p - center[name], alpha=mu)
                stepped = p.add(gk, alpha=-lr)
                theta[name] = stepped if bool(moving.all()) else torch.where(
                    moving.view(-1, *(1,) * (p.dim() - 1)), stepped, p)
    out = {name: v.detach().cpu().numpy().astype(np.float64, copy=True) for name, v in theta.items()}
    return StackedTraining(out, start, decayed)


def train_stacked(model: TorchModel, params: Params, X: np.ndarray, y: np.ndarray, steps: np.ndarray, *,
                  index: np.ndarray | None = None, mask: np.ndarray | None = None, count: np.ndarray, lr: float,
                  l2: float = 0.0, mu: float = 0.0) -> StackedTraining:
    """Every site's plain-SGD local steps from ``params`` at once: ``torch.func.vmap`` of the
    gradient of the network called functionally (``functional_call``) over a leading site axis.

    ``X`` (K, n, ...) and ``y`` (K, n) (multi-label: (K, n, L)) hold each site's rows padded to n, the
    data term the head's (:meth:`Head.torch_loss`); step t trains site k on
    rows ``index[t, k]`` (None: all n), ``mask`` 1 on its own rows of them ((K, n) for full batch,
    (steps, K, B) with ``index``; None: all), ``count`` (K,) its rows per step; ``steps`` (K,) its
    step count. Each step is :func:`medfed.client.optimizer.descend`'s with plain SGD, in its order:
    ``g + l2 W`` (penalized weights), ``+ mu (theta - params)``, ``theta - lr g``; only the kernels'
    summation order differs from the per-site loop (vmap runs K sites' products as one batched or
    grouped operation). Refused for BatchNorm and Adam (:func:`stacking_refusal`)."""
    why = stacking_refusal(model)
    if why is not None:
        raise ConfigError(f"model {model.name!r}: {why}")
    return _train_stacked(model, params, X, y, steps, index, mask, count, lr, l2, mu)
