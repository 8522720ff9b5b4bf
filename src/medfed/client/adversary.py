"""Corrupted sites for robustness audits (survey §3.3.3, §7.1.2): poisoned data or poisoned uploads.

A corrupted site is a client, so its attack lives at the client end. Two families:

- **data attacks** change a site's training labels once, before training, and the site then
  trains honestly on them: :func:`flip_labels` (``label_flip``) and :func:`noisy_labels`
  (``noisy_labels``); :func:`corrupt_data` applies either to a :class:`LocalData`.
- **update attacks** wrap any local update rule (:func:`corrupt_rule`): the wrapped rule runs
  as usual, so the upload keeps its form (kind, example count, metrics, extras), and only the
  payload it sends is replaced: ``sign_flip``, ``scale``, ``gaussian``, ``free_rider``.

Randomness comes only from the :class:`~medfed.rng.KeyedRng` passed in, so an attacked run is
as reproducible as a clean one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection
from typing import Any

import numpy as np

from medfed.client.local import LocalData
from medfed.client.upload import Upload
from medfed.errors import ConfigError, DataError
from medfed.rng import KeyedRng, name_key

DATA_ATTACKS = ("label_flip", "noisy_labels")
UPDATE_ATTACKS = ("sign_flip", "scale", "gaussian", "free_rider")
ATTACKS = DATA_ATTACKS + UPDATE_ATTACKS

# One line per attack: what a corrupted site does, and where the attack is described.
ATTACK_SUMMARIES: dict[str, tuple[str, str]] = {
    "label_flip": ("trains on flipped labels: y -> 1 - y (binary, each label of a multilabel row), "
                   "y -> (y + 1) mod K (K classes, mask pixels), 2 mean - y (regression)",
                   "Biggio et al., 2012; Tolpegin et al., 2020"),
    "noisy_labels": (
        "trains on labels of which each, with probability rate, was redrawn uniformly from the K classes "
        "(regression: another of its rows' targets)",
        "Zhang et al., 2017 (uniform label corruption)",
    ),
    "sign_flip": ("uploads -scale x its honest update", "Damaskinos et al., 2018; Li et al., 2019 (RSA)"),
    "scale": ("uploads scale x its honest update", "Bhagoji et al., 2019 (boosted updates)"),
    "gaussian": (
        "uploads N(0, sigma^2) noise in place of its update",
        "Blanchard et al., 2017; Fang et al., 2020 (Gaussian attack)",
    ),
    "free_rider": (
        "uploads no work (the global model back: a zero update) and claims its example count",
        "Lin et al., 2019 (free-rider attacks)",
    ),
}

# the default multiplier: sign_flip is a pure sign flip, scale boosts the update tenfold
DEFAULT_SCALE = {"sign_flip": 1.0, "scale": 10.0}

_NOISE_STREAM = name_key("adversary-gaussian")  # keeps the attack's draws apart from the rule's

LocalRule = Callable[..., tuple[Upload, Any]]


def check_attack(attack: str, *, scale: float | None = None, sigma: float = 1.0, rate: float = 0.3) -> None:
    """Raise :class:`ConfigError` naming ``attack``, ``scale``, ``sigma`` or ``rate`` if it is not allowed."""
    if attack not in ATTACKS:
        raise ConfigError(f"attack {attack!r} is unknown; choose one of {', '.join(ATTACKS)}")
    checks = (
        ("scale", scale, lambda v: 0 < v < np.inf, "a finite number > 0"),
        ("sigma", sigma, lambda v: 0 < v < np.inf, "a finite number > 0"),
        ("rate", rate, lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    )
    for name, value, ok, allowed in checks:
        if name == "scale" and value is None:
            continue  # the attack's default
        number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
        if not number or not ok(float(value)):  # NaN fails every comparison
            raise ConfigError(f"{name} must be {allowed}, got {value!r}")


# the tasks each data attack is defined for; segmentation masks take label flips (a class
# permutation of every pixel) but not uniform noise, whose per-pixel draws are no label noise of
# the literature (it corrupts delineations, not independent per-pixel labels)
ATTACK_TASKS = {
    "label_flip": ("binary", "multiclass", "multilabel", "segmentation", "regression"),
    "noisy_labels": ("binary", "multiclass", "multilabel", "regression"),
}


def check_attack_task(attack: str, task: str) -> None:
    """A ConfigError naming the attack and the task if the data attack is not defined for it."""
    allowed = ATTACK_TASKS.get(attack)
    if allowed is not None and task not in allowed:
        raise ConfigError(f"attack {attack!r} is not defined for a {task} task; it corrupts {', '.join(allowed)} targets")


def _classes(y: np.ndarray, task: str, n_classes: int) -> np.ndarray:
    """``y`` checked as class indices 0..K-1 (binary: 0/1, K = 2; multilabel: every bit 0/1)."""
    y = np.asarray(y)
    K = 2 if task in ("binary", "multilabel") else n_classes
    if y.size and not np.isin(y, np.arange(K)).all():
        what = "binary labels coded 0/1" if K == 2 else f"class indices 0..{K - 1}"
        raise DataError(f"{task} label attacks need {what}, got values {np.unique(y)[:5].tolist()}")
    return y


def flip_labels(y: np.ndarray, task: str = "binary", n_classes: int = 2) -> np.ndarray:
    """Label flipping (Biggio et al., 2012; Tolpegin et al., 2020): every label made wrong by
    one fixed permutation, keeping the dtype.

    - binary: y -> 1 - y; multilabel: every bit flipped the same way (an involution);
    - multiclass (K = ``n_classes``): the cyclic shift y -> (y + 1) mod K, a derangement (no
      class keeps its label) that is 1 - y for K = 2. The reversal K - 1 - y would be an
      involution but leaves the middle class of an odd K untouched, so not every label is wrong;
    - segmentation: the same shift on every pixel of the mask, background included, so a
      lesion mask (K = 2) is inverted like a binary label; were the background kept, a
      one-class mask would not change at all;
    - regression: each target reflected about the site's mean, y -> 2 mean(y) - y (an
      involution keeping the mean and spread of the targets, every relation to the features
      reversed, as a binary flip reverses it).
    """
    check_attack_task("label_flip", task)
    if task == "regression":
        y = np.asarray(y, dtype=np.float64)
        return 2.0 * y.mean() - y if y.size else y
    y = _classes(y, task, n_classes)
    K = n_classes if task in ("multiclass", "segmentation") else 2
    if K == 2:
        return (1 - y).astype(y.dtype, copy=False)  # as it always was: binary numbers unchanged
    return ((y + 1) % K).astype(y.dtype, copy=False)


def noisy_labels(y: np.ndarray, rate: float, rng: KeyedRng, task: str = "binary", n_classes: int = 2) -> np.ndarray:
    """Uniform label noise (Zhang et al., 2017): each label, independently with probability
    ``rate``, is replaced by one drawn uniformly from the K classes (binary and each bit of a
    multilabel target: {0, 1}; multiclass: 0..K-1 with K = ``n_classes``).

    A replaced label keeps its value with probability 1/K, so the expected fraction of labels
    that change is ``rate (K - 1) / K`` (``rate / 2`` for binary); at ``rate = 1`` the labels
    carry no information about the features (unlike :func:`flip_labels`, which keeps all of it,
    permuted). Regression: a replaced target is a uniformly drawn row's target of the same
    site (the site's own marginal, as a uniform class is the classes' marginal under no
    information). The draws are coupled across rates: with the same ``rng`` a larger rate
    redraws a superset of the labels.
    """
    check_attack("noisy_labels", rate=rate)
    check_attack_task("noisy_labels", task)
    gen = rng.generator
    if task == "regression":
        y = np.asarray(y, dtype=np.float64)
        redraw = gen.random(y.shape) < rate
        return np.where(redraw, y[gen.integers(0, max(y.shape[0], 1), size=y.shape)], y) if y.size else y
    y = _classes(y, task, n_classes)
    redraw = gen.random(y.shape) < rate
    fresh = gen.integers(0, n_classes if task == "multiclass" else 2, size=y.shape)
    return np.where(redraw, fresh, y).astype(y.dtype, copy=False)


def corrupt_data(data: LocalData, attack: str, rng: KeyedRng, *, rate: float = 0.3, task: str = "binary",
                 n_classes: int = 2) -> LocalData:
    """``data`` with its training labels poisoned by a data attack (``label_flip`` or
    ``noisy_labels``) for targets of ``task`` with ``n_classes`` classes (multiclass, segmentation)."""
    check_attack(attack, rate=rate)
    if attack == "label_flip":
        return dataclasses.replace(data, y=flip_labels(data.y, task, n_classes))
    if attack == "noisy_labels":
        return dataclasses.replace(data, y=noisy_labels(data.y, rate, rng, task, n_classes))
    raise ConfigError(f"attack {attack!r} corrupts uploads, not data; data attacks: {', '.join(DATA_ATTACKS)}")


def _update_of(upload: Upload, global_params) -> dict[str, np.ndarray]:
    """The update an upload carries: its payload, or for raw parameters ``params - global``."""
    if upload.kind == "params":
        return {k: v - global_params[k] for k, v in upload.payload.items()}
    return upload.payload


def _as_kind(update: dict[str, np.ndarray], upload: Upload, global_params) -> dict[str, np.ndarray]:
    """Back from an update to what an upload of ``upload.kind`` carries."""
    if upload.kind == "params":
        return {k: global_params[k] + v for k, v in update.items()}
    return update


def corrupt_rule(
    rule: LocalRule,
    attack: str,
    *,
    scale: float | None = None,
    sigma: float = 1.0,
    sites: Collection[str] | None = None,
) -> LocalRule:
    """Wrap a local update rule so that it sends a corrupted upload (same signature as ``rule``).

    The honest rule runs first (its client state and metrics are kept, so the upload looks
    like any other); its payload is then replaced. With ``u`` the honest update (the payload
    for ``delta`` and ``gradient`` uploads, ``params - global`` for ``params`` uploads):

    - ``sign_flip``: sends ``-scale * u`` (``scale`` defaults to 1: a pure sign flip;
      Damaskinos et al., 2018; Li et al., 2019);
    - ``scale``: sends ``scale * u`` (defaults to 10; Bhagoji et al., 2019);
    - ``gaussian``: sends ``N(0, sigma^2)`` noise, drawn independently per coordinate, in place
      of its update. The literature's Gaussian attack (Blanchard et al., 2017; Fang et al.,
      2020) *replaces* the upload by noise rather than adding noise to it; for a ``params``
      upload the noise is the update, so the site sends ``global + noise``;
    - ``free_rider``: sends the global model back unchanged: a zero delta or gradient, or
      the global parameters for ``params`` uploads, while claiming its example count.

    ``sites``: names of the corrupted sites; the others run ``rule`` untouched (``None``:
    every site the rule runs at is corrupted). Data attacks are not rule attacks: use
    :func:`corrupt_data`.
    """
    check_attack(attack, scale=scale, sigma=sigma)
    if attack not in UPDATE_ATTACKS:
        raise ConfigError(
            f"attack {attack!r} corrupts training data, not uploads (use corrupt_data); "
            f"update attacks: {', '.join(UPDATE_ATTACKS)}"
        )
    factor = DEFAULT_SCALE.get(attack, 1.0) if scale is None else float(scale)
    corrupted = None if sites is None else frozenset(sites)

    def corrupt(global_params, data, config, state, rng: KeyedRng, **message):
        upload, state = rule(global_params, data, config, state, rng, **message)
        if corrupted is not None and data.name not in corrupted:
            return upload, state
        update = _update_of(upload, global_params)
        if attack == "sign_flip":
            bad = {k: -factor * v for k, v in update.items()}
        elif attack == "scale":
            bad = {k: factor * v for k, v in update.items()}
        elif attack == "gaussian":
            gen = rng.child(_NOISE_STREAM).generator
            bad = {k: sigma * gen.standard_normal(np.shape(v)) for k, v in update.items()}
        else:  # free_rider
            bad = {k: np.zeros_like(v, dtype=np.float64) for k, v in update.items()}
        return dataclasses.replace(upload, payload=_as_kind(bad, upload, global_params)), state

    corrupt.__name__ = f"{attack}({getattr(rule, '__name__', 'rule')})"
    corrupt.__doc__ = f"{getattr(rule, '__name__', 'a local rule')} with the {attack!r} attack at corrupted sites."
    return corrupt
