"""Client rules against heterogeneity across sites (survey §3.2): drift, labels, compute.

- SCAFFOLD (Karimireddy et al., 2020): control variates correct each local gradient.
- FedSLD (Luo & Wu, 2022): each batch's loss is reweighted to the federation's label distribution
  over its K classes.
- Semi-synchronous training (Stripelis et al., 2021): each site runs as many local steps as
  fit a shared time budget, by its speed and data size.

Each is a local update rule ``(global_params, data, config, client_state, rng, **message) ->
(Upload, client_state)``; ``message`` is what the server broadcasts with the global model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medfed.client.local import LocalData, LocalTraining, batch_indices, sgd_steps
from medfed.client.optimizer import descend
from medfed.client.upload import Upload
from medfed.errors import ConfigError
from medfed.models.logistic import Params
from medfed.rng import KeyedRng
from medfed.wiretypes import wire_type


def _descend(params: Params, data: LocalData, config: LocalTraining, rng: KeyedRng, **terms):
    """:func:`sgd_steps` with the local optimizer's optional terms (``correction``, ``row_weights``)."""
    batches = batch_indices(data.n, config.batch_size, config.steps, rng)
    return descend(config.model, params, data.X, data.y, batches, config.lr, config.l2, **terms)


def _delta(trained: Mapping[str, np.ndarray], global_params: Params) -> dict[str, np.ndarray]:
    return {k: trained[k] - global_params[k] for k in global_params}


# --- SCAFFOLD ---------------------------------------------------------------------------


@wire_type
@dataclass(frozen=True)
class ScaffoldSiteState:
    """A SCAFFOLD site's state: its control variate ``c_i`` in the parameter view (never uploaded)."""

    control: dict[str, np.ndarray]


def scaffold_update(
    global_params: Params,
    data: LocalData,
    config: LocalTraining,
    state: ScaffoldSiteState | None,
    rng: KeyedRng,
    *,
    server_control: Params,
) -> tuple[Upload, ScaffoldSiteState]:
    """SCAFFOLD's client (Karimireddy et al., 2020), option II.

    Each local step follows the corrected gradient ``g(y) - c_i + c``, which cancels the
    site's drift away from the federation's direction; then ``c_i+ = c_i - c + (x - y)/(K lr)``.
    The site's control variate ``c_i`` is its client state (:class:`ScaffoldSiteState`; zero
    before the site's first round) and never leaves it: the upload
    holds the model delta ``y - x`` and ``extras["control_delta"] = c_i+ - c_i`` only.

    ``(x - y)/(K lr)`` is the mean corrected gradient of the K steps only for plain SGD steps
    (the spec refuses other local optimizers). The rule is the same whatever the server's
    weighting of sites: which objective the fixed point minimizes is set by how the server
    averages the ``c_i`` (:func:`medfed.server.control.scaffold_control`).
    """
    steps = config.steps
    if steps < 1:
        raise ConfigError(f"scaffold needs at least one local step, got {steps}")
    own = state.control if state is not None else {k: np.zeros_like(v, dtype=np.float64) for k, v in global_params.items()}
    correction = {k: server_control[k] - own[k] for k in global_params}
    trained, loss = _descend(global_params, data, config, rng, correction=correction)
    scale = 1.0 / (steps * config.lr)
    new_own = {k: own[k] - server_control[k] + (global_params[k] - trained[k]) * scale for k in global_params}
    extras = {"control_delta": {k: new_own[k] - own[k] for k in global_params}}
    upload = Upload(data.name, _delta(trained, global_params), data.n, "delta", {"loss": loss}, extras)
    return upload, ScaffoldSiteState(new_own)


# --- FedSLD -----------------------------------------------------------------------------


def class_count(model) -> int:
    """How many classes :func:`label_counts` counts for a site training ``model``: a multiclass
    model's K outputs (a softmax model's ``n_classes``, a torch network's head), so that a site
    lacking a class still shares a count (0) for it; 2 for every other model (binary; for
    targets that are not one class per row, such as regression values or masks, the two
    numbers only serve as the site's row count, their sum)."""
    if getattr(model, "task", "binary") != "multiclass":
        return 2
    head = getattr(model, "head", None)
    return int(head.outputs if head is not None else model.n_classes)


