"""Engine: the round loop of survey §2.3 (select, train locally, upload, aggregate, broadcast)."""

from medfed.engine.loop import (
    FederatedAlgorithm,
    FederatedRun,
    RoundRecord,
    run_federated,
)
from medfed.engine.selection import select_sites

__all__ = ["FederatedAlgorithm", "FederatedRun", "RoundRecord", "run_federated", "select_sites"]
