"""Progressive Fourier Aggregation at the client end (PFA; Chen, Zhu, Yang & Yuan, MICCAI 2021,
"Personalized retrogress-resilient framework for real-world medical federated learning"; the
survey cites the journal version, Chen et al., 2022).

A convolution kernel is split by an orthonormal DCT over its spatial axes into low-frequency
coefficients, which the federation shares, and high-frequency ones, which each site keeps as its
own. Each round the site starts from the global model's low frequencies plus its own high ones,
trains, uploads only the low-frequency part of its update (at this round's share) and keeps its
high frequencies as client state: they never leave the site. Its personal model is the final
global low frequencies plus its own high ones. The share grows over the rounds
(:func:`share_schedule`).

Only convolution kernels (parameters with three or more axes: out, in, spatial...) are split;
every other parameter (biases, normalization, dense weights, the numpy logistic model's
``weight`` and ``bias``) is shared whole as in FedAvg, because a dense matrix's axes have no
spatial order for "frequency" to mean anything. On a model without kernels PFA is therefore
FedAvg exactly and each personal model is the global one.

The pieces here are pure functions of arrays; the server half is :mod:`medfed.server.fourier`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from medfed.client.local import LocalData, LocalTraining, local_sgd_update
from medfed.client.upload import Upload
from medfed.errors import ConfigError
from medfed.models.logistic import Params
from medfed.rng import KeyedRng
from medfed.wiretypes import wire_type


def is_kernel(shape: tuple[int, ...]) -> bool:
    """A convolution kernel: (out channels, in channels, spatial axes...)."""
    return len(shape) >= 3


def share_schedule(aggregation: int, rounds: int, start: float, end: float) -> float:
    """The low-frequency share of aggregation ``aggregation`` (0-based) out of ``rounds``.

    Linear from ``start`` toward ``end``: ``start + (aggregation / rounds) · (end − start)``, the
    authors' schedule (PRR-FL ``server.py``: ``l_rate + (a_iter / iters) · (0.95 − l_rate)``,
    ``l_rate = 0.7``), so the last round's share is just below ``end``. Past ``rounds`` it
    stays at the last value.
    """
    step = min(aggregation, rounds - 1) / rounds
    return start + step * (end - start)


@functools.lru_cache(maxsize=256)
def low_frequency_mask(spatial: tuple[int, ...], share: float) -> np.ndarray:
    """Which DCT coefficients of a kernel with spatial shape ``spatial`` are shared at ``share``.

    ``share`` is the fraction of each spatial axis, as in the authors' square low-frequency
    block (a fraction ``share`` of each axis of the spectrum), so ``floor(share^d · m)`` of the
    ``m`` coefficients of a kernel with ``d`` spatial axes are shared (at least the constant
    one). A square block of a 3×3 kernel can only be 1×1, 2×2 or 3×3, and the authors' shares
    0.7 to 0.95 would all give 2×2; so the coefficients are ranked by their largest normalized
    index ``max_i k_i / n_i`` (the nested square blocks), then by the sum of normalized indices,
    then by position, and the first ones are shared: a share whose block is whole (2/3 of a 3×3
    kernel) gives exactly that block, and in between the share grows one coefficient at a time
    (4 of 9 at 0.7, 8 of 9 at 0.95).
    """
    grids = np.meshgrid(*[np.arange(n) / n for n in spatial], indexing="ij")
    chebyshev = np.max(grids, axis=0).ravel()
    manhattan = np.sum(grids, axis=0).ravel()
    m = chebyshev.size
    order = np.lexsort((np.arange(m), manhattan, chebyshev))
    # 1e-9 absorbs representation error ((2/7) ** 2 * 49 = 3.9999999999999996)
    count = min(m, max(1, math.floor(share ** len(spatial) * m + 1e-9)))
    mask = np.zeros(m, dtype=bool)
    mask[order[:count]] = True
    mask = mask.reshape(spatial)
    mask.setflags(write=False)
    return mask


def merge(shared: np.ndarray, own: np.ndarray, share: float) -> np.ndarray:
    """A kernel whose low frequencies at ``share`` come from ``shared`` and the rest from ``own``
    (orthonormal DCT-II over the spatial axes). A parameter that is no kernel, or a share that
    covers every coefficient, is ``shared`` itself (no transform, so no rounding)."""
    shared = np.asarray(shared, dtype=np.float64)
    if not is_kernel(shared.shape):
        return np.array(shared, copy=True)
    mask = low_frequency_mask(shared.shape[2:], float(share))
    if mask.all():
        return np.array(shared, copy=True)
    spectrum = np.where(mask, spatial_dct(shared), spatial_dct(own))
    return spatial_dct(spectrum, inverse=True)


@functools.lru_cache(maxsize=32)
def dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix of length ``n`` (``scipy.fft.dct(..., norm="ortho")`` as a
    matrix; its transpose is the inverse). Kernels are a few taps wide, so a matrix product is
    as fast as an FFT and spares the first round the 0.2 s import of ``scipy.fft``."""
    k, j = np.arange(n)[:, None], np.arange(n)[None, :]
    C = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * j + 1) * k / (2 * n))
    C[0] /= np.sqrt(2.0)
    C.setflags(write=False)
    return C


