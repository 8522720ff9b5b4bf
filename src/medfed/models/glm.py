"""The other tasks' numpy models: softmax (multinomial) logistic regression, linear regression and
multi-label logistic regression.

Both follow the session protocol of :mod:`medfed.models.logistic` (``session(params, X, y)``
with ``gradient``, ``example_gradients``, ``penalized``, ``scaled``, ``loss``, ``parameters``),
so every client rule of :mod:`medfed.client.optimizer` (FedAvg, FedProx, SCAFFOLD, DP-SGD) runs
on them unchanged. The bias is never penalized.

Softmax regression, K classes, parameter view ``{"weight": (d, K), "bias": (K,)}``::

    L(W, b) = mean_i [ logsumexp(z_i) - z_i[y_i] ] + (l2 / 2) ||W||_F²,   z_i = x_i W + b

which is scikit-learn's ``LogisticRegression`` (multinomial, lbfgs) objective
``C sum_i CE_i + ||W||_F² / 2`` divided by ``C n``: the same minimizer with ``C = 1 / (n l2)``.
Over-parameterized like scikit-learn's (K columns, not K - 1); the penalty makes ``W`` unique and
gradient descent from zero keeps ``sum_k b_k = 0`` (the bias gradient's entries sum to 0), so
probabilities, ``W`` and the centered bias are comparable with scikit-learn's.

Linear regression, parameter view ``{"weight": (d,), "bias": (1,)}``::

    L(w, b) = mean_i (x_i w + b - y_i)² / 2 + (l2 / 2) ||w||²

scikit-learn's ``Ridge`` objective ``||y - X w - b||² + alpha ||w||²`` divided by ``2 n``: the same
minimizer with ``alpha = n l2``.

Multi-label logistic regression, K labels (K independent sigmoids), targets ``Y`` of shape ``(n, K)``
in 0/1, parameter view ``{"weight": (d, K), "bias": (K,)}``::

    L(W, b) = mean_i sum_k [ log(1 + exp(z_ik)) - Y_ik z_ik ] + (l2 / 2) ||W||_F²,   z_i = x_i W + b

a sum of K binary logistic objectives over the same rows: column k of ``W`` is the binary
``logistic`` model fitted to label k alone (scikit-learn's ``MultiOutputClassifier`` of
``LogisticRegression`` with ``C = 1 / (n l2)``), trained together so that one round carries all K.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from medfed.errors import ConfigError
from medfed.models.logistic import LogisticSession, Params, sigmoid

_sum = np.add.reduce


def _tables_only(name: str, sample_shape: tuple[int, ...]) -> None:
    if len(sample_shape) != 1:
        raise ConfigError(f"the numpy {name} model takes feature tables; these samples have shape "
                          f"{tuple(sample_shape)} (images)")


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of scores ``(n, K)``, shifted by each row's maximum (finite for finite z)."""
    e = np.exp(z - z.max(axis=1, keepdims=True))
    e /= e.sum(axis=1, keepdims=True)
    return e


