"""Client-level differential privacy at the site's end of the channel, and its accounting.

- :func:`clip_update` scales an upload's update to L2 norm at most ``clip`` (McMahan et al.,
  2018): what bounds one site's influence, so that the server's Gaussian noise
  (:func:`medfed.server.dp.dp_gaussian_mean`) buys a privacy guarantee.
- :func:`client_level_epsilon` and :func:`calibrate_noise` account with Google's
  ``dp-accounting`` (PLD by default, RDP on request): ``rounds`` compositions of a
  Poisson-subsampled Gaussian mechanism with rate ``q`` and noise multiplier ``z`` (a plain
  Gaussian at ``q = 1``). No accountant is written here.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math

import numpy as np

from medfed.client.upload import Upload
from medfed.errors import ConfigError

ACCOUNTANTS = ("pld", "rdp")


def clip_update(clip: float):
    """An upload transform: the payload (every shared parameter together) scaled to norm <= clip."""

    def transform(upload: Upload) -> Upload:
        norm = math.sqrt(sum(float(np.vdot(v, v)) for v in upload.payload.values()))
        if norm <= clip:
            return upload
        scale = clip / norm
        payload = {k: v * scale for k, v in upload.payload.items()}
        return Upload(upload.site, payload, upload.n_examples, upload.kind, upload.metrics, upload.extras)

    return transform


def _dp_accounting():
    try:
        import dp_accounting
    except ImportError:
        raise ConfigError("differential privacy's accounting needs dp-accounting: pip install 'medfed[privacy]'") from None
    return dp_accounting


def _event(rate: float, noise_multiplier: float, rounds: int):
    dp_accounting = _dp_accounting()

    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    step = gaussian if rate >= 1.0 else dp_accounting.PoissonSampledDpEvent(rate, gaussian)
    return dp_accounting.SelfComposedDpEvent(step, rounds)


def _accountant(kind: str):
    _dp_accounting()
    if kind == "pld":
        from dp_accounting.pld import PLDAccountant

        return PLDAccountant()
    if kind == "rdp":
        from dp_accounting.rdp import RdpAccountant

        return RdpAccountant()
    raise ConfigError(f"accountant {kind!r}: use {' or '.join(ACCOUNTANTS)}")


@contextlib.contextmanager
def _quiet_rdp():
    """RDP's accountant logs a warning for every order whose series does not converge (it drops
    that order, which is sound: epsilon is a minimum over orders); hundreds of such lines would
    bury the run's output, so they are held back while medfed accounts."""
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        log.setLevel(level)


@functools.lru_cache(maxsize=256)  # PLD takes seconds at small noise: every repeat and site ask the same
def client_level_epsilon(rate: float, noise_multiplier: float, rounds: int, delta: float,
                         accountant: str = "pld") -> float:
    """epsilon after ``rounds`` rounds of the (Poisson-subsampled) Gaussian mechanism; inf without noise."""
    if noise_multiplier <= 0:
        return math.inf
    with _quiet_rdp():
        return float(_accountant(accountant).compose(_event(rate, noise_multiplier, rounds)).get_epsilon(delta))


@functools.lru_cache(maxsize=64)  # the same (q, T, delta, target) within a run: every repeat asks
def calibrate_noise(rate: float, rounds: int, delta: float, target_epsilon: float,
                    accountant: str = "pld") -> float:
    """The smallest noise multiplier whose epsilon is at most ``target_epsilon``
    (``dp_accounting.calibrate_dp_mechanism``'s search, to 1e-4 absolute)."""
    dp_accounting = _dp_accounting()
    if not target_epsilon > 0:
        raise ConfigError(f"target_epsilon must be > 0, got {target_epsilon}")
    with _quiet_rdp():
        return float(dp_accounting.calibrate_dp_mechanism(
            lambda: _accountant(accountant), lambda z: _event(rate, z, rounds), target_epsilon, delta, tol=1e-4))
