"""Progressive Fourier Aggregation's server step (PFA; Chen, Zhu, Yang & Yuan, MICCAI 2021; the
survey's Chen et al., 2022): average the low frequencies of the sites' kernels, a share that
grows over the rounds; the high frequencies stay at the sites (:mod:`medfed.client.fourier`).
"""

from __future__ import annotations

from dataclasses import dataclass

from medfed.client.fourier import is_kernel, low_frequency_mask, low_pass, share_schedule
from medfed.errors import ConfigError
from medfed.server.aggregate import Aggregator, StackedUploads
from medfed.wiretypes import wire_type


@wire_type
@dataclass(frozen=True)
class FourierServerState:
    """Aggregations done so far, the share of the next one, and the share of the last one
    (None before the first): the global kernels' frequencies within ``shared`` are the
    federation's, the rest keep their initial values, which no site uses. The schedule
    advances with each aggregation, so a round the server skips (too few valid uploads) does
    not use up a step of it."""

    aggregations: int
    share: float
    shared: float | None = None


def fourier(start: float = 0.7, end: float = 0.95, rounds: int = 1) -> Aggregator:
    """The example-weighted mean of the sites' deltas, each convolution kernel low-passed at
    this aggregation's share (:func:`~medfed.client.fourier.share_schedule` from ``start`` to
    ``end`` over ``rounds``); parameters that are no kernels are averaged whole.

    The sites already upload only low frequencies (:func:`~medfed.client.fourier.fourier_update`);
    the server low-passes the mean again so that the global kernels never take up a high
    frequency, whatever a site sends. ``start = end = 1`` shares everything and is
    :func:`~medfed.server.aggregate.weighted_mean` exactly. Only ``delta`` uploads are
    accepted. Report: this aggregation's ``share`` and (on a model with kernels) the fraction of
    kernel coefficients it shares, ``kernel_share``. With FedAvg's client (a config pipeline) only this half of PFA runs: no site keeps
    high frequencies, and the global kernels' high frequencies stay at their initial values.
    """
    def init(global_params) -> FourierServerState:
        return FourierServerState(0, share_schedule(0, rounds, start, end))

    def apply(stack: StackedUploads, state: FourierServerState, global_params, round_):
        if stack.kind != "delta":
            raise ConfigError(f"fourier aggregates 'delta' uploads (local − global); got {stack.kind!r} uploads")
        share = state.share
        w = stack.weights / stack.weights.sum()
        out, shared, total = {}, 0, 0
        for name, v in stack.payload.items():
            mean = (w @ v.reshape(len(w), -1)).reshape(v.shape[1:])  # weighted_mean's arithmetic
            out[name] = low_pass(mean, share)
            if is_kernel(mean.shape):
                mask = low_frequency_mask(mean.shape[2:], share)
                shared += int(mask.sum()) * (mean.size // mask.size)
                total += mean.size
        report = {"share": share, **({"kernel_share": shared / total} if total else {})}
        done = state.aggregations + 1
        return out, FourierServerState(done, share_schedule(done, rounds, start, end), share), report

    return Aggregator(init, apply, "fourier")


def fourier_message(state: FourierServerState) -> dict[str, float | None]:
    """What the server sends with the global model: this round's share and the share the
    global kernels were last aggregated at (the keywords of the sites' ``fourier_update``)."""
    return {"share": state.share, "shared": state.shared}
