"""Sample-level differential privacy inside a site's training: DP-SGD (Abadi et al., 2016).

Each step draws a Poisson batch (every row with probability ``q = batch_size / n``), clips
each row's gradient to L2 norm ``clip``, adds Gaussian noise of standard deviation
``noise_multiplier * clip`` to their sum and divides by the expected batch size ``q n``, then
adds the data-independent terms (L2, FedProx's pull). The site's uploads are then DP with
respect to one of its rows, against anyone, the server included, whatever the server does
with them. The numpy logistic model gives per-row gradients in closed form (their clipped sum
without forming them), the torch models through ``torch.func`` (``vmap`` of ``grad``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from medfed.client.optimizer import gradient_terms, make_optimizer
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


def noised_clipped_mean(session, rows: np.ndarray, clip: float, noise: dict, expected: float) -> dict:
    """DP-SGD's gradient of one step: each of ``rows``' own gradients clipped to L2 norm ``clip``
    over all parameters together, summed, ``noise`` (parameter view, std z * clip) added, divided
    by the expected batch ``q n`` (a fixed denominator: the sensitivity stays ``clip``)."""
    rows_grads = session.example_gradients(rows)
    factors = np.minimum(1.0, clip / np.maximum(rows_grads.norms, 1e-300))
    totals = rows_grads.weighted_sum(factors)
    return {k: (total + session.load(k, noise[k])) / expected for k, total in totals.items()}


def dp_sgd_descend(model, params, X: np.ndarray, y: np.ndarray, steps: int, batch_size: int | None, lr: float,
                   l2: float, rng: KeyedRng, dp: DpSgd, *, prox_center=None, mu: float = 0.0):
    """``steps`` DP-SGD steps from ``params`` through the model's session and the local optimizer
    (:mod:`medfed.client.optimizer`: L2, proximal pull, then SGD or Adam); the new parameters and
    ``nan`` (no loss is computed on the site's rows: it would be released without noise).

    Every step's batch and noise are drawn from ``rng`` at once (fewer calls on the hot path):
    the batches as one ``(steps, n)`` uniform draw, then each trained parameter's noise as one
    ``(steps, *shape)`` normal draw, in parameter order; so ``steps x parameters`` float64 values
    are held for the call."""
    if not hasattr(model, "per_example_gradients"):
        raise ConfigError(f"--dp sample needs per-example gradients; model {type(model).__name__} has none")
    n = X.shape[0]
    q = sampling_rate(batch_size, n)
    expected = q * n
    gen = rng.generator
    with model.session(params, X, y) as session:
        optimizer = make_optimizer(model, session, lr, fold=False)
        terms = gradient_terms(session, optimizer.fold, l2=l2, prox_center=prox_center, mu=mu)
        batches = gen.random((steps, n)) < q
        std = dp.noise_multiplier * dp.clip if dp.noise_multiplier else 0.0  # no noise, even with clip = inf
        noise = {k: gen.normal(0.0, std, size=(steps, *shape)) for k, shape in session.shapes.items()}
        for step in range(steps):
            grads = noised_clipped_mean(session, np.flatnonzero(batches[step]), dp.clip,
                                        {k: v[step] for k, v in noise.items()}, expected)
            optimizer.step(session.values, grads, terms)
        return session.parameters(), math.nan
