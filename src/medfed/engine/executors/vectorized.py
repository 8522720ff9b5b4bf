"""Every selected site's local steps as one array program: the vectorized executor (issue 13 §1).

For the numpy logistic model the federation's rows are stacked once, with a leading site axis
and padded to a common row count (``X``: (K, n_max, d), a row mask where sites differ in size).
A round trains the whole cohort with batched matrix products (``z = X W``, ``X^T r`` per site)
and hands the server the uploads already stacked (:class:`~medfed.engine.protocol.StackedReplies`),
which it screens and aggregates on the stacked arrays: no per-site object on the hot path of a
full-batch round. Mini-batches come from each site's own keyed rng through the same
:func:`~medfed.client.local.batch_indices` as in process (the one loop over sites), so the draws agree.

Site rules it batches: FedAvg's (:func:`~medfed.client.local.local_sgd_update`, with any server
chain: FedAvgM, FedAdam, the robust aggregators, ...), FedProx's and FedSGD's. Anything else (other
site rules, personal or private parameters, DP, compression, secure aggregation, torch models) is
refused before training with the reason and ``--executor inprocess``.

Numbers: each step does the in-process optimizer's elementwise operations in the same order
(:mod:`medfed.client.optimizer`: ``lr / n`` folded into ``X^T r``, then ``lr * l2 * W``, then
``lr * mu * (W - W0)``); only the reductions' summation order differs (batched products, row sums),
so results agree with the ``inprocess`` executor within a few ulps per step: 1e-12 relative is tested.
The sites keep no state (these rules have none), so ``--resume`` needs only the driver's checkpoints.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfed.client.local import (
    LocalData,
    LocalTraining,
    batch_indices,
    fedprox_update,
    fedsgd_gradient,
    local_sgd_update,
)
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
from medfed.models.logistic import LogisticRegression, sigmoid
from medfed.rng import KeyedRng, name_key
from medfed.server.aggregate import StackedUploads

BATCHED = "FedAvg's, FedProx's and FedSGD's site rules (with any server chain on FedAvg's client)"


@dataclass(frozen=True, slots=True)
class BatchedRule:
    """A site rule the executor runs as array operations: ``kind`` ``"delta"`` (local steps from
    the global model, FedProx's pull ``mu`` toward it) or ``"gradient"`` (FedSGD: the gradient at it)."""

    kind: str
    mu: float = 0.0


def batched_rule(algorithm: FederatedAlgorithm) -> BatchedRule | None:
    """The batched form of the method's site rule, or None when it has none (known by identity:
    a wrapped or new rule may do anything, so only these three are trusted)."""
    rule = algorithm.local_update
    if rule is local_sgd_update:
        return BatchedRule("delta")
    if rule is fedsgd_gradient:
        return BatchedRule("gradient")
    if isinstance(rule, functools.partial) and rule.func is fedprox_update and not rule.args \
            and set(rule.keywords) == {"mu"}:
        return BatchedRule("delta", float(rule.keywords["mu"]))
    return None


def refusal(algorithm: FederatedAlgorithm, training: LocalTraining, *, codec: Any = None, secure: bool = False,
            dp: str = "none") -> str | None:
    """Why the method cannot run vectorized, or None."""
    if not isinstance(training.model, LogisticRegression):
        return f"it batches the numpy logistic model only, not {getattr(training.model, 'name', training.model)!r}"
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
    if algorithm.broadcast is not None:
        return "its server message (broadcast) is not batched"
    if batched_rule(algorithm) is None:
        return f"its site rule is not batched (only {BATCHED})"
    return None


def check_vectorized(method: str, algorithm: FederatedAlgorithm, training: LocalTraining, **parts) -> None:
    """Refuse, in one line naming the method and the fix, a method the executor cannot batch."""
    why = refusal(algorithm, training, **parts)
    if why is not None:
        raise ConfigError(f"method {method!r} cannot run on executor 'vectorized': {why}; use --executor inprocess")


@dataclass(frozen=True, slots=True)
class StackedRows:
    """The federation's training rows with a leading site axis, padded to the largest site's row
    count: ``X`` (K, n, d), ``y`` (K, n), ``mask`` (K, n) 1 on a site's own rows (None when all
    sites have n rows), ``n`` (K,) each site's row count."""

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
        X = np.zeros((len(sites), width, sites[0].X.shape[1]))
        y = np.zeros((len(sites), width))
        for i, d in enumerate(sites):
            X[i, : d.n], y[i, : d.n] = d.X, d.y
        return cls(X, y, (np.arange(width) < n[:, None]).astype(np.float64), n)

    def take(self, rows: np.ndarray | None) -> StackedRows:
        if rows is None:
            return self
        return StackedRows(self.X[rows], self.y[rows], None if self.mask is None else self.mask[rows], self.n[rows])


# --- the array program: pure functions over stacked arrays ---------------------------------------


def _decision(X: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``z = X w + b`` for every site at once: (K, n) from (K, n, d), (K, d), (K,)."""
    z = np.matmul(X, W[:, :, None])[..., 0]
    z += b[:, None]
    return z


def _residual(z: np.ndarray, y: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """``sigmoid(z) - y`` on each site's own rows, 0 on the padding."""
    r = sigmoid(z)
    r -= y
    if mask is not None:
        r *= mask
    return r


def _mean_log_loss(z: np.ndarray, y: np.ndarray, mask: np.ndarray | None, n: np.ndarray) -> np.ndarray:
    """Each site's mean log-loss over its own rows (the padding's y is 0, so ``y z`` needs no mask)."""
    soft = np.logaddexp(0.0, z)
    if mask is not None:
        soft *= mask
    return (soft.sum(axis=1) - np.einsum("kn,kn->k", y, z)) / n


def _site_sums(r: np.ndarray, X: np.ndarray) -> np.ndarray:
    """``X_k^T r_k`` for every site: (K, d)."""
    return np.matmul(r[:, None, :], X)[:, 0, :]


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


def local_steps(rows: StackedRows, w0: np.ndarray, b0: float, training: LocalTraining, steps: np.ndarray,
                batches: Batches | None, mu: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every site's SGD steps from the global model (FedAvg's; FedProx's with ``mu``): the trained
    weights (K, d), biases (K,) and each site's objective at the start on all its rows."""
    K = rows.X.shape[0]
    lr, l2 = training.lr, training.l2
    W = np.repeat(w0[None, :], K, axis=0)
    b = np.full(K, b0)
    start = None
    uniform = bool((steps == steps[0]).all())
    for t in range(int(steps.max())):
        X, y, mask, count = _batch(rows, batches, t)
        z = _decision(X, W, b)
        if t == 0 and batches is None:  # full batch: the loss at the global model from the first pass
            start = _mean_log_loss(z, y, mask, count)
        r = _residual(z, y, mask)
        g = _site_sums(r, X)
        g *= (lr / count)[:, None]  # the optimizer's fold of lr into the mean (client/optimizer.py)
        if l2:
            g += (lr * l2) * W
        if mu:
            g += (lr * mu) * (W - w0)
        g_b = r.sum(axis=1) / count
        if mu:
            g_b += mu * (b - b0)
        if not uniform:  # a site past its own step count (local epochs) stands still
            done = steps <= t
            g[done], g_b[done] = 0.0, 0.0
        W -= g
        b += -lr * g_b
    if start is None:  # mini-batches (or no steps): the loss on all rows at the global model
        start = _mean_log_loss(_decision(rows.X, np.repeat(w0[None, :], K, axis=0), np.full(K, b0)), rows.y,
                               rows.mask, rows.n)
    if l2:
        start = start + 0.5 * l2 * float(np.vdot(w0, w0))
    return W, b, start


def site_gradients(rows: StackedRows, w0: np.ndarray, b0: float, l2: float, batches: Batches | None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FedSGD's uploads: every site's gradient at the global model (on its step-0 batch with
    mini-batches), the bias's, and its objective there on all its rows."""
    K = rows.X.shape[0]
    W, b = np.repeat(w0[None, :], K, axis=0), np.full(K, b0)
    z = _decision(rows.X, W, b)
    loss = _mean_log_loss(z, rows.y, rows.mask, rows.n)
    X, y, mask, count = _batch(rows, batches, 0)
    if batches is not None:
        z = _decision(X, W, b)
    r = _residual(z, y, mask)
    g = _site_sums(r, X)
    g /= count[:, None]
    if l2:
        g += l2 * w0
    return g, r.sum(axis=1) / count, loss + 0.5 * l2 * float(w0 @ w0)


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
        state_dir: Path | None = None,  # nothing to keep: the batched rules hold no site state
    ) -> None:
        check_vectorized(program.algorithm.name, program.algorithm, program.training, codec=program.codec,
                         secure=program.secure is not None)
        self.rule = batched_rule(program.algorithm)
        self.training = program.training
        self.data = tuple(sites)
        self.sites = tuple(d.name for d in sites)
        self.rows = StackedRows.of(sites)
        self.position = {name: i for i, name in enumerate(self.sites)}
        self.keys = np.array([name_key(s) for s in self.sites])
        # local epochs give each site its own step count (for_site); FedSGD takes one gradient
        self.steps = np.array([program.training.for_site(int(n)).steps for n in self.rows.n], dtype=np.intp)
        self.rng = rng
        self.faults = faults or Faults()

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
        w0, b0 = np.asarray(plan.params["weight"], dtype=np.float64), float(plan.params["bias"][0])
        batches = None
        if training.batch_size is not None and cohort and (rows.n > training.batch_size).any():
            keys = self.keys if at is None else self.keys[at]
            rngs = [self.rng.child(plan.round, TRAIN_STREAM, int(k)) for k in keys.tolist()]
            drawn = steps if rule.kind == "delta" else np.ones_like(steps)  # FedSGD: one batch
            batches = draw_batches(rows.n, training.batch_size, drawn, rngs)
        if rule.kind == "gradient":
            weight, bias, loss = site_gradients(rows, w0, b0, training.l2, batches)
        else:
            W, b, loss = local_steps(rows, w0, b0, training, steps, batches, rule.mu)
            weight, bias = W - w0, b - b0
        stack = StackedUploads(cohort, {"weight": weight, "bias": bias[:, None]}, rows.n.astype(np.float64),
                               rule.kind, {"loss": loss})
        return StackedReplies(stack, weight.itemsize * (w0.size + 1), missing)

    def stage(self, name: str, round_: int, messages: Mapping[str, Any]) -> dict[str, Any]:
        raise ConfigError(f"executor 'vectorized' has no {name!r} stage: "
                          "secure aggregation runs on --executor inprocess")

    def commit(self, round_: int, decisions: Mapping[str, bool]) -> None:
        pass  # the batched rules keep no site state: nothing to keep or drop

    def personalize(self, plan: RoundPlan) -> dict[str, Params]:
        raise ConfigError("executor 'vectorized' trains no personal models; use --executor inprocess")

    def site_states(self) -> dict[str, Any]:
        return dict.fromkeys(self.sites)

    def close(self) -> None:
        pass
