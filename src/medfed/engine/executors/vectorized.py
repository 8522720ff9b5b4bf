"""Every selected site's local steps as one array program: the vectorized executor (issue 13 §1).

For the numpy models of every table task (``logistic``, ``softmax``, ``multilabel_logistic``,
``linear``: one path, :data:`STACKED_GLMS` holds each one's residual and per-site loss, the
residual being its session's own function) the federation's rows are stacked once, with a leading
site axis and padded to a common row count (``X``: (K, n_max, d), a row mask where sites differ in
size). A round trains the whole cohort with batched matrix products (``z = X W``, ``X^T r`` per site)
and hands the server the uploads already stacked (:class:`~medfed.engine.protocol.StackedReplies`),
which it screens and aggregates on the stacked arrays: no per-site object on the hot path of a
full-batch round. Mini-batches come from each site's own keyed rng through the same
:func:`~medfed.client.local.batch_indices` as in process (the one loop over sites), so the draws agree.

Site rules it batches: FedAvg's (:func:`~medfed.client.local.local_sgd_update`, with any server
chain: FedAvgM, FedAdam, the robust aggregators, ...), FedProx's, FedSGD's and SCAFFOLD's
(:func:`~medfed.client.drift.scaffold_update`: the correction ``c - c_i`` is one more term of the
batched step, and the sites' control variates ``c_i`` are stacked state kept with the executor,
:class:`StackedMemory`). Anything else (other site rules, personal or private parameters, DP,
compression, secure aggregation) is refused before training with the reason and
``--executor inprocess``.

Torch models (``torch_logistic``, ``mlp``, ``cnn2d``, ``cnn3d``, ``unet2d``, ``unet3d``; every task's
head, the U-Nets' Dice + cross-entropy included) with plain SGD and no BatchNorm run
FedAvg's and FedProx's rules through ``torch.func.vmap`` over the site axis
(:func:`~medfed.models.torch_models.train_stacked`, the head's own loss; padded rows weigh 0 in each site's mean loss):
float64 models agree with ``inprocess`` within 1e-12 relative (tested); GroupNorm over groups of few
values amplifies the summation-order differences (1e-8 relative seen with groups of two). BatchNorm
(its running statistics), Adam and the other rules are refused. ``benchmarks/bench_vmap.py`` measures
the speed-up over the per-site loop.

Numbers: each step does the in-process optimizer's elementwise operations in the same order
(:mod:`medfed.client.optimizer`: ``lr / n`` folded into ``X^T r``, then ``lr * l2 * W``, then
``lr * mu * (W - W0)``, then ``lr * (c - c_i)``); only the reductions' summation order differs (batched
products, row sums), so results agree with the ``inprocess`` executor within a few ulps per step:
1e-12 relative is tested. SCAFFOLD's ``c_i`` follow :class:`~medfed.engine.runtime.SiteRuntime`'s
commit semantics (pending until the coordinator uses the upload) and, with a state folder
(``--resume``), are saved there after every change, so a resumed run repeats a round from the same state.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfed.atomic import write_bytes_atomically
from medfed.client.drift import ScaffoldSiteState, scaffold_update
from medfed.client.local import (
    LocalData,
    LocalTraining,
    batch_indices,
    fedprox_update,
    fedsgd_gradient,
    local_sgd_update,
)
from medfed.comm.wire import decode, encode
from medfed.engine.faults import Faults
from medfed.engine.protocol import (
    TRAIN_STREAM,
    FederatedAlgorithm,
    Params,
    RoundPlan,
    SiteProgram,
    SiteSetup,
    StackedReplies,
)
from medfed.errors import ConfigError
from medfed.models.glm import (
    LinearRegression,
    LinearSession,
    MultilabelLogistic,
    MultilabelSession,
    SoftmaxRegression,
    SoftmaxSession,
    cross_entropy_rows,
)
from medfed.models.glm import _residual as _glm_residual
from medfed.models.logistic import LogisticRegression, LogisticSession
from medfed.rng import KeyedRng, name_key
from medfed.server.aggregate import StackedUploads
from medfed.wiretypes import wire_type

BATCHED = "FedAvg's, FedProx's, FedSGD's and SCAFFOLD's site rules (with any server chain on FedAvg's client)"


@dataclass(frozen=True, slots=True)
class BatchedRule:
    """A site rule the executor runs as array operations: ``kind`` ``"delta"`` (local steps from
    the global model, FedProx's pull ``mu`` toward it, SCAFFOLD's correction with ``control``) or
    ``"gradient"`` (FedSGD: the gradient at it)."""

    kind: str
    mu: float = 0.0
    control: bool = False  # SCAFFOLD: steps corrected by c - c_i, c_i kept per site


def batched_rule(algorithm: FederatedAlgorithm) -> BatchedRule | None:
    """The batched form of the method's site rule, or None when it has none (known by identity:
    a wrapped or new rule may do anything, so only these four are trusted)."""
    rule = algorithm.local_update
    if rule is local_sgd_update:
        return BatchedRule("delta")
    if rule is scaffold_update:
        return BatchedRule("delta", control=True)
    if rule is fedsgd_gradient:
        return BatchedRule("gradient")
    if isinstance(rule, functools.partial) and rule.func is fedprox_update and not rule.args \
            and set(rule.keywords) == {"mu"}:
        return BatchedRule("delta", float(rule.keywords["mu"]))
    return None


def _torch_model(model: Any) -> bool:
    """Whether ``model`` is a :class:`~medfed.models.torch_models.TorchModel` (without importing
    torch: a torch model's module is loaded once one exists)."""
    module = sys.modules.get("medfed.models.torch_models")
    return module is not None and isinstance(model, module.TorchModel)


def refusal(algorithm: FederatedAlgorithm, training: LocalTraining, *, codec: Any = None, secure: bool = False,
            dp: str = "none") -> str | None:
    """Why the method cannot run vectorized, or None."""
    model = training.model
    if _torch_model(model):
        from medfed.models.torch_models import stacking_refusal

        why = stacking_refusal(model)
        if why is not None:
            return f"model {model.name!r}: {why}"
        rule = batched_rule(algorithm)
        if rule is not None and (rule.kind != "delta" or rule.control):
            return f"on torch models it batches FedAvg's and FedProx's site rules only, not {algorithm.name!r}'s"
    elif getattr(model, "objective", None) is not None:  # models.robust: --loss gce|sce
        return f"its --loss {model.objective.name!r} is not batched (cross-entropy only)"
    elif type(model) not in STACKED_GLMS:
        return (f"it batches the numpy {', '.join(repr(m.name) for m in STACKED_GLMS)} models and torch models, "
                f"not {getattr(model, 'name', model)!r}")
    if dp != "none" or training.dp_sgd is not None:
        return "differential privacy (--dp) is not batched"
    if codec is not None:
        return "upload compression (--compress) is not batched"
    if secure:
        return "secure aggregation is not batched"
    if algorithm.personalize is not None:
        return "its personal models are not batched"
    if algorithm.private is not None:
        return "its site-private parameters are not batched"
    rule = batched_rule(algorithm)
    if rule is None:
        return f"its site rule is not batched (only {BATCHED})"
    if algorithm.broadcast is not None and not rule.control:  # SCAFFOLD's rule reads its server control
        return "its server message (broadcast) is not batched"
    return None


def check_vectorized(method: str, algorithm: FederatedAlgorithm, training: LocalTraining, **parts) -> None:
    """Refuse, in one line naming the method and the fix, a method the executor cannot batch."""
    why = refusal(algorithm, training, **parts)
    if why is not None:
        raise ConfigError(f"method {method!r} cannot run on executor 'vectorized': {why}; use --executor inprocess")


@dataclass(frozen=True, slots=True)
class StackedRows:
    """The federation's training rows with a leading site axis, padded to the largest site's row
    count: ``X`` (K, n, d) (images: (K, n, C, ...)), ``y`` (K, n) (multi-label: (K, n, L)), ``mask`` (K, n) 1 on
    a site's own rows (None when all sites have n rows), ``n`` (K,) each site's row count."""

    X: np.ndarray
    y: np.ndarray
    mask: np.ndarray | None
    n: np.ndarray

    @classmethod
    def of(cls, sites: Sequence[LocalData]) -> StackedRows:
        n = np.array([d.n for d in sites], dtype=np.intp)
        width = int(n.max())
        if (n == width).all():
            return cls(np.stack([d.X for d in sites]).astype(np.float64, copy=False),
                       np.stack([d.y for d in sites]).astype(np.float64, copy=False), None, n)
        X = np.zeros((len(sites), width, *sites[0].X.shape[1:]))
        y = np.zeros((len(sites), width, *sites[0].y.shape[1:]))
        for i, d in enumerate(sites):
            X[i, : d.n], y[i, : d.n] = d.X, d.y
        return cls(X, y, (np.arange(width) < n[:, None]).astype(np.float64), n)

    def take(self, rows: np.ndarray | None) -> StackedRows:
        if rows is None:
            return self
        return StackedRows(self.X[rows], self.y[rows], None if self.mask is None else self.mask[rows], self.n[rows])


# --- the array program: pure functions over stacked arrays ---------------------------------------
#
# Shapes: S sites, n (padded) rows, d features, ``out`` the model's outputs per row: () for the
# logistic and linear models (weight (d,), bias (1,)), (K,) for softmax and multi-label (weight
# (d, K), bias (K,)). Stacked: X (S, n, d), W (S, d, *out), b (S, *out), z and r (S, n, *out).


def _along(v: np.ndarray, like: np.ndarray) -> np.ndarray:
    """``v`` (S,) or (S, n) with trailing unit axes to broadcast against ``like``."""
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def _link_residual(link: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The residual ``link(z) - y`` of a canonical-link model (the session's own ``link``)."""
    def residual(z: np.ndarray, y: np.ndarray) -> np.ndarray:
        r = link(z)
        r -= y
        return r

    return residual


def _softmax_residual(z: np.ndarray, index: np.ndarray) -> np.ndarray:
    """:func:`medfed.models.glm._residual` (row-wise) on every site's rows at once."""
    return _glm_residual(z.reshape(-1, z.shape[-1]), index.reshape(-1)).reshape(z.shape)


def _site_log_loss(z: np.ndarray, y: np.ndarray, mask: np.ndarray | None, n: np.ndarray) -> np.ndarray:
    """Each site's mean log-loss over its own rows, its labels' summed (multi-label), as the
    sessions sum it: ``(sum log(1 + e^z) - y . z) / n`` (the padding's y is 0: ``y . z`` needs no mask)."""
    soft = np.logaddexp(0.0, z)
    if mask is not None:
        soft *= _along(mask, soft)
    S = z.shape[0]
    return (soft.reshape(S, -1).sum(axis=1) - np.einsum("ki,ki->k", y.reshape(S, -1), z.reshape(S, -1))) / n


def _site_cross_entropy(z: np.ndarray, index: np.ndarray, mask: np.ndarray | None, n: np.ndarray) -> np.ndarray:
    """Each site's mean cross-entropy over its own rows (:func:`~medfed.models.glm.cross_entropy_rows`)."""
    rows = cross_entropy_rows(z, index)
    if mask is not None:
        rows *= mask
    return rows.sum(axis=1) / n


def _site_half_square(z: np.ndarray, y: np.ndarray, mask: np.ndarray | None, n: np.ndarray) -> np.ndarray:
    """Each site's mean ``(z - y)^2 / 2`` over its own rows."""
    r = z - y
    if mask is not None:
        r *= mask
    return 0.5 * np.einsum("kn,kn->k", r, r) / n


@dataclass(frozen=True, slots=True)
class StackedGlm:
    """A numpy model's terms on stacked rows: ``encode`` the targets as its session takes them,
    ``residual(z, target)`` each row's gradient of its data term with respect to z (the session's
    own function, padding included: the caller masks it), ``loss(z, target, mask, n)`` each
    site's mean data term (S,)."""

    encode: Callable[[np.ndarray], np.ndarray]
    residual: Callable[[np.ndarray, np.ndarray], np.ndarray]
    loss: Callable[..., np.ndarray]


def _float(y: np.ndarray) -> np.ndarray:
    return y


STACKED_GLMS: dict[type, StackedGlm] = {  # by exact type: a subclass may change any term
    LogisticRegression: StackedGlm(_float, _link_residual(LogisticSession.link), _site_log_loss),
    LinearRegression: StackedGlm(_float, _link_residual(LinearSession.link), _site_half_square),
    SoftmaxRegression: StackedGlm(SoftmaxSession.encode, _softmax_residual, _site_cross_entropy),
    MultilabelLogistic: StackedGlm(MultilabelSession.encode, MultilabelSession.residual, _site_log_loss),
}


def _decision(X: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``z = X W + b`` for every site at once: (S, n, *out)."""
    S, d = W.shape[:2]
    z = np.matmul(X, W.reshape(S, d, -1))
    z = z.reshape(*z.shape[:2], *W.shape[2:])
    z += b[:, None]
    return z


def _site_sums(r: np.ndarray, X: np.ndarray) -> np.ndarray:
    """``X_k^T r_k`` for every site: (S, d, *out)."""
    S, n = r.shape[:2]  # X^T r with X transposed in place: BLAS takes it as is (r^T X would copy r^T)
    return np.matmul(np.swapaxes(X, 1, 2), r.reshape(S, n, -1)).reshape(S, X.shape[2], *r.shape[2:])


def _masked_residual(glm: StackedGlm, z: np.ndarray, y: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The residual on each site's own rows, 0 on the padding."""
    r = glm.residual(z, y)
    if mask is not None:
        r *= _along(mask, r)
    return r


@dataclass(frozen=True, slots=True)
class Batches:
    """Each step's rows for every site: ``index`` (steps, K, B) into the padded rows, ``mask``
    (steps, K, B) 1 on a site's batch rows (None: every site's batch is all B), ``count`` (K,)
    rows in a site's batch. None of it exists for a full-batch round."""

    index: np.ndarray
    mask: np.ndarray | None
    count: np.ndarray


def draw_batches(n: np.ndarray, batch_size: int, steps: np.ndarray, rngs: Sequence[KeyedRng]) -> Batches:
    """The rows of every site's steps, drawn as in process: :func:`batch_indices` with the site's rng
    (a site with no more rows than ``batch_size`` takes all of them every step)."""
    count = np.minimum(n, batch_size)
    width, total = int(count.max()), int(steps.max())
    index = np.zeros((total, len(n), width), dtype=np.intp)
    for k, (rows, s, rng) in enumerate(zip(n.tolist(), steps.tolist(), rngs)):
        for t, batch in enumerate(batch_indices(rows, batch_size, s, rng)):
            if batch is None:
                index[t, k, :rows] = np.arange(rows)
            else:
                index[t, k, : batch.size] = batch
    mask = None
    if (count != width).any():
        mask = np.broadcast_to((np.arange(width) < count[:, None]).astype(np.float64), index.shape)
    return Batches(index, mask, count)


def _batch(rows: StackedRows, batches: Batches | None, t: int):
    """Step ``t``'s X, y, mask and row counts (all rows when full batch)."""
    if batches is None:
        return rows.X, rows.y, rows.mask, rows.n
    sites = np.arange(rows.X.shape[0])[:, None]
    index = batches.index[t]
    return (rows.X[sites, index], rows.y[sites, index], None if batches.mask is None else batches.mask[t],
            batches.count)


def _global(params: Params) -> tuple[np.ndarray, np.ndarray]:
    """The global weight (d, *out) and bias (*out): the one-output models' bias (1,) as a scalar."""
    w0 = np.asarray(params["weight"], dtype=np.float64)
    return w0, np.asarray(params["bias"], dtype=np.float64).reshape(w0.shape[1:])


def _penalty(l2: float, w0: np.ndarray) -> float:
    """The objective's L2 term at the global model (the bias is not penalized)."""
    return 0.5 * l2 * float(np.vdot(w0, w0)) if l2 else 0.0


def local_steps(rows: StackedRows, glm: StackedGlm, w0: np.ndarray, b0: np.ndarray, training: LocalTraining,
                steps: np.ndarray, batches: Batches | None, mu: float, correction: Params | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every site's SGD steps from the global model (FedAvg's; FedProx's with ``mu``; SCAFFOLD's
    with ``correction``, each site's ``c - c_i`` stacked in the parameter view): the trained
    weights (S, d, *out), biases (S, *out) and each site's objective at the start on all its rows."""
    S = rows.X.shape[0]
    lr, l2 = training.lr, training.l2
    shift_w = shift_b = None
    if correction is not None:  # as the optimizer adds it: lr folded into the weight's, the bias's as is
        shift_w, shift_b = lr * correction["weight"], correction["bias"].reshape(S, *b0.shape)
    W = np.repeat(w0[None], S, axis=0)
    b = np.repeat(b0[None], S, axis=0)
    start = None
    uniform = bool((steps == steps[0]).all())
    for t in range(int(steps.max())):
        X, y, mask, count = _batch(rows, batches, t)
        z = _decision(X, W, b)
        if t == 0 and batches is None:  # full batch: the loss at the global model from the first pass
            start = glm.loss(z, y, mask, count)
        r = _masked_residual(glm, z, y, mask)
        g = _site_sums(r, X)
        g *= _along(lr / count, g)  # the optimizer's fold of lr into the mean (client/optimizer.py)
        if l2:
            g += (lr * l2) * W
        if mu:
            g += (lr * mu) * (W - w0)
        if shift_w is not None:
            g += shift_w
        g_b = r.sum(axis=1)
        g_b /= _along(count, g_b)
        if mu:
            g_b += mu * (b - b0)
        if shift_b is not None:
            g_b += shift_b
        if not uniform:  # a site past its own step count (local epochs) stands still
            done = steps <= t
            g[done], g_b[done] = 0.0, 0.0
        W -= g
        b += -lr * g_b
    if start is None:  # mini-batches (or no steps): the loss on all rows at the global model
        z = _decision(rows.X, np.repeat(w0[None], S, axis=0), np.repeat(b0[None], S, axis=0))
        start = glm.loss(z, rows.y, rows.mask, rows.n)
    return W, b, start + _penalty(l2, w0)


def site_gradients(rows: StackedRows, glm: StackedGlm, w0: np.ndarray, b0: np.ndarray, l2: float,
                   batches: Batches | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FedSGD's uploads: every site's gradient at the global model (on its step-0 batch with
    mini-batches), the bias's, and its objective there on all its rows."""
    S = rows.X.shape[0]
    W, b = np.repeat(w0[None], S, axis=0), np.repeat(b0[None], S, axis=0)
    z = _decision(rows.X, W, b)
    loss = glm.loss(z, rows.y, rows.mask, rows.n)
    X, y, mask, count = _batch(rows, batches, 0)
    if batches is not None:
        z = _decision(X, W, b)
    r = _masked_residual(glm, z, y, mask)
    g = _site_sums(r, X)
    g /= _along(count, g)
    if l2:
        g += l2 * w0
    g_b = r.sum(axis=1)
    g_b /= _along(count, g_b)
    return g, g_b, loss + _penalty(l2, w0)


def scaffold_controls(own: Params, server_control: Params, delta: Params, steps: np.ndarray, lr: float) -> Params:
    """Every site's ``c_i+ = c_i - c + (x - y) / (K lr)`` (SCAFFOLD option II, as
    :func:`~medfed.client.drift.scaffold_update` computes it), from its ``c_i`` (``own``), the
    server's ``c``, its upload ``delta = y - x`` and its step count ``K``; all stacked (K, ...)."""
    scale = 1.0 / (steps * lr)
    return {k: own[k] - server_control[k] + (-delta[k]) * scale.reshape(-1, *(1,) * (delta[k].ndim - 1))
            for k in own}


@wire_type
@dataclass
class StackedMemory:
    """:class:`~medfed.engine.runtime.SiteMemory` for every site at once, row i site ``sites[i]``:
    ``state[name]`` (N, ...) the committed state (SCAFFOLD's ``c_i``: zeros before a site's first
    commit, as its first round starts from) as of ``committed`` (N,) (-1: none yet); ``earlier``
    and ``earlier_round`` the committed state before that, for a coordinator that restarts from
    the checkpoint of the round before the sites' last commit; ``pending`` the new state of the
    sites at rows ``pending_at`` after round ``pending_round``, kept until the coordinator decides."""

    sites: tuple[str, ...]
    state: dict[str, np.ndarray]
    committed: np.ndarray
    earlier: dict[str, np.ndarray]
    earlier_round: np.ndarray
    pending_round: int | None = None
    pending_at: np.ndarray | None = None
    pending: dict[str, np.ndarray] | None = None

    @classmethod
    def zeros(cls, sites: tuple[str, ...], shapes: Mapping[str, tuple[int, ...]]) -> StackedMemory:
        def zero():
            return {k: np.zeros((len(sites), *shape)) for k, shape in shapes.items()}

        never = np.full(len(sites), -1, dtype=np.int64)
        return cls(sites, zero(), never, zero(), never.copy())

    def state_before(self, round_: int, at: np.ndarray) -> Params:
        """The committed state of the sites at rows ``at`` that a request for ``round_`` starts from
        (a site that already committed ``round_`` goes back to its earlier state, as SiteMemory does)."""
        redo = at[self.committed[at] >= round_]
        if redo.size:
            for k, v in self.state.items():
                v[redo] = self.earlier[k][redo]
            self.committed[redo] = self.earlier_round[redo]
        return {k: v[at] for k, v in self.state.items()}

    def commit(self, round_: int, accepted: Mapping[str, bool]) -> None:
        """The coordinator's decisions on ``round_``'s uploads: the accepted sites keep their pending
        state, the others their committed one."""
        if self.pending_round != round_:
            return  # already decided, or about an upload no longer held
        keep = np.array([accepted.get(self.sites[i], False) for i in self.pending_at.tolist()], dtype=bool)
        rows = self.pending_at[keep]
        for k, v in self.state.items():
            self.earlier[k][rows] = v[rows]
            v[rows] = self.pending[k][keep]
        self.earlier_round[rows] = self.committed[rows]
        self.committed[rows] = round_
        self.pending_round, self.pending_at, self.pending = None, None, None

    def site_state(self, i: int) -> ScaffoldSiteState | None:
        """Site ``i``'s committed state as the in-process runtime holds it (None before any commit)."""
        if self.committed[i] < 0:
            return None
        return ScaffoldSiteState({k: v[i].copy() for k, v in self.state.items()})


# --- the executor -----------------------------------------------------------------------------


class VectorizedExecutor:
    """The cohort's sites as rows of stacked arrays in this process (see the module docstring)."""

    def __init__(
        self,
        program: SiteProgram,
        sites: Sequence[LocalData],
        rng: KeyedRng,
        *,
        faults: Faults | None = None,
        state_dir: Path | None = None,  # where the stacked site state is kept (SCAFFOLD's c_i), if any
    ) -> None:
        check_vectorized(program.algorithm.name, program.algorithm, program.training, codec=program.codec,
                         secure=program.secure is not None)
        self.rule = batched_rule(program.algorithm)
        self.training = program.training
        self.data = tuple(sites)
        self.sites = tuple(d.name for d in sites)
        self.torch = _torch_model(program.training.model)
        self.glm = None if self.torch else STACKED_GLMS[type(program.training.model)]
        rows = StackedRows.of(sites)
        self.rows = rows if self.glm is None else dataclasses.replace(rows, y=self.glm.encode(rows.y))
        self.position = {name: i for i, name in enumerate(self.sites)}
        self.keys = np.array([name_key(s) for s in self.sites])
        # local epochs give each site its own step count (for_site); FedSGD takes one gradient
        self.steps = np.array([program.training.for_site(int(n)).steps for n in self.rows.n], dtype=np.intp)
        self.rng = rng
        self.faults = faults or Faults()
        self._path = None if state_dir is None else Path(state_dir) / "vectorized.state"
        self.memory: StackedMemory | None = self._load() if self.rule.control else None

    def _load(self) -> StackedMemory | None:
        if self._path is None or not self._path.exists():
            return None
        memory = decode(self._path.read_bytes(), str(self._path))
        if not isinstance(memory, StackedMemory) or memory.sites != self.sites:
            raise ConfigError(f"{self._path}: the saved site state is not this federation's "
                              f"({len(self.sites)} sites); start without --resume or use another --out")
        return memory

    def _save(self) -> None:
        if self._path is not None and self.memory is not None:
            write_bytes_atomically(self._path, encode(self.memory), durable=False)

    def setup(self) -> dict[str, SiteSetup]:
        return {d.name: SiteSetup.of(d) for d in self.data}

    def _cohort(self, cohort: tuple[str, ...]) -> np.ndarray | None:
        """The cohort's positions in the stacked rows (None: everyone, in order: no copy)."""
        if cohort == self.sites:
            return None
        return np.fromiter((self.position[s] for s in cohort), dtype=np.intp, count=len(cohort))

    def train(self, plan: RoundPlan) -> StackedReplies:
        cohort, missing = plan.cohort, {}
        if self.faults:
            missing = {s: why for s in cohort if (why := self.faults.dropped(s, plan.round)) is not None}
            cohort = tuple(s for s in cohort if s not in missing)
        if not cohort:  # everyone dropped out: nothing to train, the server skips the round
            return StackedReplies(StackedUploads((), {}, np.zeros(0), self.rule.kind, {}), 0, missing)
        at = self._cohort(cohort)
        rows = self.rows.take(at)
        steps = self.steps if at is None else self.steps[at]
        training, rule = self.training, self.rule
        batches = None
        if training.batch_size is not None and cohort and (rows.n > training.batch_size).any():
            keys = self.keys if at is None else self.keys[at]
            rngs = [self.rng.child(plan.round, TRAIN_STREAM, int(k)) for k in keys.tolist()]
            drawn = steps if rule.kind == "delta" else np.ones_like(steps)  # FedSGD: one batch
            batches = draw_batches(rows.n, training.batch_size, drawn, rngs)
        if rule.control:
            return self._train_scaffold(plan, cohort, at, rows, steps, batches, missing)
        if self.torch:
            return self._train_torch(plan, cohort, rows, steps, batches, missing)
        w0, b0 = _global(plan.params)
        if rule.kind == "gradient":
            weight, bias, loss = site_gradients(rows, self.glm, w0, b0, training.l2, batches)
        else:
            W, b, loss = local_steps(rows, self.glm, w0, b0, training, steps, batches, rule.mu)
            weight, bias = W - w0, b - b0
        bias_shape = np.shape(plan.params["bias"])
        stack = StackedUploads(cohort, {"weight": weight, "bias": bias.reshape(-1, *bias_shape)},
                               rows.n.astype(np.float64), rule.kind, {"loss": loss})
        return StackedReplies(stack, weight.itemsize * (w0.size + b0.size), missing)

    def _train_scaffold(self, plan: RoundPlan, cohort: tuple[str, ...], at: np.ndarray | None, rows: StackedRows,
                        steps: np.ndarray, batches: Batches | None, missing: dict[str, str]) -> StackedReplies:
        """SCAFFOLD's round: the steps corrected by ``c - c_i``, the new ``c_i`` pending until
        :meth:`commit`; the upload's extras hold ``c_i+ - c_i`` only (``c_i`` never leaves)."""
        if (steps < 1).any():
            raise ConfigError(f"scaffold needs at least one local step, got {int(steps.min())}")
        params = {k: np.asarray(v, dtype=np.float64) for k, v in plan.params.items()}
        if self.memory is None:
            self.memory = StackedMemory.zeros(self.sites, {k: v.shape for k, v in params.items()})
        where = np.arange(len(self.sites)) if at is None else at
        own = self.memory.state_before(plan.round, where)
        server = {k: np.asarray(v, dtype=np.float64) for k, v in plan.message["server_control"].items()}
        correction = {k: server[k] - own[k] for k in params}
        w0, b0 = _global(params)
        W, b, loss = local_steps(rows, self.glm, w0, b0, self.training, steps, batches, self.rule.mu, correction)
        delta = {"weight": W - w0, "bias": (b - b0).reshape(-1, *params["bias"].shape)}
        new_own = scaffold_controls(own, server, delta, steps, self.training.lr)
        m = self.memory
        m.pending_round, m.pending_at, m.pending = plan.round, where, new_own
        self._save()
        stack = StackedUploads(cohort, delta, rows.n.astype(np.float64), "delta", {"loss": loss},
                               {"control_delta": {k: new_own[k] - own[k] for k in params}})
        return StackedReplies(stack, 2 * W.itemsize * (w0.size + b0.size), missing)  # the delta and c_i+ - c_i

    def _train_torch(self, plan: RoundPlan, cohort: tuple[str, ...], rows: StackedRows, steps: np.ndarray,
                     batches: Batches | None, missing: dict[str, str]) -> StackedReplies:
        """FedAvg's or FedProx's round on a torch model: every site's SGD steps at once through
        ``torch.func.vmap`` (:func:`~medfed.models.torch_models.train_stacked`)."""
        from medfed.models.torch_models import train_stacked

        training = self.training
        params = {k: np.asarray(v, dtype=np.float64) for k, v in plan.params.items()}
        if batches is None:
            index, mask, count = None, rows.mask, rows.n
        else:
            index, mask, count = batches.index, batches.mask, batches.count
        out = train_stacked(training.model, params, rows.X, rows.y, steps, index=index, mask=mask,
                            count=count.astype(np.float64), lr=training.lr, l2=training.l2, mu=self.rule.mu)
        head = training.model.head  # each site's start loss as its session's: the head's mean on its own rows
        loss = np.array([head.mean_loss(out.start_logits[k, :n], head.targets(rows.y[k, :n]))
                         for k, n in enumerate(rows.n.tolist())])
        if training.l2:  # the objective's L2 term at the global model, as the optimizer's penalty adds it
            loss = loss + 0.5 * training.l2 * sum(float(np.vdot(params[k], params[k])) for k in out.decayed)
        delta = {k: out.params[k] - params[k] for k in params}
        stack = StackedUploads(cohort, delta, rows.n.astype(np.float64), "delta", {"loss": loss})
        return StackedReplies(stack, sum(v[0].nbytes for v in delta.values()), missing)

    def stage(self, name: str, round_: int, messages: Mapping[str, Any]) -> dict[str, Any]:
        raise ConfigError(f"executor 'vectorized' has no {name!r} stage: "
                          "secure aggregation runs on --executor inprocess")

    def commit(self, round_: int, decisions: Mapping[str, bool]) -> None:
        if self.memory is not None:  # the other batched rules keep no site state
            self.memory.commit(round_, decisions)
            self._save()

    def personalize(self, plan: RoundPlan) -> dict[str, Params]:
        raise ConfigError("executor 'vectorized' trains no personal models; use --executor inprocess")

    def site_states(self) -> dict[str, Any]:
        if self.memory is None:
            return dict.fromkeys(self.sites)
        return {name: self.memory.site_state(i) for i, name in enumerate(self.sites)}

    def close(self) -> None:
        pass
