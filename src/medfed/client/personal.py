"""Personalized FL at the client end (survey §3.2 (1), domain-specific learning).

The global model is trained as in FedAvg; each site also ends with a model of its own:

- fine-tuning (Wicaksana et al., 2022a; Tan et al., 2022): the final global model, tuned on
  the site's training rows;
- APFL (Deng et al., 2020; the survey's "locally adapted model" of Jiang et al., 2023): a
  local model mixed with the global one;
- Ditto (Li et al., 2021; T Dinh et al., 2020 for the Moreau-envelope view): a personal model
  pulled toward the global one by a proximal term.

Local rules have the engine's signature; ``*_personalize(global_params, data, training,
client_state, rng) -> params`` runs once per site after the last round. Personal models are
client state: they never leave the site.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from medfed.client.local import (
    LocalData,
    LocalTraining,
    batch_indices,
    local_sgd_update,
    sgd_steps,
)
from medfed.client.optimizer import descend
from medfed.client.upload import Upload
from medfed.models.logistic import Params
from medfed.rng import KeyedRng
from medfed.wiretypes import wire_type

PERSONAL_STREAM = 1  # rng child key for a site's personal-model draws, apart from its global-model draws


def _copy(params: Params) -> dict[str, np.ndarray]:
    return {k: np.array(v, dtype=np.float64, copy=True) for k, v in params.items()}


def _rows(data: LocalData, rows):
    return (data.X, data.y) if rows is None else (data.X[rows], data.y[rows])


# --- fine-tuning ------------------------------------------------------------------------


def finetune_personalize(
    global_params: Params,
    data: LocalData,
    training: LocalTraining,
    state: Any,
    rng: KeyedRng,
    *,
    steps: int | None = None,
    lr: float | None = None,
) -> dict[str, np.ndarray]:
    """Fine-tuning (Wicaksana et al., 2022a; Tan et al., 2022): after FedAvg's last round the
    site runs ``steps`` more steps (default: the training's) at ``lr`` from the final global model.

    Full-batch gradient descent with ``lr <= 1/L`` (L the loss's smoothness) never raises the
    site's training loss, so the tuned model is never worse on it than the global one.
    """
    config = LocalTraining(
        training.model,
        training.lr if lr is None else lr,
        training.steps if steps is None else steps,
        training.batch_size,
        training.l2,
    )
    tuned, _ = sgd_steps(global_params, data, config, rng)
    return tuned


# --- APFL -------------------------------------------------------------------------------


@wire_type
@dataclass(frozen=True)
class ApflSiteState:
    """An APFL site's state: its own local model ``v`` (never uploaded)."""

    local: dict[str, np.ndarray]


def mix(alpha: float, local: Params, shared: Params) -> dict[str, np.ndarray]:
    """APFL's personal model ``alpha * local + (1 - alpha) * shared``."""
    return {k: alpha * local[k] + (1.0 - alpha) * shared[k] for k in shared}


def apfl_update(
    global_params: Params,
    data: LocalData,
    config: LocalTraining,
    state: ApflSiteState | None,
    rng: KeyedRng,
    *,
    alpha: float,
) -> tuple[Upload, ApflSiteState]:
    """APFL's client (Deng et al., 2020): each local step moves the shared copy ``w`` by plain
    gradient descent and the site's own ``v`` by the gradient at the mixed model ``alpha v + (1-alpha) w``.

    ``v`` (client state, starting at the global model of the site's first round) persists
    across rounds and never leaves the site; the upload is ``w``'s delta, exactly FedAvg's.
    ``v``'s step is ``lr * alpha * grad f(mix)``, the chain rule through the mixture.
    """
    model = config.model
    own = _copy(global_params) if state is None else state.local
    shared = _copy(global_params)
    for rows in batch_indices(data.n, config.batch_size, config.steps, rng):
        Xb, yb = _rows(data, rows)
        if alpha:
            g_own, _ = model.gradient(mix(alpha, own, shared), Xb, yb, config.l2)
            own = {k: own[k] - (config.lr * alpha) * g_own[k] for k in own}
        # the shared copy steps through the local optimizer on this batch: the very arithmetic
        # of FedAvg's client, so alpha = 0 reproduces FedAvg to the last bit
        shared, _ = descend(model, shared, Xb, yb, (None,), config.lr, config.l2)
    loss = model.loss(global_params, data.X, data.y, config.l2)
    delta = {k: shared[k] - global_params[k] for k in global_params}
    return Upload(data.name, delta, data.n, "delta", {"loss": loss}), ApflSiteState(own)


def apfl_personalize(
    global_params: Params, data: LocalData, training: LocalTraining, state: ApflSiteState | None, rng: KeyedRng,
    *, alpha: float,
) -> dict[str, np.ndarray]:
    """APFL's personal model ``alpha v + (1 - alpha) w`` with the final global ``w``
    (the global model itself for a site that never took part)."""
    if state is None:
        return _copy(global_params)
    return mix(alpha, state.local, global_params)


# --- Ditto ------------------------------------------------------------------------------


@wire_type
@dataclass(frozen=True)
class DittoSiteState:
    """A Ditto site's state: its personal model ``v`` (never uploaded)."""

    personal: dict[str, np.ndarray]


def proximal_steps(
    personal: Params,
    center: Params,
    data: LocalData,
    config: LocalTraining,
    rng: KeyedRng,
    *,
    lam: float,
    steps: int,
) -> dict[str, np.ndarray]:
    """Proximal gradient descent on ``F(v) + (lam/2)||v - center||²``.

    Each step is a gradient step on the site's loss F followed by the exact proximal map of
    the quadratic: ``v <- center + (v - lr grad F(v) - center) / (1 + lr lam)``. The map is a
    contraction toward ``center`` for every lam >= 0, so the update is stable for any lam
    (a plain gradient step on the sum diverges once ``lr lam > 2``), and it tends to
    ``center`` as lam grows.
    """
    model = config.model
    shrink = 1.0 / (1.0 + config.lr * lam)
    v = _copy(personal)
    for rows in batch_indices(data.n, config.batch_size, steps, rng):
        Xb, yb = _rows(data, rows)
        g, _ = model.gradient(v, Xb, yb, config.l2)
        v = {k: center[k] + (v[k] - config.lr * g[k] - center[k]) * shrink for k in v}
    return v


def ditto_update(
    global_params: Params,
    data: LocalData,
    config: LocalTraining,
    state: DittoSiteState | None,
    rng: KeyedRng,
    *,
    lam: float,
    personal_steps: int | None = None,
) -> tuple[Upload, DittoSiteState]:
    """Ditto's client (Li et al., 2021): FedAvg's local update for the global model, plus
    ``personal_steps`` proximal steps on the site's own ``v`` toward the global model received.

    ``v`` minimizes ``F_k(v) + (lam/2)||v - w||²``: ``lam = 0`` is local training, ``lam -> inf``
    the global model; ``min_v`` of this is the Moreau envelope of pFedMe (T Dinh et al., 2020).
    ``v`` is client state and never leaves the site; the upload is FedAvg's.
    """
    upload, _ = local_sgd_update(global_params, data, config, None, rng)
    own = _copy(global_params) if state is None else state.personal
    steps = config.steps if personal_steps is None else personal_steps
    own = proximal_steps(own, global_params, data, config, rng.child(PERSONAL_STREAM), lam=lam, steps=steps)
    return upload, DittoSiteState(own)


def ditto_personalize(
    global_params: Params,
    data: LocalData,
    training: LocalTraining,
    state: DittoSiteState | None,
    rng: KeyedRng,
    *,
    lam: float,
    personal_steps: int | None = None,
) -> dict[str, np.ndarray]:
    """Ditto's personal model after the last round: ``personal_steps`` more proximal steps
    from the site's ``v`` toward the final global model (from the global model if the site
    never took part)."""
    own = _copy(global_params) if state is None else state.personal
    steps = training.steps if personal_steps is None else personal_steps
    return proximal_steps(own, global_params, data, training, rng.child(PERSONAL_STREAM), lam=lam, steps=steps)