def spatial_dct(kernel: np.ndarray, inverse: bool = False) -> np.ndarray:
    """The orthonormal DCT-II (or its inverse) of a kernel over its spatial axes (2 onwards):
    ``scipy.fft.dctn(kernel, axes=..., norm="ortho")`` to rounding (a few 1e-16 relative)."""
    out = np.asarray(kernel, dtype=np.float64)
    for axis in range(2, out.ndim):
        C = dct_matrix(out.shape[axis])
        out = np.moveaxis(np.tensordot(C.T if inverse else C, out, axes=(1, axis)), 0, axis)
    return out


def low_pass(value: np.ndarray, share: float) -> np.ndarray:
    """The part of ``value`` the federation shares at ``share`` (all of a parameter that is no kernel)."""
    value = np.asarray(value, dtype=np.float64)
    return merge(value, np.zeros_like(value), share)


@wire_type
@dataclass(frozen=True)
class FourierSiteState:
    """A site's own kernels after its last local training (parameter view, kernels only).
    Their frequencies beyond the share the global model was aggregated at are the site's own
    high-frequency components; none of this ever leaves the site."""

    kernels: dict[str, np.ndarray]


def _check_share(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(f"fourier: the server's {name} must be a share in (0, 1], got {value!r}")
    return float(value)


def _own_model(global_params: Params, state: FourierSiteState | None, shared: float | None) -> dict[str, np.ndarray]:
    """The global model's low frequencies (at ``shared``) with the site's own high ones.

    Before the site's first round it is the global model (every site holds the same initial
    kernels); before the server's first aggregation (``shared`` None) the site's kernels are
    all its own.
    """
    if state is None:
        return {k: np.array(v, dtype=np.float64, copy=True) for k, v in global_params.items()}
    out = {}
    for k, v in global_params.items():
        if k not in state.kernels:
            out[k] = np.array(v, dtype=np.float64, copy=True)
        elif shared is None:
            out[k] = np.array(state.kernels[k], copy=True)
        else:
            out[k] = merge(v, state.kernels[k], shared)
    return out


def fourier_update(
    global_params: Params,
    data: LocalData,
    config: LocalTraining,
    state: FourierSiteState | None,
    rng: KeyedRng,
    *,
    share: float,
    shared: float | None,
) -> tuple[Upload, FourierSiteState]:
    """PFA's client: train from global low + own high, upload the low part of the update.

    ``shared``: the share at which the global model's kernels were last aggregated (None
    before the first aggregation); ``share``: this round's share (``>= shared``). The upload
    is the delta ``local − global`` with every kernel low-passed at ``share``: frequencies newly
    shared this round carry the site's whole value for them, so the server's mean makes them
    the sites' mean. The site keeps its trained kernels. FedAvg's local steps
    (:func:`~medfed.client.local.local_sgd_update`); the loss metric is the site's training
    loss at its starting (personal) model.
    """
    share = _check_share("share", share)
    start = _own_model(global_params, state, None if shared is None else _check_share("shared", shared))
    upload, _ = local_sgd_update(start, data, config, None, rng)
    payload, kernels = {}, {}
    for k, delta in upload.payload.items():
        if not is_kernel(np.shape(delta)):
            payload[k] = delta  # start == global here: the delta is FedAvg's, bit for bit
            continue
        kernels[k] = start[k] + delta
        payload[k] = low_pass(kernels[k] - global_params[k], share)
    return replace(upload, payload=payload), FourierSiteState(kernels)


def fourier_personalize(
    global_params: Params,
    data: LocalData,
    training: LocalTraining,
    state: FourierSiteState | None,
    rng: KeyedRng,
    *,
    shared: float | None,
    **message: Any,
) -> dict[str, np.ndarray]:
    """A site's personal model after the last round: the final global model's low frequencies
    (at ``shared``, the share of the server's last aggregation) with the site's own high ones;
    the global model itself for a site that never took part. Nothing leaves the site. The
    rest of the server's last message (the next share) is not needed.

    A model that can (``recalibrate``) then recomputes its normalization statistics on the
    site's rows under these weights, as the authors' code keeps normalization local: the
    averaged statistics belong to no site's kernels."""
    personal = _own_model(global_params, state, shared)
    recalibrate = getattr(training.model, "recalibrate", None)
    return recalibrate(personal, data.X) if recalibrate is not None else personal
