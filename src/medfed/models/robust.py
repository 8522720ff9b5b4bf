"""The numpy classifiers trained with a noise-robust loss (:mod:`medfed.models.losses`: GCE, SCE).

Each is its plain model with two terms swapped in its session: the mean data term becomes the
mean of :meth:`RobustLoss.rows` over the rows' (labels') cross-entropies, and each row's residual
(cross-entropy's gradient with respect to its scores) is scaled by :meth:`RobustLoss.factor` —
the closed-form gradient, so the client optimizer, DP-SGD's per-example gradients (whose norms
follow the scaled residuals) and every method run on them unchanged. They are their own types
so that nothing keyed on the plain models' exact type (the vectorized executor's batched
cross-entropy) trains them with the wrong loss: it refuses them instead.
"""

from __future__ import annotations

import numpy as np

from medfed.models.glm import MultilabelLogistic, MultilabelSession, SoftmaxRegression, SoftmaxSession, cross_entropy_rows
from medfed.models.logistic import LogisticRegression, LogisticSession, Params
from medfed.models.losses import RobustLoss, binary_ce_rows

_sum = np.add.reduce


class _RobustTerms:
    """A session's data term and residual under the session's ``objective`` (a :class:`RobustLoss`);
    ``ce_rows(z, target)`` gives each row's (each label's) cross-entropy."""

    __slots__ = ()

    def data_loss(self, z: np.ndarray, target: np.ndarray) -> float:
        return float(_sum(self.objective.rows(self.ce_rows(z, target)), axis=None) / z.shape[0])

    def residual(self, z: np.ndarray, target: np.ndarray) -> np.ndarray:
        r = super().residual(z, target)
        f = self.objective.factor(self.ce_rows(z, target))
        r *= f if f.ndim == r.ndim else f[:, None]  # softmax: one factor per row, K residuals
        return r


class RobustLogisticSession(_RobustTerms, LogisticSession):
    __slots__ = ("objective",)
    ce_rows = staticmethod(binary_ce_rows)

    def __init__(self, params: Params, X: np.ndarray, y: np.ndarray, objective: RobustLoss) -> None:
        self.objective = objective
        super().__init__(params, X, y)


class RobustSoftmaxSession(_RobustTerms, SoftmaxSession):
    __slots__ = ("objective",)
    ce_rows = staticmethod(cross_entropy_rows)

    def __init__(self, params: Params, X: np.ndarray, y: np.ndarray, objective: RobustLoss) -> None:
        self.objective = objective
        super().__init__(params, X, y)


class RobustMultilabelSession(_RobustTerms, MultilabelSession):
    __slots__ = ("objective",)
    ce_rows = staticmethod(binary_ce_rows)  # per label: each label is a binary problem

    def __init__(self, params: Params, X: np.ndarray, y: np.ndarray, objective: RobustLoss) -> None:
        self.objective = objective
        super().__init__(params, X, y)


class _RobustModel:
    """The model-level loss, gradient and per-example gradients, all through the robust session
    (the plain models compute them in closed form with cross-entropy)."""

    robust_session: type

    def session(self, params: Params, X: np.ndarray, y: np.ndarray):
        return self.robust_session(params, X, y, self.objective)

    def loss(self, params: Params, X: np.ndarray, y: np.ndarray, l2: float = 0.0) -> float:
        W = params["weight"]
        with self.session(params, X, y) as s:
            return s.loss() + 0.5 * l2 * float(np.vdot(W, W))

    def gradient(self, params: Params, X: np.ndarray, y: np.ndarray, l2: float = 0.0, *,
                 with_loss: bool = False) -> tuple[dict[str, np.ndarray], float | None]:
        W = params["weight"]
        with self.session(params, X, y) as s:
            grads, loss = s.gradient(None, with_loss=with_loss)
        grads = {"weight": grads["weight"] + l2 * W, "bias": np.atleast_1d(np.asarray(grads["bias"], dtype=np.float64))}
        return grads, None if loss is None else loss + 0.5 * l2 * float(np.vdot(W, W))

    def per_example_gradients(self, params: Params, X: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        with self.session(params, X, y) as s:
            r = s.example_gradients(np.arange(X.shape[0])).residual
        if r.ndim == 1:  # binary: one score per row
            return {"weight": r[:, None] * X, "bias": r[:, None]}
        return {"weight": X[:, :, None] * r[:, None, :], "bias": r}


class RobustLogistic(_RobustModel, LogisticRegression):
    """Binary logistic regression with a robust loss."""

    robust_session = RobustLogisticSession

    def __init__(self, objective: RobustLoss) -> None:
        self.objective = objective


class RobustSoftmax(_RobustModel, SoftmaxRegression):
    """Softmax regression with a robust loss."""

    robust_session = RobustSoftmaxSession

    def __init__(self, n_classes: int, objective: RobustLoss) -> None:
        super().__init__(n_classes)
        self.objective = objective


class RobustMultilabel(_RobustModel, MultilabelLogistic):
    """Multi-label logistic regression with a robust loss on each label."""

    robust_session = RobustMultilabelSession

    def __init__(self, n_classes: int, objective: RobustLoss) -> None:
        super().__init__(n_classes)
        self.objective = objective


ROBUST_GLMS = {"logistic": RobustLogistic, "softmax": RobustSoftmax, "multilabel_logistic": RobustMultilabel}
"""The numpy GLM each classification model becomes with a robust loss."""
