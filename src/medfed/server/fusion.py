"""Dynamic fusion (Zhang et al., 2021b): aggregate only the sites that are on time and good enough.

Each round the server waits until a deadline; a site whose upload arrives later, or whose
local model falls below a performance bar, is left out of that round's average. The sites
report their latency and local accuracy in the upload's metrics (see
:func:`medfed.client.reporting.with_round_report`).
"""

from __future__ import annotations

import math

import numpy as np

from medfed.errors import ConfigError
from medfed.server.aggregate import Aggregator, StackedUploads


def dynamic_fusion(deadline: float = math.inf, bar: float = 0.0) -> Aggregator:
    """Example-weighted mean over the sites with ``latency <= deadline`` and ``local_acc >= bar``.

    Zhang et al., 2021b ("Dynamic fusion-based federated learning for COVID-19 detection"):
    the server drops late and under-performing sites per round instead of waiting for, or
    averaging in, them. With ``deadline = inf`` and ``bar = 0`` every site is kept: FedAvg.
    If no site qualifies, the update is zero (the global model stays) and the report says so.
    """
    def apply(stack: StackedUploads, state, global_params, round_):
        k = len(stack.sites)
        keep = np.ones(k, dtype=bool)
        dropped: dict[str, str] = {}
        for metric, limit, late in (("latency", deadline, True), ("local_acc", bar, False)):
            if (late and math.isinf(limit)) or (not late and limit == 0.0):
                continue
            if metric not in stack.metrics:
                raise ConfigError(f"dynamic_fusion needs the sites to report {metric!r}; wrap the rule with with_round_report")
            values = stack.metrics[metric]
            fails = values > limit if late else values < limit
            for i in np.flatnonzero(fails & keep):
                dropped[stack.sites[i]] = (
                    f"latency {values[i]:.3g} s > deadline {limit:g} s" if late
                    else f"local accuracy {values[i]:.3g} < bar {limit:g}"
                )
            keep &= ~fails
        report = {"kept": [s for s, kept in zip(stack.sites, keep) if kept], "dropped": dropped} if dropped else None
        if not keep.any():
            return {k_: np.zeros_like(v[0]) for k_, v in stack.payload.items()}, state, report
        w = np.where(keep, stack.weights, 0.0)
        w = w / w.sum()
        mean = {name: np.tensordot(w, v, axes=1) for name, v in stack.payload.items()}
        return mean, state, report

    return Aggregator(lambda global_params: None, apply, "dynamic_fusion")
