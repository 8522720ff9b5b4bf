"""What each party of a deployed study runs: the coordinator's SuperLink and run, a site's
SuperNode (restarted with backoff when it stops), and the study's status.

- :func:`serve_study` (``medfed deploy server``): checks the study, starts a SuperLink on
  ``--address`` with TLS and SuperNode authentication, registers the public key of every
  site in ``[deploy] sites`` (no other node may connect), starts medfed's Flower app on it
  and waits for the run's end, reading its status (never ``flwr run``'s exit code).
- :func:`run_site` (``medfed deploy site``): starts the site's SuperNode, authenticated with
  the site's private key, telling its ClientApp the site's name, data file and folder; when
  the SuperNode exits (the SuperLink restarted, the network went away, the node was refused)
  it is started again after 1, 2, 4 … 30 s, until the site is stopped.
- :func:`study_status` (``medfed deploy status``): the coordinator's ``status.json``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medfed.deploy.coordinator import STATUS_FILE, check_resume
from medfed.errors import ConfigError

# sites answer fast when their SuperNode polls the SuperLink often and one ClientApp process
# serves every message (medfed.deploy.processes explains both; ``fast=False`` is stock Flower)
FAST_SITE = {"task_poll_s": 0.1, "node_poll_s": 0.1, "worker": True}
POLL_S = 0.05  # how often the coordinator pulls the sites' replies


def parse_address(address: str, flag: str = "--address") -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{flag} {address!r}: give HOST:PORT, e.g. 127.0.0.1:9092")
    return host, int(port)


def serve_study(study: Path, certs: Path, address: str, out: Path, *, resume: bool = False,
                command: str | None = None, timeout_s: float = 7 * 24 * 3600.0,
                log: Callable[[str], None] = print):
    """Run ``study`` as the coordinator; the run's final :class:`~medfed.deploy.processes.RunStatus`."""
    from medfed.deploy.certs import read_certs
    from medfed.deploy.processes import FlowerApp, start_superlink
    from medfed.deploy.study import load_study

    study, out = Path(study).absolute(), Path(out).absolute()
    config = load_study(study)  # refuse a bad study before anything starts
    host, port = parse_address(address)
    keys = read_certs(Path(certs))
    absent = [s for s in config.deploy.sites if s not in keys.sites]
    if absent:
        raise ConfigError(f"--certs {certs} has no keys for site(s) {', '.join(absent)} of [deploy] sites; "
                          f"make them with `medfed deploy certs --sites {','.join(config.deploy.sites)}`")
    check_resume(out, resume)
    out.mkdir(parents=True, exist_ok=True)
    superlink = start_superlink(keys, out / "flower", port=port, host=host, task_poll_s=FAST_SITE["task_poll_s"])
    try:
        ids = superlink.register({s: keys.site(s).public_key for s in config.deploy.sites})
        log(f"SuperLink on {host}:{port} (TLS, node authentication); registered {', '.join(ids)}")
        app = FlowerApp({"program": "study", "study": str(study), "out": str(out), "resume": bool(resume),
                         "poll-s": POLL_S, "join-timeout-s": float(config.deploy.join_timeout_s),
                         "command": command or ""})
        run_id = superlink.start_run(app)
        log(f"run {run_id} started; waiting for the sites")
        return superlink.wait_run(run_id, timeout_s)
    finally:
        superlink.stop()


def run_site(name: str, data: Path, server: str, certs: Path, folder: Path, *, port: int | None = None,
             fast: bool = True, stop: threading.Event | None = None, log: Callable[[str], None] = print,
             max_backoff_s: float = 30.0) -> None:
    """Serve site ``name`` until ``stop`` is set: its SuperNode, restarted with backoff."""
    from medfed.deploy.certs import read_certs
    from medfed.deploy.processes import free_port, start_supernode

    parse_address(server, "--server")
    keys = read_certs(Path(certs))
    if name not in keys.sites:
        raise ConfigError(f"--certs {certs} holds no key of site {name!r} (it has {', '.join(keys.sites)})")
    data, folder = Path(data).absolute(), Path(folder).absolute()
    if not data.is_file():
        raise ConfigError(f"--data {data}: no such file")
    stop = stop or threading.Event()
    host = "127.0.0.1"
    backoff = 1.0
    while not stop.is_set():
        node = start_supernode(name, keys, server, folder / "flower", port=port or free_port(host), host=host,
                               # workdir: where the study's relative paths (a teacher) resolve at this site
                               node_config={"data": str(data), "folder": str(folder), "workdir": str(Path.cwd())},
                               **(FAST_SITE if fast else {}))
        log(f"site {name}: SuperNode {node.pid} connecting to {server}")
        started = time.monotonic()
        while node.alive() and not stop.wait(0.2):
            pass
        if stop.is_set():
            node.stop()
            return
        if time.monotonic() - started > 60:
            backoff = 1.0  # it ran a while: the next failure starts the backoff afresh
        tail = node.log_tail(3).strip().replace("\n", " | ")
        log(f"site {name}: the SuperNode exited (status {node.returncode}): {tail}; retrying in {backoff:g} s")
        if stop.wait(backoff):
            return
        backoff = min(2 * backoff, max_backoff_s)


def study_status(out: Path) -> dict[str, Any]:
    path = Path(out) / STATUS_FILE
    if not path.is_file():
        raise ConfigError(f"{out} has no {STATUS_FILE}: it is not the output folder of `medfed deploy server`")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} cannot be read: {exc}") from None
