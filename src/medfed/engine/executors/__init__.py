"""Executors: the only code that knows where sites are.

An executor carries a round's plan to the cohort's sites and their answers back, and the
coordinator's decision on each upload to its site. ``inprocess`` keeps every site's runtime
in this process (today's serial loop); ``process`` gives each a process of its own, as a
deployment would; ``vectorized`` trains the whole cohort as one array program (the numpy
logistic model's batched rules, torch models through vmap: :mod:`medfed.engine.executors.vectorized`); ``ray`` makes sites Ray actors, on this machine or a cluster; the Flower executor (:mod:`medfed.deploy`) reaches SuperNodes over gRPC.
Methods never see which one runs them: same config and seed, same numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from medfed.client.local import LocalData
from medfed.client.upload import Upload
from medfed.engine.faults import Faults
from medfed.engine.protocol import Params, RoundPlan, SiteProgram, SiteSetup
from medfed.errors import ConfigError
from medfed.rng import KeyedRng


class Executor(Protocol):
    """Where the sites are. Replies come in cohort order: an upload, or why none came."""

    sites: tuple[str, ...]

    def setup(self) -> dict[str, SiteSetup]: ...

    def train(self, plan: RoundPlan) -> dict[str, Upload | str]: ...

    def stage(self, name: str, round_: int, messages: Mapping[str, Any]) -> dict[str, Any]:
        """Carry one protocol stage to the sites named in ``messages`` (each its own message) and
        their answers back, or why none came (secure aggregation's share, mask and unmask)."""
        ...

    def commit(self, round_: int, decisions: Mapping[str, bool]) -> None: ...

    def personalize(self, plan: RoundPlan) -> dict[str, Params]: ...

    def site_states(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


LOCAL_EXECUTORS = ("inprocess", "process", "vectorized", "ray")
EXECUTORS = (*LOCAL_EXECUTORS, "flower")


def local_executor(
    kind: str,
    program: SiteProgram,
    sites: Sequence[LocalData],
    rng: KeyedRng,
    *,
    faults: Faults | None = None,
    state_dir: Path | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
) -> Executor:
    """An executor of a simulation: its sites run on this machine, or on the Ray cluster at
    ``ray_address`` (executor ``ray``; None: a Ray started here)."""
    if kind == "inprocess":
        from medfed.engine.executors.inprocess import InProcessExecutor

        return InProcessExecutor(program, sites, rng, faults=faults, state_dir=state_dir)
    if kind == "process":
        from medfed.engine.executors.process import ProcessExecutor

        return ProcessExecutor(program, sites, rng, faults=faults, state_dir=state_dir, workers=workers)
    if kind == "vectorized":
        from medfed.engine.executors.vectorized import VectorizedExecutor

        return VectorizedExecutor(program, sites, rng, faults=faults, state_dir=state_dir)
    if kind == "ray":
        from medfed.engine.executors.ray import RayExecutor

        return RayExecutor(program, sites, rng, faults=faults, state_dir=state_dir, workers=workers,
                           address=ray_address)
    if kind == "flower":
        raise ConfigError(
            "executor 'flower' runs on Flower's deployment runtime: start it with `medfed deploy server` "
            "and `medfed deploy site`; in simulation use executor 'inprocess', 'process' or 'ray'"
        )
    raise ConfigError(f"unknown executor {kind!r}; available: {', '.join(EXECUTORS)}")
