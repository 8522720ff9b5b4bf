"""Frequency-domain image harmonization: each image's low-frequency amplitude moved toward the
federation's mean amplitude, its phase kept (Liu et al., 2021, FedDG; Jiang et al., 2022, HarmoFL).

A scanner's gain, bias field and contrast live mostly in an image's low-frequency amplitude
spectrum, its anatomy mostly in the phase (FedDG, §3.2; HarmoFL, §3.1). The exchange:

1. each site sends :class:`AmplitudeStats`: its image count and, per channel, the mean
   amplitude of its training images' low-frequency band -- a summary over images, never an
   image, and no phase;
2. the coordinator averages them, weighted by images (:func:`fit_frequency`): the
   :class:`FrequencyModel` holds that reference;
3. each site moves the low-band amplitude ``a`` of each of its images to
   ``(1 - strength) a + strength a_ref`` (FedDG's continuous interpolation), keeping the
   image's phase, and leaves every other frequency as it is (:meth:`FrequencyModel.apply`).

Step 3 needs nothing but the image and the reference, so a site the fit never saw adapts
itself by applying it to its own images, sending nothing.

The spectrum is the discrete Fourier transform over the spatial axes (2D or 3D), per channel;
as images are real it is computed as the half spectrum (``numpy.fft.rfftn``), whose low band
is all a site shares. The low band is the box of frequencies at most ``band`` cycles per pixel
along every axis (``band = 0.5``, the Nyquist frequency: the whole spectrum).

Where this departs from the papers: FedDG exchanges amplitude spectra of single images
between sites and interpolates toward a random one during training (augmentation); HarmoFL
replaces the low band with the federation's mean amplitude at each round inside training.
Here the mean amplitude is exchanged once, at setup, and every image (training and test) is
harmonized before any model sees it, so that the same step serves Single, Cross and Mix and
an unseen site (as ComBat does, :mod:`medfed.data.harmonize`). FedDG's square band of
half-width ``floor(L min(H, W))`` pixels is here per axis, ``floor(band n_axis)``: the same on
square images, and ``band`` is a frequency in cycles per pixel on any shape.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medfed.errors import ConfigError, DataError
from medfed.wiretypes import wire_type

NYQUIST = 0.5  # cycles per pixel: the largest band, the whole spectrum
CHUNK_IMAGES = 64  # images transformed at a time, to bound the complex spectra held in memory


def check_band(band) -> float:
    """A band in (0, 0.5] cycles per pixel."""
    if isinstance(band, bool) or not isinstance(band, (int, float)) or not 0 < band <= NYQUIST:
        raise ConfigError(f"--band must be in (0, {NYQUIST}] (cycles per pixel; {NYQUIST} is the whole spectrum), "
                          f"got {band!r}")
    return float(band)


def check_strength(strength) -> float:
    """A strength in [0, 1]: 0 leaves images as they are, 1 takes the federation's amplitude."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
        raise ConfigError(f"--strength must be in [0, 1] (0: images as they are, 1: the federation's low-band "
                          f"amplitude), got {strength!r}")
    return float(strength)


@functools.lru_cache(maxsize=32)
def low_band_mask(spatial: tuple[int, ...], band: float) -> np.ndarray:
    """Which coefficients of the half spectrum (``rfftn`` layout) of an image of spatial shape
    ``spatial`` lie in the low band: at most ``band`` cycles per pixel along every axis. The
    zero frequency always does. Symmetric under ``k -> -k``, so a change confined to it keeps
    a real image real."""
    axes = [np.abs(np.fft.fftfreq(n)) for n in spatial[:-1]] + [np.fft.rfftfreq(spatial[-1])]
    # 1e-12 absorbs representation error (k / n for k = band * n exactly)
    inside = [f <= band + 1e-12 for f in axes]
    mask = functools.reduce(np.logical_and.outer, inside) if len(inside) > 1 else inside[0]
    mask = np.asarray(mask)
    mask.setflags(write=False)
    return mask


def _images(name: str, X) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim not in (4, 5) or not np.issubdtype(X.dtype, np.floating):
        raise DataError(f"site {name!r}: frequency harmonization needs images (n, C, H, W) or (n, C, D, H, W) of "
                        f"floats, got shape {X.shape} of {X.dtype}")
    return X


