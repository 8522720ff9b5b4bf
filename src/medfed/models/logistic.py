"""Binary logistic regression in float64 numpy: the survey's model (§6.2) and medfed's fast path.

Objective on data (X, y) with n rows::

    L(w, b) = mean_i [ log(1 + exp(z_i)) - y_i z_i ] + (l2 / 2) ||w||²,   z = X w + b

The bias is not penalized. ``log(1 + exp(z))`` is computed with ``logaddexp`` and the
sigmoid as ``(1 + tanh(z / 2)) / 2``, both finite for any finite z.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

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
    sites and all rounds.
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

    def clipped_gradient_sum(self, params: Params, X: np.ndarray, y: np.ndarray, clip: float,
                             row_scale: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The sum of the rows' gradients, each clipped to L2 norm ``clip`` (DP-SGD's), without
        forming them: a row's gradient is ``r [x, 1]``, so its norm is ``|r| sqrt(|x|^2 + 1)``
        (``row_scale``: those square roots, computed once per site)."""
        residual = sigmoid(X @ params["weight"] + float(params["bias"][0])) - y
        scale = np.sqrt(np.einsum("ij,ij->i", X, X) + 1.0) if row_scale is None else row_scale
        norms = np.abs(residual) * scale
        residual *= np.minimum(1.0, clip / np.maximum(norms, 1e-300))
        return {"weight": X.T @ residual, "bias": np.array([residual.sum()])}

    def descend(
        self,
        params: Params,
        X: np.ndarray,
        y: np.ndarray,
        batches: Iterable[np.ndarray | None],
        lr: float,
        l2: float = 0.0,
        *,
        prox_center: Params | None = None,
        mu: float = 0.0,
        correction: Params | None = None,
        row_weights: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> tuple[dict[str, np.ndarray], float]:
        """Gradient descent, one step per entry of ``batches`` (row indices, ``None`` = all rows).

        Returns the new parameters and the full-batch objective at the start (always the
        plain, unweighted objective). Optional terms, each costing nothing when not given:

        - ``prox_center`` and ``mu > 0``: each step adds FedProx's ``mu * (theta - center)``.
        - ``correction``: a constant (parameter view) added to every step's gradient
          (SCAFFOLD's ``c - c_i``).
        - ``row_weights(y_batch) -> (B,)``: each row's weight in the batch's mean loss, from
          the batch's labels (FedSLD's label-distribution weights).

        The loop works on the weight vector and a float bias directly: it is the hot path
        of every simulated round, so it does no more numpy calls than a hand-written loop.
        """
        w = np.array(params["weight"], dtype=np.float64, copy=True)
        b = float(params["bias"][0])
        cw, cb = (prox_center["weight"], float(prox_center["bias"][0])) if mu else (None, 0.0)
        # the correction is constant over the steps: scale it by lr once
        kw, kb = (lr * correction["weight"], float(correction["bias"][0])) if correction is not None else (None, 0.0)
        start_loss = None
        for rows in batches:
            Xb, yb = (X, y) if rows is None else (X[rows], y[rows])
            z = Xb @ w + b
            if start_loss is None:
                start_loss = (
                    _mean_log_loss(z, yb) + 0.5 * l2 * float(w @ w)
                    if rows is None
                    else self.loss(params, X, y, l2)
                )
            residual = sigmoid(z)
            residual -= yb
            if row_weights is not None:
                residual *= row_weights(yb)
            n = Xb.shape[0]
            g_w = Xb.T @ residual
            g_w *= lr / n
            g_b = _sum(residual) / n
            if l2:
                g_w += (lr * l2) * w
            if mu:
                g_w += (lr * mu) * (w - cw)
                g_b += mu * (b - cb)
            if kw is not None:
                g_w += kw
                g_b += kb
            w -= g_w
            b -= lr * g_b
        if start_loss is None:  # zero steps
            start_loss = self.loss(params, X, y, l2)
        return {"weight": w, "bias": np.array([b])}, start_loss
