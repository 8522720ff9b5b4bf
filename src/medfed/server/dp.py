"""The server end of client-level differential privacy (McMahan et al., 2018, DP-FedAvg).

Each participating site's update arrives clipped to L2 norm ``clip`` (the site's channel did
it: :func:`medfed.comm.privacy.clip_update`). :func:`dp_gaussian_mean` replaces the example-
weighted mean: it sums the updates with weights ``n_k / N`` over a *fixed* denominator ``q N``
(``N``: every site's examples, shared at setup; ``q``: the Poisson participation rate), so one
site changes the result by at most ``n_max C / (q N)``, and adds Gaussian noise of standard
deviation ``z`` times that sensitivity to every coordinate. With ``z = 0``, ``C = inf`` and
``q = 1`` it is FedAvg's weighted mean bit for bit (the same weights, the same sums).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from medfed.comm.secure import SumTerm
from medfed.rng import KeyedRng
from medfed.server.aggregate import WEIGHTED_UPDATE, Aggregator, StackedUploads, SummedUploads
from medfed.wiretypes import wire_type


def dp_sensitivity(clip: float, sizes: Mapping[str, float], rate: float) -> float:
    """How much one site can move the noised mean: ``n_max C / (q N)``."""
    total = float(sum(sizes.values()))
    return clip * max(sizes.values()) / (rate * total)


def _fixed_denominator_mean(stack: StackedUploads, denominator: float, clip: float) -> dict[str, np.ndarray]:
    """``sum_k n_k x_k / denominator`` over the uploads, each held to norm ``clip``: with every site,
    ``denominator = N`` and uploads within the clip, FedAvg's weighted mean with the same weights
    and sums (``weighted_mean``), so the result is bit-identical.

    The sites clipped already; the server clips again because a lossy codec (q8, q4, top-k with
    its error feedback) can carry a clipped update past the bound, and the noise is sized for
    ``clip`` (an update within it is left exactly as it is)."""
    w = stack.weights / denominator
    payload = stack.payload
    flat = {k: v.reshape(len(w), -1) for k, v in payload.items()}
    norms = np.sqrt(sum(np.einsum("ij,ij->i", v, v) for v in flat.values()))
    if np.any(norms > clip):
        w = w * np.minimum(1.0, clip / np.maximum(norms, 1e-300))
    return {k: (w @ flat[k]).reshape(v.shape[1:]) for k, v in payload.items()}


def _summed_mean(summed: SummedUploads, denominator: float) -> dict[str, np.ndarray]:
    """The same mean from the securely aggregated sum of ``n_k / N x_k``."""
    return {k: v * (summed.total / denominator) for k, v in summed[WEIGHTED_UPDATE].items()}


def dp_gaussian_mean(noise_multiplier: float, clip: float, sizes: Mapping[str, float], rate: float,
                     rng: KeyedRng, *, site_noise: float = 0.0) -> Aggregator:
    """Noised fixed-denominator mean of clipped updates; noise drawn from ``rng.child(round)``,
    so a resumed or re-executed round draws the same noise. ``site_noise``: the std each site
    added to its weighted update before masking (``--dp distributed``; the server adds none
    then, ``noise_multiplier`` is 0 here), reported with the noise the sum carries."""
    total = float(sum(sizes.values()))
    std = noise_multiplier * dp_sensitivity(clip, sizes, rate) if noise_multiplier > 0 else 0.0

    def noised(mean, round_, participants):
        if std > 0:
            gen = rng.child(round_).generator
            mean = {k: v + gen.normal(0.0, std, size=v.shape) for k, v in mean.items()}
        report = {"noise_std": std, "participants": participants}
        if site_noise > 0:  # the sum of the sites' noise, on the mean (divided by q)
            report["noise_std"] = site_noise * math.sqrt(participants) / rate
        return mean, report

    def apply(stack: StackedUploads, state, global_params, round_):
        mean, report = noised(_fixed_denominator_mean(stack, rate * total, clip), round_, len(stack.sites))
        return mean, state, report

    def on_sum(summed: SummedUploads, state, global_params, round_):
        mean, report = noised(_summed_mean(summed, rate * total), round_, len(summed.sites))
        return mean, state, report

    return Aggregator(lambda global_params: None, apply, "dp_gaussian_mean", reads="sum", on_sum=on_sum,
                      sums=(WEIGHTED_UPDATE,))


WITHIN_CLIP = SumTerm("extras", "dp_within_clip", "uniform", scalar=True)  # how many sites were within the clip


@wire_type
@dataclass(frozen=True)
class AdaptiveClipState:
    """The clip bound the sites apply in the next round (adaptive clipping)."""

    clip: float


def adaptive_noise(noise_multiplier: float, bit_share: float) -> tuple[float, float]:
    """Split the noise multiplier ``z`` between the update and the clipped-count (Andrew et al.,
    2021, Thm 1: ``z^-2 = z_update^-2 + (2 sigma_bits)^-2``), giving the count ``bit_share`` of
    the inverse-variance budget: ``(z_update, sigma_bits)``. The paper sets ``sigma_bits = m/20``
    for ``m`` expected sites; that leaves almost nothing to the update with a handful of sites,
    so the share is fixed instead."""
    if noise_multiplier <= 0:
        return 0.0, 0.0
    return noise_multiplier / math.sqrt(1.0 - bit_share), noise_multiplier / (2.0 * math.sqrt(bit_share))


def dp_adaptive_mean(noise_multiplier: float, clip: float, sizes: Mapping[str, float], rate: float,
                     rng: KeyedRng, *, quantile: float = 0.5, lr: float = 0.2, bit_share: float = 0.1) -> Aggregator:
    """:func:`dp_gaussian_mean` with the clip adapted each round toward the ``quantile`` of the
    sites' update norms (Andrew et al., 2021): each site also reports whether its update was
    within the clip (``extras["dp_within_clip"]``); the server noises that count, and sets
    ``C <- C exp(-lr (b - quantile))`` with ``b`` the noised share within."""
    total = float(sum(sizes.values()))
    z_update, sigma_bits = adaptive_noise(noise_multiplier, bit_share)
    expected = rate * len(sizes)

    def apply(stack: StackedUploads, state: AdaptiveClipState, global_params, round_):
        return step(_fixed_denominator_mean(stack, rate * total, state.clip), float(np.sum(stack.extras["dp_within_clip"])),
                    len(stack.sites), state, round_)

    def on_sum(summed: SummedUploads, state: AdaptiveClipState, global_params, round_):
        return step(_summed_mean(summed, rate * total), summed[WITHIN_CLIP], len(summed.sites), state, round_)

    def step(mean, count: float, participants: int, state: AdaptiveClipState, round_):
        c = state.clip
        std = z_update * dp_sensitivity(c, sizes, rate)
        if noise_multiplier > 0:
            gen = rng.child(round_).generator
            mean = {k: v + gen.normal(0.0, std, size=v.shape) for k, v in mean.items()}
            count += float(gen.normal(0.0, sigma_bits))
        within = count / expected
        new = c * math.exp(-lr * (within - quantile))
        return mean, AdaptiveClipState(new), {"noise_std": std, "clip": c, "next_clip": new,
                                             "participants": participants}

    return Aggregator(lambda global_params: AdaptiveClipState(float(clip)), apply, "dp_adaptive_mean",
                      reads="sum", on_sum=on_sum, sums=(WEIGHTED_UPDATE, WITHIN_CLIP))