def _low_band(X: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The low-band coefficients (n, C, K) of images ``X`` (n, C, *spatial)."""
    axes = tuple(range(2, X.ndim))
    return np.fft.rfftn(X.astype(np.float64, copy=False), axes=axes)[..., mask]


@wire_type
@dataclass(frozen=True)
class AmplitudeStats:
    """Setup exchange, site -> coordinator: the site's training-image count ``n`` and, per
    channel, the mean amplitude of their low band (``mean_amplitude``: (C, K), the band's
    coefficients in :func:`low_band_mask` order)."""

    site: str
    n: int
    spatial: tuple[int, ...]
    band: float
    mean_amplitude: np.ndarray


@wire_type
@dataclass(frozen=True)
class FrequencyModel:
    """The federation's reference amplitude of the low band (``reference``: (C, K), the
    image-weighted mean of the sites' means) and how far each image moves toward it."""

    sites: tuple[str, ...]
    n: tuple[int, ...]
    spatial: tuple[int, ...]
    band: float
    strength: float
    reference: np.ndarray

    def apply(self, X: np.ndarray, site: str = "") -> np.ndarray:
        """Images ``X`` with each one's low-band amplitude ``a`` replaced by
        ``(1 - strength) a + strength reference``, its phase kept; every other frequency is
        unchanged. The change is added to the image, so strength 0 returns it bit for bit.
        Shape and dtype are kept."""
        X = _images(site or "?", X)
        if tuple(X.shape[2:]) != self.spatial or X.shape[1] != self.reference.shape[0]:
            raise DataError(f"site {site!r}: images of shape {X.shape[1:]}; the frequency harmonization was fitted on "
                            f"{(self.reference.shape[0], *self.spatial)}")
        mask = low_band_mask(self.spatial, self.band)
        axes = tuple(range(2, X.ndim))
        out = np.empty_like(X)
        for start in range(0, X.shape[0], CHUNK_IMAGES):
            x = X[start:start + CHUNK_IMAGES].astype(np.float64)
            coefficients = _low_band(x, mask)
            amplitude = np.abs(coefficients)
            target = (1.0 - self.strength) * amplitude + self.strength * self.reference
            # the image's phase where it has one; a zero coefficient has none and takes phase 0
            unit = np.divide(coefficients, amplitude, out=np.ones_like(coefficients), where=amplitude > 0)
            change = np.zeros((*x.shape[:-1], x.shape[-1] // 2 + 1), dtype=np.complex128)
            change[..., mask] = (target - amplitude) * unit
            out[start:start + CHUNK_IMAGES] = x + np.fft.irfftn(change, s=self.spatial, axes=axes)
        return out

    def to_json(self) -> dict:
        """What was fitted, for ``results.json``."""
        return {"method": "frequency", "reference": "Liu et al., 2021 (FedDG); Jiang et al., 2022 (HarmoFL)",
                "band": self.band, "strength": self.strength, "spatial_shape": list(self.spatial),
                "low_band_coefficients": int(self.reference.shape[1]),
                "images": dict(zip(self.sites, self.n))}


def amplitude_stats(site: str, X, band: float) -> AmplitudeStats:
    """Step 1 at a site: the mean low-band amplitude of its images, per channel."""
    X = _images(site, X)
    if X.shape[0] < 1:
        raise DataError(f"site {site!r} has no training images to share an amplitude spectrum of")
    spatial, band = tuple(X.shape[2:]), check_band(band)
    mask = low_band_mask(spatial, band)
    total = sum(np.abs(_low_band(X[s:s + CHUNK_IMAGES], mask)).sum(axis=0)
                for s in range(0, X.shape[0], CHUNK_IMAGES))
    return AmplitudeStats(site, int(X.shape[0]), spatial, band, total / X.shape[0])


def fit_frequency(stats: Sequence[AmplitudeStats], strength: float) -> FrequencyModel:
    """Step 2 at the coordinator: the sites' mean amplitudes averaged, weighted by images."""
    if not stats:
        raise DataError("frequency harmonization needs the amplitude statistics of at least one site")
    names = [s.site for s in stats]
    if len(set(names)) != len(names):
        raise DataError(f"frequency harmonization: duplicate site names {names}")
    first = stats[0]
    for s in stats[1:]:
        if (s.spatial, s.band, s.mean_amplitude.shape) != (first.spatial, first.band, first.mean_amplitude.shape):
            raise DataError(f"site {s.site!r}: images of spatial shape {s.spatial} with "
                            f"{s.mean_amplitude.shape[0]} channel(s), where site {first.site!r} has {first.spatial} "
                            f"with {first.mean_amplitude.shape[0]}; frequency harmonization needs one image shape")
    n = np.array([s.n for s in stats], dtype=np.float64)
    reference = np.tensordot(n / n.sum(), np.stack([s.mean_amplitude for s in stats]), axes=1)
    return FrequencyModel(tuple(names), tuple(int(k) for k in n), first.spatial, first.band, check_strength(strength),
                          reference)


def federated_frequency(images: Sequence[tuple[str, np.ndarray]], band: float, strength: float) -> FrequencyModel:
    """The exchange in one process (simulation): each site's statistics from its own images
    ``(name, X)`` alone, then the fit, which sees those summaries only."""
    return fit_frequency([amplitude_stats(name, X, band) for name, X in images], strength)
