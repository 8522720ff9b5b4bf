"""Sample-level differential privacy inside a site's training: DP-SGD (Abadi et al., 2016).

Each step draws a Poisson batch (every row with probability ``q = batch_size / n``), clips
each row's gradient to L2 norm ``clip``, adds Gaussian noise of standard deviation
``noise_multiplier * clip`` to their sum and divides by the expected batch size ``q n``, then
adds the data-independent terms (L2, FedProx's pull). The site's uploads are then DP with
respect to one of its rows, against anyone, the server included, whatever the server does
with them. The numpy logistic model gives per-row gradients in closed form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from medfed.errors import ConfigError
from medfed.rng import KeyedRng


@dataclass(frozen=True, slots=True)
class DpSgd:
    clip: float
    noise_multiplier: float


def sampling_rate(batch_size: int | None, n: int) -> float:
    """A site's Poisson rate: its expected batch over its rows (at most 1)."""
    if batch_size is None:
        raise ConfigError("--dp sample draws Poisson batches: give --batch-size B (the expected batch)")
    return min(1.0, batch_size / n)


def dp_sgd_descend(model, params, X: np.ndarray, y: np.ndarray, steps: int, batch_size: int | None, lr: float,
                   l2: float, rng: KeyedRng, dp: DpSgd, *, prox_center=None, mu: float = 0.0):
    """``steps`` DP-SGD steps from ``params``; the new parameters and ``nan`` (no loss is computed
    on the site's rows: it would be released without noise)."""
    if not hasattr(model, "per_example_gradients"):
        raise ConfigError(f"--dp sample needs per-example gradients; model {type(model).__name__} has none yet "
                          "(use the numpy logistic model)")
    n = X.shape[0]
    q = sampling_rate(batch_size, n)
    expected = q * n
    gen = rng.generator
    out = {k: np.array(v, dtype=np.float64, copy=True) for k, v in params.items()}
    fast = hasattr(model, "clipped_gradient_sum")  # the numpy model sums clipped rows without forming them
    row_scale = np.sqrt(np.einsum("ij,ij->i", X, X) + 1.0) if fast else None
    # every step's batch and noise drawn at once, for fewer calls on the hot path
    batches = gen.random((steps, n)) < q
    noise = {k: gen.normal(0.0, dp.noise_multiplier * dp.clip, size=(steps, *v.shape)) for k, v in out.items()}
    for step in range(steps):
        rows = np.flatnonzero(batches[step])
        if fast:
            totals = model.clipped_gradient_sum(out, X[rows], y[rows], dp.clip, row_scale[rows])
        else:
            totals = _clipped_sum(model.per_example_gradients(out, X[rows], y[rows]), dp.clip, out)
        for k, total in totals.items():
            noisy = (total + noise[k][step]) / expected
            if k == "weight" and l2:
                noisy = noisy + l2 * out[k]
            if mu and prox_center is not None:
                noisy = noisy + mu * (out[k] - prox_center[k])
            out[k] = out[k] - lr * noisy
    return out, math.nan


def _clipped_sum(grads: dict[str, np.ndarray], clip: float, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-example gradients (leading row axis), each row clipped to norm ``clip`` over all
    parameters together, summed over the rows."""
    rows = next(iter(grads.values())).shape[0] if grads else 0
    if rows == 0:
        return {k: np.zeros_like(like[k]) for k in like}
    norms = np.sqrt(sum(np.sum(g.reshape(rows, -1) ** 2, axis=1) for g in grads.values()))
    scale = np.minimum(1.0, clip / np.maximum(norms, 1e-300))
    return {k: np.tensordot(scale, g, axes=1) for k, g in grads.items()}
