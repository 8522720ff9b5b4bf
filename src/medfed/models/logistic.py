"""Binary logistic regression in float64 numpy: the survey's model (§6.2) and medfed's fast path.

Objective on data (X, y) with n rows::

    L(w, b) = mean_i [ log(1 + exp(z_i)) - y_i z_i ] + (l2 / 2) ||w||²,   z = X w + b

The bias is not penalized. ``log(1 + exp(z))`` is computed with ``logaddexp`` and the
sigmoid as ``(1 + tanh(z / 2)) / 2``, both finite for any finite z.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from medfed.errors import ConfigError

_sum = np.add.reduce  # ndarray.sum goes through a Python wrapper that costs more than the sum

Params = Mapping[str, np.ndarray]
"""Model parameters: an ordered mapping ``name -> float64 array`` (the parameter view)."""


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Logistic function. z is floored at -700 first: exp(700) is finite, and the result
    there (1e-304) is already 0 for every purpose, so no overflow warning is possible."""
    e = np.exp(-np.maximum(z, -700.0))
    e += 1.0
    return np.reciprocal(e, out=e)


def _mean_log_loss(z: np.ndarray, y: np.ndarray) -> float:
    return float((_sum(np.logaddexp(0.0, z)) - y @ z) / z.shape[0])



class LogisticRegression:
    """Logistic regression seen through the parameter view ``{"weight": (d,), "bias": (1,)}``.

    Stateless: every method takes the parameters explicitly, so one instance serves all
    sites and all rounds. Training runs through a :meth:`session` that the local optimizer
    (:mod:`medfed.client.optimizer`) drives; the model holds no optimizer and no method's term.
    """

    name = "logistic"

    def init_params(self, sample_shape: tuple[int, ...], rng=None) -> dict[str, np.ndarray]:
        """Zero parameters for samples of ``sample_shape`` (the model protocol every model follows)."""
        if len(sample_shape) != 1:
            raise ConfigError(
                f"the numpy logistic model takes feature tables; these samples have shape {tuple(sample_shape)} "
                "(images): choose a torch model, e.g. --model cnn2d"
            )
        return self.init(sample_shape[0])

    def init(self, n_features: int) -> dict[str, np.ndarray]:
        """Zero parameters: the convex objective makes the start point irrelevant to the optimum."""
        return {"weight": np.zeros(n_features), "bias": np.zeros(1)}

    def decision(self, params: Params, X: np.ndarray) -> np.ndarray:
        return X @ params["weight"] + params["bias"][0]

    def predict_proba(self, params: Params, X: np.ndarray) -> np.ndarray:
        """Probability of the positive class for each row of ``X``."""
        return sigmoid(self.decision(params, X))

    def loss(self, params: Params, X: np.ndarray, y: np.ndarray, l2: float = 0.0) -> float:
        z = self.decision(params, X)
        w = params["weight"]
        return _mean_log_loss(z, y) + 0.5 * l2 * float(w @ w)

    def gradient(
        self, params: Params, X: np.ndarray, y: np.ndarray, l2: float = 0.0, *, with_loss: bool = False
    ) -> tuple[dict[str, np.ndarray], float | None]:
        """Gradient of the objective (and, when asked, its value from the same forward pass)."""
        w = params["weight"]
        z = X @ w + float(params["bias"][0])
        residual = sigmoid(z)
        residual -= y
        n = X.shape[0]
        g_w = X.T @ residual
        g_w /= n
        if l2:
            g_w += l2 * w
        grads = {"weight": g_w, "bias": np.array([_sum(residual) / n])}
        loss = None
        if with_loss:
            loss = _mean_log_loss(z, y) + 0.5 * l2 * float(w @ w)
        return grads, loss

    def per_example_gradients(self, params: Params, X: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        """Each row's gradient of its own log-loss, in closed form: ``(sigmoid(x.w + b) - y) [x, 1]``
        (leading row axis; the L2 term is not a row's and is left out)."""
        residual = sigmoid(X @ params["weight"] + float(params["bias"][0])) - y
        return {"weight": residual[:, None] * X, "bias": residual[:, None]}

    def session(self, params: Params, X: np.ndarray, y: np.ndarray) -> LogisticSession:
        """A training session on ``(X, y)`` from ``params``: the local optimizer of
        :mod:`medfed.client.optimizer` drives it step by step."""
        return LogisticSession(params, X, y)

    def input_gradients(self, params: Params, X: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Each row's gradient with respect to its own features of its log-loss against soft
        ``targets`` (positive-class probabilities, as :meth:`predict_proba` gives): ``(p(x) - t) w``,
        shape ``(n, d)``. With ``targets`` the model's predictions elsewhere it is the gradient of
        their KL divergence: VAT's adversarial direction (:mod:`medfed.client.vat`)."""
        return np.outer(self.predict_proba(params, X) - targets, params["weight"])


class LogisticSession:
    """The parameters of one local training, with the data-term gradients the optimizer asks for.

    ``values`` is what the optimizer updates: ``weight`` a float64 array owned by the session,
    ``bias`` a Python float (scalar arithmetic on a one-element array costs a microsecond a call,
    and this is the hot path of every simulated round). A context manager, like the torch models'
    session; nothing to set up or release here.
    """

    __slots__ = ("X", "y", "values", "_row_scale")

    penalized = ("weight",)
    """The parameters the L2 penalty covers (the bias is not penalized)."""

    scaled = frozenset({"weight"})
    """The parameters whose :meth:`gradient` takes the step's ``scale`` inside the mean: one pass
    over the d-vector instead of two. The bias, a float, would gain nothing, and keeps its own rounding."""

    link = staticmethod(sigmoid)
    """The inverse link of the generalized linear model: prediction from the linear score ``z``
    (a new array: the residual is formed in it). A row's data-term gradient is ``(link(z) - y) [x, 1]``
    for the canonical link, so the linear model's session (:mod:`medfed.models.glm`) shares this one."""
    data_loss = staticmethod(_mean_log_loss)
    """The mean data term at scores ``z`` and targets ``y``."""

    def __init__(self, params: Params, X: np.ndarray, y: np.ndarray) -> None:
        self.X, self.y = X, y
        self.values = {"weight": np.array(params["weight"], dtype=np.float64, copy=True), "bias": float(params["bias"][0])}
        self._row_scale = None

    def __enter__(self) -> LogisticSession:
        return self

    def __exit__(self, *exc) -> None:
        return None

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The trained parameters' shapes in the parameter view."""
        return {"weight": self.values["weight"].shape, "bias": (1,)}

    def load(self, name: str, value: np.ndarray):
        """A parameter-view array (a proximal center, a correction, noise) as ``values[name]`` holds it."""
        return np.asarray(value, dtype=np.float64) if name == "weight" else float(value[0])

    @staticmethod
    def axpy(alpha: float, g, x):
        """``g + alpha * x``, in place where ``g`` is an array."""
        g += alpha * x
        return g

    def residual(self, z: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Each row's data-term gradient with respect to its score: ``link(z) - y`` (a robust loss
        rescales it, :mod:`medfed.models.robust`)."""
        residual = self.link(z)
        residual -= y
        return residual

    def loss(self) -> float:
        """The data term of the objective on all rows at the current parameters."""
        return self.data_loss(self.X @ self.values["weight"] + self.values["bias"], self.y)

    def gradient(self, rows: np.ndarray | None, scale: float = 1.0,
                 row_weights: Callable[[np.ndarray], np.ndarray] | None = None,
                 with_loss: bool = False) -> tuple[dict, float | None]:
        """The batch's mean data-term gradient (rows ``rows``, ``None`` = all), the weight's times
        ``scale`` (see :attr:`scaled`); each row weighted by ``row_weights(y_batch)`` when given.
        With ``with_loss``, also :meth:`loss` (from this forward pass when it covers all rows)."""
        X, y = (self.X, self.y) if rows is None else (self.X[rows], self.y[rows])
        values = self.values
        z = X @ values["weight"] + values["bias"]
        loss = None
        if with_loss:
            loss = self.data_loss(z, y) if rows is None else self.loss()
        residual = self.residual(z, y)
        if row_weights is not None:
            residual *= row_weights(y)
        n = X.shape[0]
        g_w = X.T @ residual
        g_w *= scale / n
        return {"weight": g_w, "bias": _sum(residual) / n}, loss

    def example_gradients(self, rows: np.ndarray) -> LogisticRows:
        """The rows' own gradients (their data terms), factored: a row's is ``r [x, 1]``."""
        if self._row_scale is None:  # sqrt(|x|^2 + 1), the norm of [x, 1]: once per session
            self._row_scale = np.sqrt(np.einsum("ij,ij->i", self.X, self.X) + 1.0)
        X = self.X[rows]
        residual = self.residual(X @ self.values["weight"] + self.values["bias"], self.y[rows])
        return LogisticRows(X, residual, np.abs(residual) * self._row_scale[rows])

    def parameters(self) -> dict[str, np.ndarray]:
        """The parameter view of the current values."""
        return {"weight": self.values["weight"], "bias": np.array([self.values["bias"]])}


class LogisticRows:
    """Per-example gradients ``residual_i [x_i, 1]`` without forming them: their L2 ``norms``
    and any weighted sum of them."""

    __slots__ = ("X", "residual", "norms")

    def __init__(self, X: np.ndarray, residual: np.ndarray, norms: np.ndarray) -> None:
        self.X, self.residual, self.norms = X, residual, norms

    def weighted_sum(self, factors: np.ndarray) -> dict:
        """``sum_i factors_i g_i`` (the residuals are scaled in place: call once)."""
        residual = self.residual
        residual *= factors
        return {"weight": self.X.T @ residual, "bias": float(residual.sum())}
