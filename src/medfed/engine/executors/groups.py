"""Sites owned in groups by workers the coordinator reaches by message (processes, Ray actors).

A worker holds a :class:`SiteGroup` (its sites' runtimes: rows and state) and answers one
request at a time with :meth:`SiteGroup.answer`; :class:`GroupedExecutor` is the coordinator's
side, which splits each request by owner and merges the answers back in cohort order. The
executors differ only in how a request reaches a worker (``_ask``) and how workers start and end.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from medfed.client.local import LocalData
from medfed.client.upload import Upload
from medfed.engine.faults import Faults
from medfed.engine.protocol import Params, RoundPlan, SiteProgram, SiteSetup
from medfed.engine.runtime import SiteRuntime
from medfed.errors import MedfedError
from medfed.rng import KeyedRng


def site_groups(sites: Sequence[LocalData], workers: int | None) -> list[list[LocalData]]:
    """``workers`` groups (default: one per site), dealt round-robin so sizes differ by at most one."""
    n = max(1, min(len(sites), workers or len(sites)))
    return [list(sites[i::n]) for i in range(n)]


def reply_of(reply: tuple[str, Any]) -> Any:
    """A worker's answer, or its error raised here, in the coordinator."""
    status, answer = reply
    if status == "error":
        raise answer
    return answer


class SiteGroup:
    """The sites one worker owns and the requests it answers for them."""

    def __init__(self, runtimes: dict[str, SiteRuntime]) -> None:
        self.runtimes = runtimes

    @classmethod
    def of(cls, program: SiteProgram, sites: Iterable[LocalData], rng: KeyedRng,
           state_dir: Path | None) -> SiteGroup:
        return cls({d.name: SiteRuntime(program, d, rng, state_dir, durable=False) for d in sites})

    def answer(self, request: str, args: Any) -> tuple[str, Any]:
        """``("ok", answer)`` or ``("error", exception)``: an exception never ends the worker."""
        runtimes = self.runtimes
        try:
            if request == "train":
                plan, names = args
                answer: Any = {site: runtimes[site].train(plan) for site in names}
            elif request == "stage":
                name, round_, messages = args
                answer = {}
                for site, message in messages.items():
                    try:
                        answer[site] = runtimes[site].stage(name, round_, message)
                    except MedfedError as exc:  # what a deployed site would answer: its reason
                        answer[site] = f"site error: {exc}"
            elif request == "commit":
                round_, decisions = args
                for site, accepted in decisions.items():
                    runtimes[site].commit(round_, accepted)
                answer = None
            elif request == "personalize":
                plan, names = args
                answer = {site: runtimes[site].personalize(plan) for site in names}
            elif request == "setup":
                answer = {site: rt.setup() for site, rt in runtimes.items()}
            else:  # "states"
                answer = {site: rt.memory.state for site, rt in runtimes.items()}
            return "ok", answer
        except MedfedError as exc:
            return "error", exc
        except BaseException as exc:  # an unexpected failure still reaches the coordinator, named
            return "error", RuntimeError(f"{type(exc).__name__}: {exc}")


class GroupedExecutor:
    """The coordinator's side over workers numbered 0..n-1; subclasses implement ``_ask``
    (send each worker its request, return its answers by worker) and ``close``."""

    def __init__(self, sites: Sequence[LocalData], groups: Sequence[Sequence[LocalData]],
                 faults: Faults | None) -> None:
        self.sites = tuple(d.name for d in sites)
        self.faults = faults or Faults()
        self._workers = len(groups)
        self._owner = {d.name: w for w, group in enumerate(groups) for d in group}

    def _ask(self, request: str, per_worker: Mapping[int, Any]) -> dict[int, Any]:
        raise NotImplementedError

    def _everyone(self, request: str) -> dict[str, Any]:
        merged = {}
        for answer in self._ask(request, {w: None for w in range(self._workers)}).values():
            merged.update(answer)
        return {site: merged[site] for site in self.sites}

    def _by_worker(self, names) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for site in names:
            out.setdefault(self._owner[site], []).append(site)
        return out

    def setup(self) -> dict[str, SiteSetup]:
        return self._everyone("setup")

    def train(self, plan: RoundPlan) -> dict[str, Upload | str]:
        dropped = {site: self.faults.dropped(site, plan.round) for site in plan.cohort}
        asked = self._by_worker(s for s in plan.cohort if dropped[s] is None)
        merged = {}
        for answer in self._ask("train", {w: (plan, names) for w, names in asked.items()}).values():
            merged.update(answer)
        return {site: dropped[site] or merged[site] for site in plan.cohort}  # cohort order

    def stage(self, name: str, round_: int, messages: Mapping[str, Any]) -> dict[str, Any]:
        dropped = {site: self.faults.dropped(site, round_, name) for site in messages}
        asked = self._by_worker(s for s in messages if dropped[s] is None)
        per = {w: (name, round_, {s: messages[s] for s in names}) for w, names in asked.items()}
        merged = {}
        for answer in self._ask("stage", per).values():
            merged.update(answer)
        return {site: dropped[site] or merged[site] for site in messages}

    def commit(self, round_: int, decisions: Mapping[str, bool]) -> None:
        per = {w: (round_, {s: decisions[s] for s in names}) for w, names in self._by_worker(decisions).items()}
        self._ask("commit", per)

    def personalize(self, plan: RoundPlan) -> dict[str, Params]:
        merged = {}
        asked = self._by_worker(plan.cohort)
        for answer in self._ask("personalize", {w: (plan, names) for w, names in asked.items()}).values():
            merged.update(answer)
        return {site: merged[site] for site in plan.cohort}

    def site_states(self) -> dict[str, Any]:
        return self._everyone("states")

    def close(self) -> None:
        raise NotImplementedError
