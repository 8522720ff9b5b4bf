"""``run_federated``: one call that runs a method's site and server programs over sites in
memory (simulation). It builds the protocol's pieces — the programs, an executor, the
driver — and returns the finished run; everything it does goes through them, so a test of
``run_federated`` is a test of the protocol a deployment runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from medfed.client.local import LocalData, LocalTraining
from medfed.comm.boundary import UploadBoundary
from medfed.comm.compress import Codec
from medfed.engine.checkpoint import CheckpointStore
from medfed.engine.driver import Driver, FederatedRun
from medfed.engine.executors import local_executor
from medfed.engine.faults import Faults
from medfed.engine.protocol import FederatedAlgorithm, RoundRecord, programs, with_upload_transforms
from medfed.rng import KeyedRng

__all__ = ["FederatedAlgorithm", "FederatedRun", "RoundRecord", "run_federated"]


def run_federated(
    algorithm: FederatedAlgorithm,
    init_params: Mapping[str, np.ndarray],
    sites: Sequence[LocalData],
    training: LocalTraining,
    rounds: int,
    rng: KeyedRng,
    *,
    fraction: float = 1.0,
    min_sites: int = 1,
    boundary: UploadBoundary | None = None,
    evaluate: Callable[[Mapping[str, np.ndarray]], dict] | None = None,
    eval_every: int = 0,
    max_update_norm: float | None = None,
    executor: str = "inprocess",
    ray_address: str | None = None,
    faults: Faults | None = None,
    checkpoint_dir: Path | None = None,
    fingerprint: str = "",
    poisson: bool = False,
    codec: Codec | None = None,
    secure: tuple | None = None,
) -> FederatedRun:
    """Run ``rounds`` communication rounds and return the final global model and history.

    Randomness is keyed: selection by ``rng.child(round)``, a site's local work by
    ``rng.child(round, 1, name_key(site name))``, so a site draws the same numbers wherever
    it stands in the list, whichever order the sites are visited in and whichever executor
    runs them. ``evaluate`` (global params -> metrics) runs every ``eval_every`` rounds and
    after the last one. Screening, ``min_sites`` and the commit of site state follow
    :class:`~medfed.engine.protocol.ServerProgram` and :class:`~medfed.engine.runtime.SiteRuntime`.

    ``poisson``: with ``fraction`` < 1 each site takes part independently with that probability
    (the sampling client-level DP's accounting assumes). ``codec`` compresses every upload at
    its site (:mod:`medfed.comm.compress`); ``ray_address``: the cluster of executor ``ray``; ``secure`` (the site's and the server's
    :func:`~medfed.methods.privacy.secure_sides`) masks every upload and sums them securely; ``faults`` drops sites from rounds; with ``checkpoint_dir`` the coordinator checkpoints
    every round and the sites keep their state there, and a second call with the same folder
    and ``fingerprint`` resumes after the last saved round.
    """
    if boundary is not None:
        algorithm = with_upload_transforms(algorithm, boundary.transmit)
    names = [s.name for s in sites]
    site_program, server_program = programs(
        algorithm, training, names, fraction=fraction, min_sites=min_sites, max_update_norm=max_update_norm,
        poisson=poisson, codec=codec, secure=secure,
    )
    store = state_dir = None
    if checkpoint_dir is not None:
        store = CheckpointStore(Path(checkpoint_dir), fingerprint, durable=False)  # survives a kill
        state_dir = Path(checkpoint_dir) / "sites"
    runner = local_executor(executor, site_program, sites, rng, faults=faults, state_dir=state_dir,
                            ray_address=ray_address)
    try:
        driver = Driver(
            server_program, runner, rounds, rng, personal=site_program.personal,
            evaluate=evaluate, eval_every=eval_every, checkpoints=store,
        )
        return driver.run(init_params)
    finally:
        runner.close()
