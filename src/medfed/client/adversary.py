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
    "label_flip": ("trains on flipped labels y -> 1 - y", "Biggio et al., 2012; Tolpegin et al., 2020"),
    "noisy_labels": (
        "trains on labels of which each, with probability rate, was redrawn uniformly from {0, 1}",
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


def _binary(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    if y.size and not np.isin(y, (0, 1)).all():
        raise DataError(f"label attacks need binary labels coded 0/1, got values {np.unique(y)[:5].tolist()}")
    return y


def flip_labels(y: np.ndarray) -> np.ndarray:
    """Label flipping (Biggio et al., 2012; Tolpegin et al., 2020): every binary label y -> 1 - y.

    An involution: flipping twice gives the labels back. Keeps the dtype.
    """
    y = _binary(y)
    return (1 - y).astype(y.dtype, copy=False)


def noisy_labels(y: np.ndarray, rate: float, rng: KeyedRng) -> np.ndarray:
    """Uniform label noise (Zhang et al., 2017): each label, independently with probability
    ``rate``, is replaced by a label drawn uniformly from {0, 1}.

    A replaced label keeps its value half the time, so the expected fraction of labels that
    change is ``rate / 2``; at ``rate = 1`` the labels carry no information about the features
    (unlike :func:`flip_labels`, which keeps all of it, inverted). The draws are coupled across
    rates: with the same ``rng`` a larger rate redraws a superset of the labels.
    """
    check_attack("noisy_labels", rate=rate)
    y = _binary(y)
    gen = rng.generator
    redraw = gen.random(y.shape) < rate
    fresh = gen.integers(0, 2, size=y.shape)
    return np.where(redraw, fresh, y).astype(y.dtype, copy=False)


def corrupt_data(data: LocalData, attack: str, rng: KeyedRng, *, rate: float = 0.3) -> LocalData:
    """``data`` with its training labels poisoned by a data attack (``label_flip`` or ``noisy_labels``)."""
    check_attack(attack, rate=rate)
    if attack == "label_flip":
        return dataclasses.replace(data, y=flip_labels(data.y))
    if attack == "noisy_labels":
        return dataclasses.replace(data, y=noisy_labels(data.y, rate, rng))
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
