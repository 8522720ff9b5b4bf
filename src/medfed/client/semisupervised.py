"""Semi-supervised local training (Yang et al., 2021a), realized FixMatch-style (Sohn et al., 2020).

Each round the site predicts its unlabeled rows under a *weak* augmentation with the global model
it received; a row whose top probability reaches ``threshold`` takes the argmax as its
pseudo-label; the local steps then run on the labeled rows plus those rows under a *strong*
augmentation with their pseudo-labels, each weighted ``weight`` (lambda) in the batch's mean loss.
Training the strong view toward the weak view's confident label is the consistency term: no
separate loss is needed. With no unlabeled row (or none confident) the round is FedAvg's client
to the bit (:func:`~medfed.client.local.local_sgd_update`, the same batch draws).

Augmentations, drawn from the site's keyed rng (children named ``semisupervised/weak`` and
``.../strong`` of the round's site rng, never by position):

- tables: Gaussian feature noise, sigma ``weak`` or ``strong`` (the features are standardized);
- images (samples of 2 or more axes, the last two spatial): a random left-right flip and a
  per-image intensity jitter ``x (1 + s e1) + s e2`` (s = ``weak``); strong adds a random
  translation of up to 1/8 of each side (a crop re-padded with zeros) and uses s = ``strong``.

Segmentation (a U-Net, one class per voxel): a pseudo-label is a mask. The geometry (flip and
translation, stream ``semisupervised/geometry``) is drawn once per image and applied to it before
either view, so the weak view the mask is predicted on and the strong view it trains are on one
grid; the views differ in their intensity jitter only (``weak``, ``strong``). A voxel whose top
class probability reaches ``threshold`` takes the argmax class, the others are
:data:`~medfed.models.unet.IGNORE` and weigh nothing in the loss (weighted soft Dice + CE,
:func:`~medfed.models.unet.voxel_weighted_dice_ce`); an image without a confident voxel is left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from medfed.client.local import LocalData, LocalTraining, delta_upload, batch_indices, local_sgd_update
from medfed.client.optimizer import descend
from medfed.client.upload import Upload
from medfed.errors import ConfigError
from medfed.models.logistic import Params
from medfed.rng import KeyedRng, name_key

WEAK_STREAM, STRONG_STREAM = name_key("semisupervised/weak"), name_key("semisupervised/strong")
GEOMETRY_STREAM = name_key("semisupervised/geometry")


@dataclass(frozen=True)
class PseudoLabels:
    """The unlabeled rows the global model is confident about: their indices into
    ``X_unlabeled``, their labels (the argmax class, as the site's ``y`` holds labels) and that
    top probability."""

    rows: np.ndarray
    labels: np.ndarray
    confidence: np.ndarray


def augment(X: np.ndarray, sigma: float, gen: np.random.Generator, *, translate: bool = False) -> np.ndarray:
    """One augmented view of ``X`` (rows first): feature noise for tables; for images a flip,
    an intensity jitter and, with ``translate``, a random shift (module docstring)."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 2:
        return X + sigma * gen.standard_normal(X.shape)
    out = _flip(X, gen.random(X.shape[0]) < 0.5)
    out = jitter(out, sigma, gen)
    if translate:
        out = _shift(out, _draw_shifts(X.shape[0], X.shape[-2:], gen))
    return out


def jitter(X: np.ndarray, sigma: float, gen: np.random.Generator) -> np.ndarray:
    """Each image's intensities ``x (1 + sigma e1) + sigma e2``, one (e1, e2) per image."""
    n = X.shape[0]
    scale, shift = (sigma * gen.standard_normal((2, n))).reshape((2, n) + (1,) * (X.ndim - 1))
    return X * (1.0 + scale) + shift


@dataclass(frozen=True)
class Geometry:
    """Per image a left-right flip (``flip`` (n,)) then a shift of its last two axes (``shifts``
    (n, 2), rows and columns, up to 1/8 of each side): applied alike to images ``(n, C, *spatial)``
    and their masks ``(n, *spatial)``, which keeps a mask on its image's grid."""

    flip: np.ndarray
    shifts: np.ndarray

    @classmethod
    def draw(cls, n: int, spatial: tuple[int, ...], gen: np.random.Generator) -> Geometry:
        return cls(gen.random(n) < 0.5, _draw_shifts(n, spatial[-2:], gen))

    def apply(self, A: np.ndarray) -> np.ndarray:
        return _shift(_flip(A, self.flip), self.shifts)


def _flip(X: np.ndarray, flip: np.ndarray) -> np.ndarray:
    return np.where(flip.reshape((X.shape[0],) + (1,) * (X.ndim - 1)), X[..., ::-1], X)


def _draw_shifts(n: int, spatial: tuple[int, int], gen: np.random.Generator) -> np.ndarray:
    h, w = spatial
    limits = (max(1, h // 8), max(1, w // 8))
    return np.stack([gen.integers(-lim, lim + 1, n) for lim in limits], axis=1)


def _shift(X: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Each image moved by its (dy, dx) on the last two axes, zeros (background) where it moved away from."""
    h, w = X.shape[-2:]
    out = np.zeros_like(X)
    for i, (dy, dx) in enumerate(shifts):
        src = X[i][..., max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
        out[i][..., max(0, dy):max(0, dy) + src.shape[-2], max(0, dx):max(0, dx) + src.shape[-1]] = src
    return out


def pseudo_labels(model, params: Params, X: np.ndarray, threshold: float) -> PseudoLabels:
    """The rows of ``X`` whose top class probability under ``params`` is at least ``threshold``:
    binary (a probability of the positive class per row) or multiclass (K probabilities per row)."""
    p = np.asarray(model.predict_proba(params, X), dtype=np.float64)
    if p.ndim == 1 or p.shape[1] == 1:
        p = p.reshape(-1)
        labels, confidence = (p >= 0.5).astype(np.float64), np.maximum(p, 1.0 - p)
    else:
        labels, confidence = p.argmax(axis=1).astype(np.float64), p.max(axis=1)
    rows = np.flatnonzero(confidence >= threshold)
    return PseudoLabels(rows, labels[rows], confidence[rows])


@dataclass(frozen=True)
class PseudoMasks:
    """Segmentation pseudo-labels: the images with at least one confident voxel (``rows`` into the
    images predicted) and their masks, the argmax class where confident, else ``IGNORE``."""

    rows: np.ndarray
    masks: np.ndarray


def pseudo_masks(model, params: Params, X: np.ndarray, threshold: float) -> PseudoMasks:
    """Per voxel of each image of ``X``: the argmax class under ``params`` where its top class
    probability is at least ``threshold``, else :data:`~medfed.models.unet.IGNORE`."""
    from medfed.models.unet import IGNORE

    p = np.asarray(model.predict_proba(params, X), dtype=np.float64)  # (n, K, *spatial)
    confident = p.max(axis=1) >= threshold
    masks = np.where(confident, p.argmax(axis=1), IGNORE).astype(np.float64)
    rows = np.flatnonzero(confident.reshape(len(X), -1).any(axis=1))
    return PseudoMasks(rows, masks[rows])


@dataclass(frozen=True)
class SegmentationViews:
    """The unlabeled images under one geometry (:class:`Geometry`): the weak view the pseudo-masks
    are predicted on and the strong view they train."""

    weak: np.ndarray
    strong: np.ndarray
    geometry: Geometry


def segmentation_views(X: np.ndarray, weak: float, strong: float, rng: KeyedRng) -> SegmentationViews:
    """The geometry drawn once per image and applied before either view; then the weak and the strong
    intensity jitter, each from its own keyed stream."""
    X = np.asarray(X, dtype=np.float64)
    geometry = Geometry.draw(X.shape[0], X.shape[-2:], rng.child(GEOMETRY_STREAM).generator)
    moved = geometry.apply(X)
    return SegmentationViews(jitter(moved, weak, rng.child(WEAK_STREAM).generator),
                             jitter(moved, strong, rng.child(STRONG_STREAM).generator), geometry)


def semisupervised_update(
    global_params: Params,
    data: LocalData,
    config: LocalTraining,
    state: Any,
    rng: KeyedRng,
    *,
    threshold: float,
    weight: float,
    weak: float,
    strong: float,
) -> tuple[Upload, Any]:
    """The semi-supervised client (module docstring): pseudo-labels from the received global model
    on weakly augmented unlabeled rows, then local steps on the labeled rows plus the confident rows
    strongly augmented, weighted ``weight``. The upload counts the labeled rows only (``data.n``),
    so the server weighs sites as FedAvg does; its loss is the labeled rows' (comparable across rounds)."""
    unlabeled = data.X_unlabeled
    if unlabeled is None or len(unlabeled) == 0:
        return local_sgd_update(global_params, data, config, state, rng)
    model = config.model
    if getattr(model, "task", None) == "segmentation":
        views = segmentation_views(unlabeled, weak, strong, rng)
        confident = pseudo_masks(model, global_params, views.weak, threshold)
        strong_view, targets = views.strong[confident.rows], confident.masks
    else:
        confident = pseudo_labels(model, global_params, augment(unlabeled, weak, rng.child(WEAK_STREAM).generator),
                                  threshold)
        targets = confident.labels
        strong_view = (augment(unlabeled[confident.rows], strong, rng.child(STRONG_STREAM).generator, translate=True)
                       if confident.rows.size else None)
    if confident.rows.size == 0:
        return local_sgd_update(global_params, data, config, state, rng)
    if config.dp_sgd is not None:
        raise ConfigError("method 'semisupervised' does not combine with DP-SGD (training.dp_sgd): its "
                          "pseudo-labeled rows are not accounted as the site's examples; use fedavg with DP-SGD")
    X = np.concatenate([np.asarray(data.X, dtype=np.float64), strong_view])
    y = np.concatenate([np.asarray(data.y, dtype=np.float64), targets])
    weights = np.concatenate([np.ones(data.n), np.full(confident.rows.size, float(weight))])
    trained, _ = descend(model, global_params, X, y, batch_indices(len(y), config.batch_size, config.steps, rng),
                         config.lr, config.l2, example_weights=weights)
    loss = model.loss(global_params, data.X, data.y, config.l2)
    return delta_upload(data, trained, global_params, loss), state

