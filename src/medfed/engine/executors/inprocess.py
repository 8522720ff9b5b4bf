"""Every site's runtime in this process, visited in cohort order: the serial simulation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medfed.client.local import LocalData
from medfed.client.upload import Upload
from medfed.engine.faults import Faults
from medfed.engine.protocol import Params, RoundPlan, SiteProgram, SiteSetup
from medfed.engine.runtime import SiteRuntime
from medfed.errors import MedfedError
from medfed.rng import KeyedRng


class InProcessExecutor:
    def __init__(
        self,
        program: SiteProgram,
        sites: Sequence[LocalData],
        rng: KeyedRng,
        *,
        faults: Faults | None = None,
        state_dir: Path | None = None,
    ) -> None:
        self.runtimes = {d.name: SiteRuntime(program, d, rng, state_dir, durable=False) for d in sites}
        self.sites = tuple(self.runtimes)
        self.faults = faults or Faults()

    def setup(self) -> dict[str, SiteSetup]:
        return {name: rt.setup() for name, rt in self.runtimes.items()}

    def train(self, plan: RoundPlan) -> dict[str, Upload | str]:
        runtimes, faults = self.runtimes, self.faults
        if not faults:
            return {site: runtimes[site].train(plan) for site in plan.cohort}
        return {site: faults.dropped(site, plan.round) or runtimes[site].train(plan) for site in plan.cohort}

    def stage(self, name: str, round_: int, messages: Mapping[str, Any]) -> dict[str, Any]:
        out = {}
        for site, message in messages.items():
            why = self.faults.dropped(site, round_, name)
            if why is None:
                try:
                    out[site] = self.runtimes[site].stage(name, round_, message)
                except MedfedError as exc:  # what a deployed site would answer: its reason
                    why = f"site error: {exc}"
            if why is not None:
                out[site] = why
        return out

    def commit(self, round_: int, decisions: Mapping[str, bool]) -> None:
        for site, accepted in decisions.items():
            self.runtimes[site].commit(round_, accepted)

    def personalize(self, plan: RoundPlan) -> dict[str, Params]:
        return {site: self.runtimes[site].personalize(plan) for site in plan.cohort}

    def site_states(self) -> dict[str, Any]:
        return {name: rt.memory.state for name, rt in self.runtimes.items()}

    def close(self) -> None:
        pass
