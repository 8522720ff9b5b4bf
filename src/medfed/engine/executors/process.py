"""Sites in worker processes, each worker owning its sites' rows and state, as a deployment
would: the coordinator's process holds neither. Plans and uploads cross a pipe.

Workers are forked (they inherit the method's site program, which holds functions that do
not pickle) and end with the process that started them.
"""

from __future__ import annotations

import os
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


def exit_with_parent(parent: int) -> None:
    """Make this (forked) process end when the process that started it dies. Without it a
    killed ``medfed run`` leaves its workers computing for minutes, holding stdout.

    Linux kills the worker itself (``PR_SET_PDEATHSIG``); elsewhere, and as a fallback, a
    daemon thread polls ``os.getppid()`` (a worker is re-parented when its parent dies)."""
    import contextlib
    import ctypes
    import signal
    import threading
    import time

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the CLI's handler is the parent's business
    with contextlib.suppress(OSError, AttributeError):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)  # the parent died before prctl took effect

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="medfed-parent-watch", daemon=True).start()


def _serve(conn, parent: int, runtimes: dict[str, SiteRuntime]) -> None:
    """A worker's loop: answer the coordinator's requests for the sites it owns."""
    exit_with_parent(parent)
    while True:
        request, args = conn.recv()
        if request == "close":
            conn.close()
            return
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
            conn.send(("ok", answer))
        except MedfedError as exc:
            conn.send(("error", exc))
        except BaseException as exc:  # an unexpected failure still reaches the coordinator, named
            conn.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}")))


class ProcessExecutor:
    def __init__(
        self,
        program: SiteProgram,
        sites: Sequence[LocalData],
        rng: KeyedRng,
        *,
        faults: Faults | None = None,
        state_dir: Path | None = None,
        workers: int | None = None,
    ) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        n = max(1, min(len(sites), workers or len(sites)))
        groups = [list(sites[i::n]) for i in range(n)]
        self.sites = tuple(d.name for d in sites)
        self.faults = faults or Faults()
        self._owner: dict[str, int] = {}
        self._conns = []
        self._procs = []
        for w, group in enumerate(groups):
            parent_end, child_end = ctx.Pipe()
            runtimes = {d.name: SiteRuntime(program, d, rng, state_dir, durable=False) for d in group}
            proc = ctx.Process(target=_serve, args=(child_end, os.getpid(), runtimes), name=f"medfed-site-{w}")
            proc.start()
            child_end.close()
            self._conns.append(parent_end)
            self._procs.append(proc)
            self._owner.update((d.name, w) for d in group)

    def _ask(self, request: str, per_worker: Mapping[int, Any]) -> dict[int, Any]:
        for w, args in per_worker.items():
            self._conns[w].send((request, args))
        answers = {}
        for w in per_worker:
            status, answer = self._conns[w].recv()
            if status == "error":
                raise answer
            answers[w] = answer
        return answers

    def _by_worker(self, names) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for site in names:
            out.setdefault(self._owner[site], []).append(site)
        return out

    def setup(self) -> dict[str, SiteSetup]:
        merged = {}
        for answer in self._ask("setup", {w: None for w in range(len(self._conns))}).values():
            merged.update(answer)
        return {site: merged[site] for site in self.sites}

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
        merged = {}
        for answer in self._ask("states", {w: None for w in range(len(self._conns))}).values():
            merged.update(answer)
        return {site: merged[site] for site in self.sites}

    def close(self) -> None:
        for conn, proc in zip(self._conns, self._procs):
            try:
                conn.send(("close", None))
                conn.close()
            except OSError:
                pass
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self._conns, self._procs = [], []

    def __del__(self) -> None:
        if self._procs:
            self.close()