def class_index(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Each row's class: a binary label at threshold 0.5 (as binary labels were always read),
    a multiclass label as the index it is."""
    y = np.asarray(y)
    return (y >= 0.5).astype(np.intp) if n_classes == 2 else y.astype(np.intp)


def label_counts(y: np.ndarray, n_classes: int = 2) -> np.ndarray:
    """Rows of each class 0..K-1 (K = ``n_classes``, :func:`class_count`), as floats: what a
    FedSLD site shares about its labels, and at setup what every site's size is read from
    (their sum is the site's rows whatever the task)."""
    if n_classes == 2:  # today's binary counts, also what sizes non-class targets
        positives = float(np.count_nonzero(np.asarray(y) >= 0.5))
        return np.array([y.shape[0] - positives, positives])
    return np.bincount(class_index(y, n_classes), minlength=n_classes).astype(np.float64)


def batch_label_weights(prior: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """FedSLD's row weights for a batch: ``P(y = c) / p_b(y = c)`` for a row of class c.

    ``P`` is the federation's label distribution over its K classes and ``p_b`` the batch's
    own; the weighted batch loss then counts each class in the federation's proportion. When
    the batch's distribution equals the federation's every weight is exactly 1 (both are ratios
    of whole numbers, so equal proportions give equal floats): plain cross-entropy. A class
    absent from the federation's counts weighs 0.
    """
    prior = np.asarray(prior, dtype=np.float64)
    K = prior.shape[0]

    def weights(yb: np.ndarray) -> np.ndarray:
        rows = yb.shape[0]
        classes = class_index(yb, K)
        share = np.bincount(classes, minlength=K) / rows
        # a class not in the batch gets no weight (no row reads it); the division is the
        # binary code's p1 / (pos / rows), so two-class numbers are unchanged
        per_class = np.divide(prior, share, out=np.zeros(K), where=share > 0)
        return per_class[classes]

    return weights


def fedsld_update(
    global_params: Params,
    data: LocalData,
    config: LocalTraining,
    state: Any,
    rng: KeyedRng,
    *,
    label_prior: np.ndarray | None = None,
) -> tuple[Upload, Any]:
    """FedSLD's client (Luo & Wu, 2022): cross-entropy weighted by each batch's label
    distribution relative to the federation's (:func:`batch_label_weights`), over the K classes
    of a binary or multiclass model (the paper's MedMNIST tasks are multi-class).

    The site's label counts leave it (``extras["label_counts"]``, every round, K numbers)
    so the server can broadcast the federation's distribution ``label_prior``; the experiment
    harness also gives the server every site's counts at setup, as the paper assumes them
    known. Without a prior (no counts yet) the loss is plain cross-entropy. The
    reported ``loss`` is the plain, unweighted loss of the global model. Uploads the delta.
    """
    weights = None if label_prior is None else batch_label_weights(label_prior)
    trained, loss = _descend(global_params, data, config, rng, row_weights=weights)
    extras = {"label_counts": label_counts(data.y, class_count(config.model))}
    return Upload(data.name, _delta(trained, global_params), data.n, "delta", {"loss": loss}, extras), state


# --- semi-synchronous -------------------------------------------------------------------


def batch_rows(data: LocalData, config: LocalTraining) -> int:
    """Rows one local step processes at this site (its whole data when full-batch)."""
    return data.n if config.batch_size is None else min(config.batch_size, data.n)


def semisync_steps(budget: float, speed: float, rows: int) -> int:
    """Local steps that fit ``budget`` seconds at ``speed`` examples per second, ``rows`` per step.

    ``max(1, floor(budget * speed / rows))``; a step that fits to within floating-point
    rounding (relative 1e-12) counts as fitting, so a budget made of whole steps gives them all.
    """
    return max(1, math.floor(budget * speed / rows * (1.0 + 1e-12)))


def check_speeds(speeds: Mapping[str, float], site_names: Sequence[str]) -> dict[str, float]:
    """A per-site speed table that names only training sites (its speeds, positive numbers,
    were checked with the method's options)."""
    known = list(site_names)
    unknown = next((site for site in speeds if site not in known), None)
    if unknown is not None:
        raise ConfigError(f"semisync: speeds names unknown site {unknown!r}; the training sites are {', '.join(known)}")
    return dict(speeds)


def semisync_update(
    global_params: Params,
    data: LocalData,
    config: LocalTraining,
    state: Any,
    rng: KeyedRng,
    *,
    speeds: Mapping[str, float],
    budget: float | None = None,
) -> tuple[Upload, Any]:
    """Semi-synchronous training's client (Stripelis et al., 2021).

    The site runs :func:`semisync_steps` local steps (FedAvg's client otherwise): a faster
    site, or one with fewer rows per step, does more within the round's ``budget`` seconds.
    ``speeds`` maps a site to examples per second (missing: 1.0). Without a budget yet (the
    first round, before the server knows each site's time per step) it runs ``config.steps``.
    Metrics add ``local_steps`` (run this round) and ``sync_seconds`` (the time the site
    needs for ``config.steps`` steps, from which the server sets the budget); both leave the site.
    """
    speed = float(speeds.get(data.name, 1.0))
    rows = batch_rows(data, config)
    steps = config.steps if budget is None else semisync_steps(budget, speed, rows)
    trained, loss = sgd_steps(global_params, data, config, rng, steps=steps)
    metrics = {"loss": loss, "local_steps": float(steps), "sync_seconds": config.steps * rows / speed}
    return Upload(data.name, _delta(trained, global_params), data.n, "delta", metrics), state
