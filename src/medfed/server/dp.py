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

from collections.abc import Mapping


from medfed.rng import KeyedRng
from medfed.server.aggregate import Aggregator, StackedUploads


def dp_sensitivity(clip: float, sizes: Mapping[str, float], rate: float) -> float:
    """How much one site can move the noised mean: ``n_max C / (q N)``."""
    total = float(sum(sizes.values()))
    return clip * max(sizes.values()) / (rate * total)


def dp_gaussian_mean(noise_multiplier: float, clip: float, sizes: Mapping[str, float], rate: float,
                     rng: KeyedRng) -> Aggregator:
    """Noised fixed-denominator mean of clipped updates; noise drawn from ``rng.child(round)``,
    so a resumed or re-executed round draws the same noise."""
    total = float(sum(sizes.values()))
    std = noise_multiplier * dp_sensitivity(clip, sizes, rate) if noise_multiplier > 0 else 0.0

    def apply(stack: StackedUploads, state, global_params, round_):
        w = stack.weights / (rate * total) if rate < 1.0 else stack.weights / total
        mean = {k: (w @ v.reshape(len(w), -1)).reshape(v.shape[1:]) for k, v in stack.payload.items()}
        if std > 0:
            gen = rng.child(round_).generator
            mean = {k: v + gen.normal(0.0, std, size=v.shape) for k, v in mean.items()}
        return mean, state, {"noise_std": std, "participants": len(stack.sites)}

    return Aggregator(lambda global_params: None, apply, "dp_gaussian_mean")