def cross_entropy_rows(z: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Each row's ``logsumexp(z) - z[y]`` from scores ``(..., K)`` and class indices ``(...)``: any
    leading axes (the vectorized executor's are sites and rows)."""
    top = z.max(axis=-1)
    lse = top + np.log(np.exp(z - top[..., None]).sum(axis=-1))
    return lse - np.take_along_axis(z, index[..., None], axis=-1)[..., 0]


def _mean_cross_entropy(z: np.ndarray, index: np.ndarray) -> float:
    return float(_sum(cross_entropy_rows(z, index)) / z.shape[0])


def _residual(z: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``softmax(z) - onehot(y)``: each row's gradient of its cross-entropy with respect to z."""
    r = softmax(z)
    r[np.arange(z.shape[0]), index] -= 1.0
    return r


def _class_index(y: np.ndarray) -> np.ndarray:
    return np.asarray(y).astype(np.intp)  # the harness hands labels over as floats


def mean_multilabel_log_loss(z: np.ndarray, Y: np.ndarray) -> float:
    """``mean_i sum_k [log(1 + exp(z_ik)) - Y_ik z_ik]``: the K labels' log-losses summed per row."""
    return float((_sum(np.logaddexp(0.0, z), axis=None) - np.vdot(Y, z)) / z.shape[0])


def _multilabel_residual(z: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """``sigmoid(z) - Y``: each row's gradient of its summed log-losses with respect to z."""
    r = sigmoid(z)
    r -= Y
    return r


def _label_matrix(y: np.ndarray) -> np.ndarray:
    return np.asarray(y, dtype=np.float64)


class SoftmaxSession:
    """One local training of the softmax model: both parameters are float64 arrays it owns.

    The multi-label model's session (:class:`MultilabelSession`) differs only in ``encode`` (the
    targets as the residual takes them), ``residual`` (each row's gradient with respect to z)
    and ``data_loss``."""

    __slots__ = ("X", "y", "target", "values", "_row_scale")

    penalized = ("weight",)
    scaled = frozenset({"weight"})
    """As :class:`~medfed.models.logistic.LogisticSession`: ``gradient`` folds ``scale`` into the weight's."""
    encode = staticmethod(_class_index)
    residual = staticmethod(_residual)
    data_loss = staticmethod(_mean_cross_entropy)

    def __init__(self, params: Params, X: np.ndarray, y: np.ndarray) -> None:
        self.X, self.y = X, y
        self.target = self.encode(y)
        self.values = {k: np.array(params[k], dtype=np.float64, copy=True) for k in ("weight", "bias")}
        self._row_scale = None

    def __enter__(self) -> SoftmaxSession:
        return self

    def __exit__(self, *exc) -> None:
        return None

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self.values.items()}

    def load(self, name: str, value: np.ndarray) -> np.ndarray:
        return np.asarray(value, dtype=np.float64)

    axpy = staticmethod(LogisticSession.axpy)

    def loss(self) -> float:
        return self.data_loss(self.X @ self.values["weight"] + self.values["bias"], self.target)

    def gradient(self, rows: np.ndarray | None, scale: float = 1.0,
                 row_weights: Callable[[np.ndarray], np.ndarray] | None = None,
                 with_loss: bool = False) -> tuple[dict, float | None]:
        """The batch's mean data-term gradient, the weight's times ``scale``; ``row_weights(y_batch)``
        weighs each row's term when given."""
        X, target = (self.X, self.target) if rows is None else (self.X[rows], self.target[rows])
        z = X @ self.values["weight"] + self.values["bias"]
        loss = None
        if with_loss:
            loss = self.data_loss(z, target) if rows is None else self.loss()
        r = self.residual(z, target)
        if row_weights is not None:
            r *= row_weights(self.y if rows is None else self.y[rows])[:, None]
        n = X.shape[0]
        g_w = X.T @ r
        g_w *= scale / n
        return {"weight": g_w, "bias": r.sum(axis=0) / n}, loss

    def example_gradients(self, rows: np.ndarray) -> SoftmaxRows:
        """The rows' own gradients, factored: a row's is ``outer([x, 1], r)``, of norm ``|r| sqrt(|x|² + 1)``."""
        if self._row_scale is None:
            self._row_scale = np.sqrt(np.einsum("ij,ij->i", self.X, self.X) + 1.0)
        X = self.X[rows]
        r = self.residual(X @ self.values["weight"] + self.values["bias"], self.target[rows])
        return SoftmaxRows(X, r, np.sqrt(np.einsum("ij,ij->i", r, r)) * self._row_scale[rows])

    def parameters(self) -> dict[str, np.ndarray]:
        return dict(self.values)


class MultilabelSession(SoftmaxSession):
    """The softmax session with K independent sigmoids: residual ``sigmoid(z) - Y``."""

    __slots__ = ()
    encode = staticmethod(_label_matrix)
    residual = staticmethod(_multilabel_residual)
    data_loss = staticmethod(mean_multilabel_log_loss)


class SoftmaxRegression:
    """Multinomial logistic regression over K classes (the module docstring gives the objective)."""

    name = "softmax"
    task = "multiclass"
    session_type = SoftmaxSession
    outputs_are = "classes"

    def __init__(self, n_classes: int) -> None:
        if n_classes is None or n_classes < 2:
            raise ConfigError(f"the {self.name} model needs at least 2 {self.outputs_are}, got {n_classes}")
        self.n_classes = int(n_classes)

    def init_params(self, sample_shape: tuple[int, ...], rng=None) -> dict[str, np.ndarray]:
        """Zero parameters: the objective is convex, so the start does not decide the optimum."""
        _tables_only(self.name, sample_shape)
        return {"weight": np.zeros((sample_shape[0], self.n_classes)), "bias": np.zeros(self.n_classes)}

    def decision(self, params: Params, X: np.ndarray) -> np.ndarray:
        """The scores ``(n, K)``."""
        return X @ params["weight"] + params["bias"]

    def predict(self, params: Params, X: np.ndarray) -> np.ndarray:
        """Class probabilities ``(n, K)``."""
        return softmax(self.decision(params, X))

    def predict_proba(self, params: Params, X: np.ndarray) -> np.ndarray:
        return self.predict(params, X)

    def loss(self, params: Params, X: np.ndarray, y: np.ndarray, l2: float = 0.0) -> float:
        W = params["weight"]
        session = self.session_type
        return session.data_loss(self.decision(params, X), session.encode(y)) + 0.5 * l2 * float(np.vdot(W, W))

    def gradient(self, params: Params, X: np.ndarray, y: np.ndarray, l2: float = 0.0, *,
                 with_loss: bool = False) -> tuple[dict[str, np.ndarray], float | None]:
        with self.session(params, X, y) as s:
            grads, loss = s.gradient(None, with_loss=with_loss)
        W = params["weight"]
        grads["weight"] += l2 * W
        return grads, None if loss is None else loss + 0.5 * l2 * float(np.vdot(W, W))

    def per_example_gradients(self, params: Params, X: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        """Each row's gradient of its own data term: ``outer(x, r)`` and ``r`` (the session's residual)."""
        session = self.session_type
        r = session.residual(self.decision(params, X), session.encode(y))
        return {"weight": X[:, :, None] * r[:, None, :], "bias": r}

    def session(self, params: Params, X: np.ndarray, y: np.ndarray) -> SoftmaxSession:
        return self.session_type(params, X, y)

    def input_gradients(self, params: Params, X: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Each row's gradient with respect to its features of its cross-entropy against soft
        ``targets`` ``(n, K)`` (probabilities, as :meth:`predict` gives): ``(p(x) - t) W^T``, shape
        ``(n, d)``; multilabel: the K sigmoids' sum. Against the model's own predictions elsewhere it
        is the gradient of their KL divergence (VAT, :mod:`medfed.client.vat`)."""
        return (self.predict(params, X) - targets) @ params["weight"].T


class MultilabelLogistic(SoftmaxRegression):
    """K independent logistic regressions trained as one model (the module docstring gives the
    objective); targets ``(n, K)`` in 0/1."""

    name = "multilabel_logistic"
    task = "multilabel"
    session_type = MultilabelSession
    outputs_are = "labels"

    def predict(self, params: Params, X: np.ndarray) -> np.ndarray:
        """Each label's probability ``(n, K)``."""
        return sigmoid(self.decision(params, X))


class SoftmaxRows:
    """Per-example gradients ``outer([x_i, 1], r_i)`` without forming them: their norms and weighted sums."""

    __slots__ = ("X", "residual", "norms")

    def __init__(self, X: np.ndarray, residual: np.ndarray, norms: np.ndarray) -> None:
        self.X, self.residual, self.norms = X, residual, norms

    def weighted_sum(self, factors: np.ndarray) -> dict:
        """``sum_i factors_i g_i`` (the residuals are scaled in place: call once)."""
        r = self.residual
        r *= factors[:, None]
        return {"weight": self.X.T @ r, "bias": r.sum(axis=0)}


# --- linear regression ------------------------------------------------------------------------


def _identity(z: np.ndarray) -> np.ndarray:
    return z  # z is a fresh array from X @ w + b: the residual may be formed in it


def _half_mean_square(z: np.ndarray, y: np.ndarray) -> float:
    r = z - y
    return float(0.5 * (r @ r) / z.shape[0])


class LinearSession(LogisticSession):
    """The logistic session with the identity link: the squared error's gradient is ``(z - y) [x, 1]``."""

    __slots__ = ()
    link = staticmethod(_identity)
    data_loss = staticmethod(_half_mean_square)


class LinearRegression:
    """Least-squares linear regression with L2 (ridge); the module docstring gives the objective."""

    name = "linear"
    task = "regression"

    def init_params(self, sample_shape: tuple[int, ...], rng=None) -> dict[str, np.ndarray]:
        _tables_only(self.name, sample_shape)
        return {"weight": np.zeros(sample_shape[0]), "bias": np.zeros(1)}

    def decision(self, params: Params, X: np.ndarray) -> np.ndarray:
        return X @ params["weight"] + params["bias"][0]

    predict = decision

    def loss(self, params: Params, X: np.ndarray, y: np.ndarray, l2: float = 0.0) -> float:
        w = params["weight"]
        return _half_mean_square(self.decision(params, X), y) + 0.5 * l2 * float(w @ w)

    def gradient(self, params: Params, X: np.ndarray, y: np.ndarray, l2: float = 0.0, *,
                 with_loss: bool = False) -> tuple[dict[str, np.ndarray], float | None]:
        with self.session(params, X, y) as s:
            grads, loss = s.gradient(None, with_loss=with_loss)
        w = params["weight"]
        grads = {"weight": grads["weight"] + l2 * w, "bias": np.array([grads["bias"]])}
        return grads, None if loss is None else loss + 0.5 * l2 * float(w @ w)

    def per_example_gradients(self, params: Params, X: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        residual = self.decision(params, X) - y
        return {"weight": residual[:, None] * X, "bias": residual[:, None]}

    def session(self, params: Params, X: np.ndarray, y: np.ndarray) -> LinearSession:
        return LinearSession(params, X, y)

    def input_gradients(self, params: Params, X: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Each row's gradient with respect to its features of ``(x w + b - t)² / 2``: ``(z - t) w``,
        shape ``(n, d)`` (the KL divergence of two unit-variance Gaussians; VAT, :mod:`medfed.client.vat`)."""
        return np.outer(self.decision(params, X) - targets, params["weight"])

