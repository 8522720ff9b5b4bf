"""Virtual adversarial training (Miyato et al., 2018) as a federated client (Zhu & Luo, 2022).

Each round the site finds, for each of its training rows ``x``, the direction ``r`` in which the
model it received changes its prediction fastest: the gradient with respect to a small random
perturbation ``xi d`` (``d`` a unit vector per row) of ``KL(p(x) || p(x + xi d))``, normalized, one
power iteration as the paper's default. The row's *virtual neighbour* is ``x + eps r / ||r||``;
local training runs on the rows plus their neighbours, each neighbour labeled as its row and
weighted ``weight`` in the batch's mean loss. With ``eps = 0`` the round is FedAvg's client to the
bit (:func:`~medfed.client.local.local_sgd_update`, the same batch draws): no neighbour is made.

The gradient is the model's ``input_gradients(params, X, targets)`` with ``targets`` its own
predictions at the rows: the cross-entropy against a fixed ``p(x)`` differs from the KL by a
constant (regression: the squared error / 2, the KL of two unit-variance Gaussians). A row whose
gradient is exactly zero (e.g. a zero model) keeps its random direction ``d``, so every neighbour
lies at distance ``eps``. ``d`` is drawn from the site's keyed rng (child ``vat/direction`` of the
round's site rng), never by position. Norms are over all of a sample's axes (images too).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medfed.client.local import LocalData, LocalTraining, delta_upload, batch_indices, local_sgd_update
from medfed.client.optimizer import descend
from medfed.client.upload import Upload
from medfed.errors import ConfigError
from medfed.models.logistic import Params
from medfed.rng import KeyedRng, name_key

DIRECTION_STREAM = name_key("vat/direction")


def _row_norms(A: np.ndarray) -> np.ndarray:
    """Each row's Euclidean norm over all its axes, shaped to broadcast against ``A``."""
    flat = A.reshape(A.shape[0], -1)
    return np.sqrt(np.einsum("ij,ij->i", flat, flat)).reshape((A.shape[0],) + (1,) * (A.ndim - 1))


def prediction(model, params: Params, X: np.ndarray) -> np.ndarray:
    """What the model predicts at ``X`` in the form ``input_gradients`` takes as targets:
    probabilities (classifiers' ``predict_proba``), else the value (regression's ``predict``)."""
    predict = getattr(model, "predict_proba", None) or model.predict
    return np.asarray(predict(params, X), dtype=np.float64)


def adversarial_direction(model, params: Params, X: np.ndarray, xi: float, gen: np.random.Generator) -> np.ndarray:
    """A unit direction per row of ``X``: one power iteration from a random unit ``d``, the
    normalized gradient of ``KL(p(x) || p(x + xi d))`` in ``d`` (``d`` itself where it is zero)."""
    d = gen.standard_normal(X.shape)
    d /= _row_norms(d)
    g = np.asarray(model.input_gradients(params, X + xi * d, prediction(model, params, X)), dtype=np.float64)
    norms = _row_norms(g)
    return np.where(norms > 0, g / np.where(norms > 0, norms, 1.0), d)


def virtual_neighbours(model, params: Params, X: np.ndarray, *, eps: float, xi: float,
                       gen: np.random.Generator) -> np.ndarray:
    """Each row moved by ``eps`` along its adversarial direction (:func:`adversarial_direction`)."""
    X = np.asarray(X, dtype=np.float64)
    return X + eps * adversarial_direction(model, params, X, xi, gen)


def vat_update(
    global_params: Params,
    data: LocalData,
    config: LocalTraining,
    state: Any,
    rng: KeyedRng,
    *,
    eps: float,
    xi: float,
    weight: float,
) -> tuple[Upload, Any]:
    """The VAT client (module docstring): neighbours from the received global model, then local
    steps on the rows plus the neighbours (labeled as their rows, weighted ``weight``). The upload
    counts the site's rows only and reports their loss, as FedAvg's does."""
    if eps == 0 or data.n == 0:
        return local_sgd_update(global_params, data, config, state, rng)
    if config.dp_sgd is not None:
        raise ConfigError("method 'vat' does not combine with DP-SGD (training.dp_sgd): a row and its neighbour "
                          "are two examples from one person's data; use fedavg with DP-SGD")
    model = config.model
    neighbours = virtual_neighbours(model, global_params, data.X, eps=eps, xi=xi,
                                    gen=rng.child(DIRECTION_STREAM).generator)
    X = np.concatenate([np.asarray(data.X, dtype=np.float64), neighbours])
    y = np.concatenate([data.y, data.y])
    weights = np.concatenate([np.ones(data.n), np.full(data.n, float(weight))])
    trained, _ = descend(model, global_params, X, y, batch_indices(len(y), config.batch_size, config.steps, rng),
                         config.lr, config.l2, example_weights=weights)
    loss = model.loss(global_params, data.X, data.y, config.l2)
    return delta_upload(data, trained, global_params, loss), state
