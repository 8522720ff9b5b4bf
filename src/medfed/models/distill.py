"""Soft targets for knowledge distillation (Hinton et al., 2015) in the numpy classifiers' sessions.

A row's loss is ``(1 - lam) CE(y, p_s) + lam T² KL(p_t^T || p_s^T)`` with ``p^T = softmax(z / T)``
(binary: ``sigmoid(z / T)``), ``p_t^T`` the teacher's softened probabilities. Its gradient with
respect to the student's scores is ``(1 - lam) (p_s - onehot(y)) + lam T (p_s^T - p_t^T)``: the
``T²`` keeps the soft term's gradient of the same order whatever ``T`` (the paper's reason for it).

The seam is the one :mod:`medfed.models.robust` uses: a session whose ``residual`` and
``data_loss`` are swapped, so the client optimizer (mini-batches, L2, DP-SGD's per-example
gradients) runs unchanged. The teacher's probabilities travel with the rows as extra target
columns (:func:`pack`): column 0 the label (class index), then the teacher's 1 (binary) or K
probabilities, so a batch's rows pick their own soft targets wherever the optimizer indexes ``y``.
An unlabeled row (label ``NaN``, :data:`UNLABELED`) has no hard term: its loss is ``lam T² KL`` alone.

The torch models take the same packed targets through their head's optional loss
(:meth:`medfed.models.torch_models.TorchModel.with_objective`, the seam ``--loss gce`` uses), with
this module's :func:`packed_mean_loss` as the loss they report; :func:`student` picks the one or the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medfed.models.glm import SoftmaxSession, cross_entropy_rows, softmax
from medfed.models.logistic import LogisticSession, Params, sigmoid

_sum = np.add.reduce


@dataclass(frozen=True)
class Distillation:
    """The distillation term's temperature ``T > 0`` and weight ``lam`` in [0, 1]."""

    temperature: float = 2.0
    weight: float = 0.5

    def mix(self, hard: np.ndarray, soft: np.ndarray) -> np.ndarray:
        """``(1 - lam) hard + lam T soft`` from the hard and soft residuals, in ``hard``; with
        ``lam = 0`` ``hard`` is returned untouched (plain training's numbers, bit for bit)."""
        lam, T = self.weight, self.temperature
        hard *= 1.0 - lam
        if lam:
            hard += (lam * T) * soft
        return hard

    def mean_loss(self, ce: np.ndarray, kl: np.ndarray) -> float:
        """The batch's mean of ``(1 - lam) CE + lam T² KL`` from each row's CE and KL."""
        lam, T = self.weight, self.temperature
        return float(_sum((1.0 - lam) * ce + (lam * T * T) * kl) / ce.shape[0])


def soften(scores: np.ndarray, temperature: float) -> np.ndarray:
    """Softened probabilities of scores: ``sigmoid(z / T)`` for one score per row, else the
    row-wise ``softmax(z / T)``."""
    z = np.asarray(scores, dtype=np.float64) / temperature
    return sigmoid(z) if z.ndim == 1 else softmax(z)


UNLABELED = np.nan
"""The label column's value on a row without a label: only the soft term trains on it."""


def pack(y: np.ndarray, soft: np.ndarray) -> np.ndarray:
    """The session's targets: the labels (:data:`UNLABELED` where a row has none), then the
    teacher's softened probabilities."""
    return np.column_stack([np.asarray(y, dtype=np.float64), soft])


def _known(labels: np.ndarray) -> np.ndarray:
    return ~np.isnan(labels)


def class_index(labels: np.ndarray) -> np.ndarray:
    """The label column as class indices, 0 on unlabeled rows (whose hard term is masked out)."""
    return np.where(_known(labels), labels, 0.0).astype(np.intp)


def packed_mean_loss(soft: Distillation, z: np.ndarray, packed: np.ndarray) -> float:
    """The batch's mean distillation objective at scores ``z`` (``(n,)`` binary, ``(n, K)``
    multiclass) and packed targets; an unlabeled row's cross-entropy counts 0."""
    labels = packed[:, 0]
    known = _known(labels)
    if z.ndim == 1:
        ce = np.logaddexp(0.0, z) - np.where(known, labels, 0.0) * z
        kl = binary_kl_rows(z, packed[:, 1], soft.temperature)
    else:
        ce = cross_entropy_rows(z, class_index(labels))
        kl = kl_rows(z, packed[:, 1:], soft.temperature)
    return soft.mean_loss(np.where(known, ce, 0.0), kl)


