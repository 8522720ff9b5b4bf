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
    for _ in range(steps):
        rows = np.flatnonzero(gen.random(n) < q)
        grads = model.per_example_gradients(out, X[rows], y[rows])
        norms = np.sqrt(sum(np.sum(g.reshape(len(rows), -1) ** 2, axis=1) for g in grads.values())) if rows.size else 0
        scale = np.minimum(1.0, dp.clip / np.maximum(norms, 1e-300)) if rows.size else None
        for k, g in grads.items():
            total = (scale.reshape(-1, *([1] * (g.ndim - 1))) * g).sum(axis=0) if rows.size else np.zeros_like(out[k])
            noisy = (total + gen.normal(0.0, dp.noise_multiplier * dp.clip, size=total.shape)) / expected
            if k == "weight" and l2:
                noisy = noisy + l2 * out[k]
            if mu and prox_center is not None:
                noisy = noisy + mu * (out[k] - prox_center[k])
            out[k] = out[k] - lr * noisy
    return out, math.nan
