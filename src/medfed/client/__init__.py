"""Client end (survey §3.2): local update rules run at a site on its private data, and the
local optimizer they share (:mod:`medfed.client.optimizer`)."""

from medfed.client.local import (
    LocalData,
    LocalTraining,
    fedprox_update,
    fedsgd_gradient,
    local_sgd_update,
    sgd_steps,
)
from medfed.client.optimizer import descend
from medfed.client.upload import Upload

__all__ = [
    "LocalData",
    "LocalTraining",
    "Upload",
    "descend",
    "fedprox_update",
    "fedsgd_gradient",
    "local_sgd_update",
    "sgd_steps",
]
