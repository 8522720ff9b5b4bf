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
from medfed.engine.executors.groups import GroupedExecutor, SiteGroup, reply_of, site_groups
from medfed.engine.faults import Faults
from medfed.engine.protocol import SiteProgram
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


def _serve(conn, parent: int, group: SiteGroup) -> None:
    """A worker's loop: answer the coordinator's requests for the sites it owns."""
    exit_with_parent(parent)
    while True:
        request, args = conn.recv()
        if request == "close":
            conn.close()
            return
        conn.send(group.answer(request, args))


class ProcessExecutor(GroupedExecutor):
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
        groups = site_groups(sites, workers)
        super().__init__(sites, groups, faults)
        self._conns = []
        self._procs = []
        for w, group in enumerate(groups):
            parent_end, child_end = ctx.Pipe()
            runtimes = SiteGroup.of(program, group, rng, state_dir)
            proc = ctx.Process(target=_serve, args=(child_end, os.getpid(), runtimes), name=f"medfed-site-{w}")
            proc.start()
            child_end.close()
            self._conns.append(parent_end)
            self._procs.append(proc)

    def _ask(self, request: str, per_worker: Mapping[int, Any]) -> dict[int, Any]:
        for w, args in per_worker.items():
            self._conns[w].send((request, args))
        return {w: reply_of(self._conns[w].recv()) for w in per_worker}

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
