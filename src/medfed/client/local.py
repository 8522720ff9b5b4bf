"""Local update rules: what a site does with the global model on its private data.

A rule has the signature ``(global_params, data, config, client_state, rng) ->
(Upload, client_state)``. ``client_state`` (personal heads, control variates) never
leaves the site; ``rng`` is a :class:`medfed.rng.KeyedRng` whose generator is built only
if the rule draws (mini-batches), keeping full-batch rounds cheap.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from medfed.client.optimizer import descend
from medfed.client.upload import Upload
from medfed.models.logistic import LogisticRegression, Params
from medfed.rng import KeyedRng


@dataclass(frozen=True, slots=True)
class LocalData:
    """A site's training rows, already imputed and scaled; they never leave the site.
    ``X_unlabeled``: its training rows without a target, preprocessed as ``X`` (None: none);
    only semi-supervised rules read them, and ``n`` counts the labeled rows alone."""

    name: str
    X: np.ndarray
    y: np.ndarray
    X_unlabeled: np.ndarray | None = None

    @property
    def n(self) -> int:
        return int(self.X.shape[0])


@dataclass(frozen=True, slots=True)
class LocalTraining:
    """How a site optimizes: learning rate, iterations (or epochs), batch size (None = full batch), L2."""

    model: LogisticRegression
    lr: float
    steps: int
    batch_size: int | None = None
    l2: float = 0.0
    epochs: float | None = None  # if set, each site runs ceil(epochs * n / batch) steps instead of ``steps``
    dp_sgd: Any = None  # a medfed.client.dp_sgd.DpSgd: sample-level DP inside the local steps

    def for_site(self, n: int) -> LocalTraining:
        """The training a site with ``n`` rows runs: ``steps``, or as many as ``epochs`` passes take."""
        if self.epochs is None:
            return self
        per_epoch = 1 if self.batch_size is None else math.ceil(n / min(self.batch_size, n))
        return dataclasses.replace(self, steps=max(1, math.ceil(self.epochs * per_epoch)))


def batch_indices(n: int, batch_size: int | None, steps: int, rng: KeyedRng):
    """Row indices of each step: full batch, or epochs of a fresh permutation cut into batches."""
    if batch_size is None or batch_size >= n:
        for _ in range(steps):
            yield None
        return
    gen = rng.generator
    order = gen.permutation(n)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n:
            order = gen.permutation(n)
            pos = 0
        yield order[pos : pos + batch_size]
        pos += batch_size


def sgd_steps(
    params: Params,
    data: LocalData,
    config: LocalTraining,
    rng: KeyedRng,
    *,
    steps: int | None = None,
    prox_center: Params | None = None,
    mu: float = 0.0,
) -> tuple[dict[str, np.ndarray], float]:
    """Run (mini-batch) gradient descent from ``params``; return the new parameters and the
    full-batch training loss at the start (the loss of the model the site received).

    With ``prox_center`` and ``mu`` the objective gains FedProx's ``(mu/2)||theta - center||²``.
    """
    steps = config.steps if steps is None else steps
    if config.dp_sgd is not None:
        from medfed.client.dp_sgd import dp_sgd_descend

        return dp_sgd_descend(config.model, params, data.X, data.y, steps, config.batch_size, config.lr, config.l2,
                              rng, config.dp_sgd, prox_center=prox_center, mu=mu)
    return descend(
        config.model,
        params,
        data.X,
        data.y,
        batch_indices(data.n, config.batch_size, steps, rng),
        config.lr,
        config.l2,
        prox_center=prox_center,
        mu=mu,
    )


def delta_upload(data: LocalData, trained: dict, global_params: Params, loss: float) -> Upload:
    """The upload of a site rule that trains the global model's copy: ``trained - global``, the
    site's example count and its loss (every delta rule's, FedAvg's and the few-label methods')."""
    delta = {k: trained[k] - global_params[k] for k in trained}
    # under DP-SGD no loss is computed on the site's rows (nan): none is reported
    return Upload(data.name, delta, data.n, "delta", {} if math.isnan(loss) else {"loss": loss})


def local_sgd_update(
    global_params: Params, data: LocalData, config: LocalTraining, state: Any, rng: KeyedRng
) -> tuple[Upload, Any]:
    """FedAvg's client (McMahan et al., 2017): E local iterations from the global model.

    Uploads the delta ``local - global``; keeps no state.
    """
    trained, loss = sgd_steps(global_params, data, config, rng)
    return delta_upload(data, trained, global_params, loss), state


def fedprox_update(
    global_params: Params,
    data: LocalData,
    config: LocalTraining,
    state: Any,
    rng: KeyedRng,
    *,
    mu: float,
) -> tuple[Upload, Any]:
    """FedProx's client (Li et al., 2020): local objective + (mu/2)||w - w_global||².

    The proximal term keeps heterogeneous sites from drifting far from the global model;
    with mu = 0 it is FedAvg's client. Uploads the delta.
    """
    if mu < 0:
        raise ValueError(f"fedprox: mu must be >= 0, got {mu}")
    trained, loss = sgd_steps(global_params, data, config, rng, prox_center=global_params, mu=mu)
    return delta_upload(data, trained, global_params, loss), state


def fedsgd_gradient(
    global_params: Params, data: LocalData, config: LocalTraining, state: Any, rng: KeyedRng
) -> tuple[Upload, Any]:
    """FedSGD's client (McMahan et al., 2017): the gradient of the site's loss at the global model.

    One (mini-)batch gradient, no local step; the server averages and steps.
    """
    model = config.model
    if config.batch_size is None or config.batch_size >= data.n:
        grads, loss = model.gradient(global_params, data.X, data.y, config.l2, with_loss=True)
    else:
        rows = next(batch_indices(data.n, config.batch_size, 1, rng))
        grads, _ = model.gradient(global_params, data.X[rows], data.y[rows], config.l2)
        loss = model.loss(global_params, data.X, data.y, config.l2)
    return Upload(data.name, grads, data.n, "gradient", {"loss": loss}), state
