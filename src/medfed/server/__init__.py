"""Server end (survey §3.3): aggregation as composable transforms over stacked uploads."""

from medfed.server.aggregate import (
    Aggregator,
    StackedUploads,
    apply_delta,
    chain,
    gradient_step,
    stack_uploads,
    weighted_mean,
)

__all__ = [
    "Aggregator",
    "StackedUploads",
    "apply_delta",
    "chain",
    "gradient_step",
    "stack_uploads",
    "weighted_mean",
]
