"""Engine: the round of survey §2.3 as a protocol between a coordinator and sites.

:mod:`~medfed.engine.protocol` holds the two programs and the messages between them,
:mod:`~medfed.engine.runtime` a site's side, :mod:`~medfed.engine.driver` the coordinator's
loop, :mod:`~medfed.engine.executors` where sites run, :mod:`~medfed.engine.checkpoint` resume.
"""

from medfed.engine.driver import Driver, FederatedRun
from medfed.engine.loop import run_federated
from medfed.engine.protocol import (
    FederatedAlgorithm,
    RoundContext,
    RoundPlan,
    RoundRecord,
    ServerProgram,
    ServerState,
    SiteProgram,
    SiteSetup,
)
from medfed.engine.runtime import SiteRuntime
from medfed.engine.selection import select_sites

__all__ = [
    "Driver",
    "FederatedAlgorithm",
    "FederatedRun",
    "RoundContext",
    "RoundPlan",
    "RoundRecord",
    "ServerProgram",
    "ServerState",
    "SiteProgram",
    "SiteRuntime",
    "SiteSetup",
    "run_federated",
    "select_sites",
]