def _plogp(q: np.ndarray) -> np.ndarray:
    return q * np.log(np.where(q > 0, q, 1.0))  # 0 log 0 = 0


def binary_kl_rows(z: np.ndarray, q_t: np.ndarray, temperature: float) -> np.ndarray:
    """``KL(Bern(q_t) || Bern(sigmoid(z / T)))`` per row, finite for any finite z."""
    u = z / temperature
    return np.logaddexp(0.0, u) - q_t * u + _plogp(q_t) + _plogp(1.0 - q_t)


def kl_rows(z: np.ndarray, q_t: np.ndarray, temperature: float) -> np.ndarray:
    """``KL(q_t || softmax(z / T))`` per row over the K classes."""
    u = z / temperature
    top = u.max(axis=1, keepdims=True)
    log_p = u - (top + np.log(np.exp(u - top).sum(axis=1, keepdims=True)))
    return _plogp(q_t).sum(axis=1) - (q_t * log_p).sum(axis=1)


class DistillLogisticSession(LogisticSession):
    """The binary logistic session on packed targets ``(n, 2)``: label, teacher's ``sigmoid(t / T)``."""

    __slots__ = ("soft",)

    def __init__(self, params: Params, X: np.ndarray, y: np.ndarray, soft: Distillation) -> None:
        self.soft = soft
        super().__init__(params, X, y)

    def residual(self, z: np.ndarray, y: np.ndarray) -> np.ndarray:
        hard = sigmoid(z)
        hard -= y[:, 0]
        if not self.soft.weight:
            return hard
        hard[~_known(y[:, 0])] = 0.0  # an unlabeled row: the soft term alone
        return self.soft.mix(hard, sigmoid(z / self.soft.temperature) - y[:, 1])

    def data_loss(self, z: np.ndarray, y: np.ndarray) -> float:
        if not self.soft.weight:
            return LogisticSession.data_loss(z, np.ascontiguousarray(y[:, 0]))  # contiguous as plain training's loss, to the bit
        return packed_mean_loss(self.soft, z, y)


class DistillSoftmaxSession(SoftmaxSession):
    """The softmax session on packed targets ``(n, 1 + K)``: class index, teacher's ``softmax(t / T)``."""

    __slots__ = ("soft",)
    encode = staticmethod(lambda y: np.asarray(y, dtype=np.float64))

    def __init__(self, params: Params, X: np.ndarray, y: np.ndarray, soft: Distillation) -> None:
        self.soft = soft
        super().__init__(params, X, y)

    def residual(self, z: np.ndarray, target: np.ndarray) -> np.ndarray:
        hard = softmax(z)
        if not self.soft.weight:
            hard[np.arange(z.shape[0]), target[:, 0].astype(np.intp)] -= 1.0
            return hard
        hard[np.arange(z.shape[0]), class_index(target[:, 0])] -= 1.0
        hard[~_known(target[:, 0])] = 0.0  # an unlabeled row: the soft term alone
        return self.soft.mix(hard, softmax(z / self.soft.temperature) - target[:, 1:])

    def data_loss(self, z: np.ndarray, target: np.ndarray) -> float:
        if not self.soft.weight:
            return SoftmaxSession.data_loss(z, target[:, 0].astype(np.intp))  # plain training's loss, to the bit
        return packed_mean_loss(self.soft, z, target)


SESSIONS = {"logistic": DistillLogisticSession, "softmax": DistillSoftmaxSession}
"""The distilling session of each numpy classifier a student may be (by the model's ``name``)."""


@dataclass(frozen=True)
class Distilling:
    """A numpy classifier trained toward soft targets: what the local optimizer needs of a model
    (``session``) on packed targets (:func:`pack`)."""

    model: object
    soft: Distillation

    def session(self, params: Params, X: np.ndarray, y: np.ndarray):
        return SESSIONS[self.model.name](params, X, y, self.soft)


def student(model, soft: Distillation):
    """``model`` trained toward soft targets on packed targets: a numpy classifier's distilling
    session (:class:`Distilling`), or a torch model whose head's loss is the distillation objective."""
    if model.name in SESSIONS:
        return Distilling(model, soft)
    return model.with_objective(soft)
