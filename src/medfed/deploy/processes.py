"""Start, watch and stop Flower's SuperLink and SuperNodes, and drive a run from medfed's code.

Every process gets ``FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1``, Flower's command
folder on PATH (the SuperLink and SuperNode start ``flower-superexec``, ``flwr-serverapp``
and ``flwr-clientapp`` by name), this medfed on PYTHONPATH, its own FLWR_HOME and a log file.
Runs are started over the Control API with a FAB built in memory (:class:`FlowerApp`) and
awaited by reading the run's status, never ``flwr run``'s exit code (0 even for a failed run).

What Flower 1.42 allows for latency (read in its sources, measured on this 2-core machine
shared with other jobs, loopback, TLS and node authentication on, 3 sites; the numbers
of ``benchmarks/bench_flower_floor.py``):

- One port per SuperLink: its Fleet, Control and Runtime APIs are all HTTPS on ``--host/--port``
  (FastAPI/uvicorn; the old gRPC ports are gone). Each SuperNode serves its own Runtime API
  (ClientApp I/O, plain HTTP) on its ``--port``.
- Server side, ``grid.send_and_receive`` sleeps 3 s between pulls. The Grid's
  ``push_messages``/``pull_messages`` let the ServerApp choose: :class:`medfed.deploy.link.FlowerLink`
  pulls every 0.05 s.
- SuperNode: its loop sleeps a fixed 3 s whenever a pull finds no message (no flag, no
  variable); after each reply it pulls at once, finds nothing (the server has not
  aggregated yet) and sleeps 3 s, so at stock sites every round waits ~3 s whatever the
  server polls. It looks for the ClientApp's reply every 0.5 s. Its heartbeat is every 30 s
  (a node is marked offline after 2 missed, ~60 s), fixed.
- SuperExec (inside the SuperLink and each SuperNode) looks for new tasks every 1 s;
  ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` sets it (0.01-60 s): ``task_poll_s`` here.
- Isolation: ``--isolation subprocess`` (default) starts a new ``flwr-clientapp`` process
  per message, i.e. per site per round: importing Flower, numpy and the app alone takes
  1.3-1.45 s of wall time here, more when 3 sites start at once on 2 cores. Flower's warm
  executors exist only for Kubernetes and only for agent/model/connector tasks, so stock
  Flower cannot avoid it. ``--isolation process`` leaves the tasks to any executor polling
  the SuperNode's Runtime API: medfed's :mod:`medfed.deploy.clientapp_worker` keeps one
  process and runs medfed's ClientApp in it (``worker=True``).
- A message's objects travel after its header; a reader that sees the header first waits
  1 s before retrying (then 2, 4 s). Polling fast makes that likely, so the fast options
  retry after the poll interval (:mod:`medfed.deploy.flower_patches`).
- Cost of the fast options: a site with ``node_poll_s=0.1`` and the worker uses ~5 % of a
  core while idle (vs 0.6 % stock), and the SuperLink ~8 % serving one such site.
- Measured by the benchmark (3 sites, bare FedAvg of 100 floats, medians of 2 runs):

      sites  server                   s/round  round 1 after  CPU s/  RSS/PSS MiB, largest
                                               run start, s   round   SuperLink / SuperNode tree
      stock  Flower send_and_receive  6.10     8.2-8.8        4.0     389/290 / 384/284
      stock  medfed FlowerLink        5.09     10.8-11.2      6.0     391/292 / 383/282
      fast   bare Grid loop, 0.05 s   0.43     1.5-1.7        0.7     392-440 / 229/162
      fast   medfed FlowerLink        0.45     1.9-2.0        0.7     392-443 / 229/162

  Bringing the deployment up (SuperLink launched to every SuperNode online) takes 3.5-3.7 s.
  medfed's own work per round (its wall time outside Grid calls and waits) is 0.55 ms on
  fast sites, 0.12 % of the round; per interleaved pair medfed / bare Grid loop is x1.03-1.04
  (range 0.94-1.11, the phase of the 0.1 s polls). medfed's run start-up is longer because it
  first asks every node which site it is (one more message per site; at stock sites that is
  one more 3 s SuperNode cycle).
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from medfed.deploy.certs import SITE_NAME, CertSet
from medfed.errors import ConfigError, MedfedError

FLOWER_MIN = (1, 42)
LOOPBACK = "127.0.0.1"
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
# the SuperExec inside each SuperLink/SuperNode reads this to poll for new tasks (Flower: 1 s)
TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
SERVER_APP = "medfed.deploy.flower_app:server_app"
CLIENT_APP = "medfed.deploy.flower_app:client_app"
APP_NAME = "medfed-deploy"
ConfigValue = str | int | float | bool


class DeployError(MedfedError):
    """A Flower process did not start, stopped early, or a run could not be driven."""


def require_flower() -> str:
    """Flower's version, or one ConfigError saying how to install it."""
    try:
        import flwr
    except ImportError:
        raise ConfigError("medfed deploy needs Flower: pip install 'medfed[deploy]' (flwr>=1.42)") from None
    version = getattr(flwr, "__version__", "0")
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < FLOWER_MIN:
        raise ConfigError(f"medfed deploy needs flwr>=1.42, found {version}: pip install -U 'medfed[deploy]'")
    return version


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port free on ``host`` now (the OS picks it; a race with another program is possible)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _flower_bin() -> Path:
    """The folder of Flower's commands: the SuperLink and SuperNode start ``flower-superexec``,
    ``flwr-serverapp`` and ``flwr-clientapp`` by name, so that folder must be on their PATH."""
    here = Path(sys.executable).parent
    if (here / "flower-superexec").exists():
        return here
    import shutil

    found = shutil.which("flower-superexec")
    if found is None:
        raise ConfigError("Flower's commands (flower-superexec) are not installed next to this Python "
                          f"({sys.executable}) nor on PATH: pip install 'medfed[deploy]'")
    return Path(found).parent


def flower_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a Flower process: no telemetry or update check, Flower's commands on
    PATH, this medfed importable (the ServerApp and ClientApp import it), its own FLWR_HOME."""
    import medfed

    env = dict(os.environ)
    env.update(FLOWER_ENV)
    env["PATH"] = os.pathsep.join([str(_flower_bin()), env.get("PATH", "")])
    root = str(Path(medfed.__file__).resolve().parents[1])
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths and Path(root).name != "site-packages":
        env["PYTHONPATH"] = os.pathsep.join([root, *paths])
    env["FLWR_HOME"] = str(home)
    env.update(extra or {})
    return env


# -- processes ---------------------------------------------------------------------------


class _Stat(NamedTuple):
    ppid: int
    pgrp: int
    start: int  # clock ticks after boot: tells a process from a later one given the same PID
    state: str


def _proc_stat(pid: int) -> _Stat | None:
    """A process's parent, group, start time and state from /proc; None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text.rpartition(")")[2].split()  # the command name may hold spaces and parentheses
    return _Stat(int(fields[1]), int(fields[2]), int(fields[19]), fields[0])


def _all_stats() -> dict[int, _Stat]:
    stats = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) is not None:
            stats[int(entry.name)] = stat
    return stats


def _rss_kib(pid: int, key: str) -> int:
    """``VmRSS`` from /proc/PID/status, or ``Pss`` from /proc/PID/smaps_rollup, in KiB."""
    name = "status" if key == "VmRSS" else "smaps_rollup"
    try:
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def _terminate_with_parent() -> None:
    """In the child before it runs Flower: SIGTERM it when medfed dies, even by SIGKILL, so a
    killed ``medfed deploy server`` frees its port for ``--resume`` (Linux; elsewhere a no-op)."""
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


class FlowerProcess:
    """One Flower command started by medfed, with its log file and its process tree.

    Flower's SuperLink starts its SuperExec in a new session, so the process group alone does
    not hold everything it started: stopping walks the tree of descendants (by PID, checked by
    start time against reuse) as well as the group.
    """

    def __init__(self, name: str, args: Sequence[str], log_path: Path, env: Mapping[str, str], cwd: Path) -> None:
        self.name = name
        self.args = list(args)
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.started_at = time.time()
        with open(self.log_path, "ab") as log:
            # a new session: a signal meant for medfed (Ctrl-C) is not also delivered to Flower,
            # which medfed stops in order itself
            self.popen = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=dict(env), cwd=cwd, start_new_session=True,
                                          preexec_fn=_terminate_with_parent)
        self.pid = self.popen.pid

    def __repr__(self) -> str:
        return f"FlowerProcess({self.name!r}, pid={self.pid}, log={str(self.log_path)!r})"

    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def tree(self) -> list[tuple[int, int]]:
        """(pid, start time) of every live process this one started: its descendants, and the
        members of its process group, which outlive it (a SuperNode the SuperLink refused
        exits at once; its SuperExec, orphaned, takes up to a minute to notice)."""
        stats = _all_stats()
        children: dict[int, list[int]] = {}
        for pid, stat in stats.items():
            children.setdefault(stat.ppid, []).append(pid)
        roots = [self.pid] if self.alive() else []
        roots += [pid for pid, stat in stats.items() if stat.pgrp == self.pid and pid != self.pid]
        out, seen = [], set()
        while roots:
            pid = roots.pop()
            stat = stats.get(pid)
            if pid in seen or stat is None or stat.state == "Z":
                continue
            seen.add(pid)
            out.append((pid, stat.start))
            roots.extend(children.get(pid, []))
        return out

    def memory_mib(self) -> dict[str, float]:
        """Resident memory of the process tree now: RSS summed (counts shared pages once per
        process) and PSS summed (shares them out), in MiB, with the number of processes."""
        tree = self.tree()
        return {"processes": len(tree),
                "rss_mib": sum(_rss_kib(pid, "VmRSS") for pid, _ in tree) / 1024,
                "pss_mib": sum(_rss_kib(pid, "Pss") for pid, _ in tree) / 1024}

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM the tree (Flower shuts down in order: a SuperNode deactivates itself), wait
        up to ``timeout_s``, SIGKILL whatever is left; the exit status of the process."""
        tree = self.tree()
        self._signal(tree, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and (self.alive() or self._survivors(tree)):
            time.sleep(0.05)
        if self.alive() or self._survivors(tree):
            self._signal(self._survivors(tree), signal.SIGKILL)
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        return self.popen.poll()

    def _signal(self, tree: list[tuple[int, int]], sig: int) -> None:
        try:
            # the group medfed made for it (start_new_session): Linux reuses no PID that is
            # still a group's id, so this reaches only what the process started
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for pid, start in tree:  # descendants in sessions of their own: the SuperLink's SuperExec
            stat = _proc_stat(pid)
            if stat is not None and stat.start == start:  # the same process, not a reused PID
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass

    @staticmethod
    def _survivors(tree: list[tuple[int, int]]) -> list[tuple[int, int]]:
        left = []
        for pid, start in tree:
            stat = _proc_stat(pid)
            if stat is not None and stat.start == start and stat.state != "Z":
                left.append((pid, start))
        return left


def stop_all(processes: Iterable[FlowerProcess | SuperLink | None], timeout_s: float = 10.0) -> None:
    """Stop every process given, last started first (SuperNodes before their SuperLink)."""
    for proc in reversed([p for p in processes if p is not None]):
        proc.stop(timeout_s)


# -- the Flower app ----------------------------------------------------------------------


@dataclass(frozen=True)
class FlowerApp:
    """A Flower app built in memory into a FAB: the ``[tool.flwr.app.components]`` it names,
    its run config (``[tool.flwr.app.config]``) and any extra files shipped in the FAB (a
    module there is importable by the ServerApp and ClientApp)."""

    config: Mapping[str, ConfigValue] = field(default_factory=dict)
    serverapp: str = SERVER_APP
    clientapp: str = CLIENT_APP
    files: Mapping[str, bytes] = field(default_factory=dict)
    name: str = APP_NAME

    def pyproject(self) -> bytes:
        import tomli_w

        import medfed

        bad = [k for k, v in self.config.items() if not isinstance(v, (str, int, float, bool))]
        if bad:
            raise ConfigError(f"run config values must be str, int, float or bool; {', '.join(bad)} are not")
        doc = {
            "project": {"name": self.name, "version": medfed.__version__, "license": "MIT",
                        "description": "medfed's ServerApp and ClientApp on Flower's deployment runtime",
                        "dependencies": [f"flwr>={FLOWER_MIN[0]}.{FLOWER_MIN[1]}"]},
            "tool": {"flwr": {"app": {"publisher": "medfed",
                                      "components": {"serverapp": self.serverapp, "clientapp": self.clientapp},
                                      "config": dict(self.config)}}},
        }
        return tomli_w.dumps(doc).encode()

    def fab(self) -> bytes:
        import warnings

        from flwr.cli.build import build_fab_from_files

        with warnings.catch_warnings():
            # Flower 1.42's file filter uses a pattern class pathspec deprecated; nothing to act on here
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="pathspec")
            return build_fab_from_files({"pyproject.toml": self.pyproject(), **self.files})[0]


# -- the SuperLink -----------------------------------------------------------------------


@dataclass(frozen=True)
class RunStatus:
    """A run's status as the SuperLink reports it (``status`` is ``pending``, ``starting``,
    ``running`` or ``finished``; a finished run's ``sub_status`` is ``completed``, ``failed``
    or ``stopped``). ``timed_out``: medfed stopped the run after waiting too long."""

    run_id: int
    status: str
    sub_status: str = ""
    details: str = ""
    timed_out: bool = False
    log: Path | None = None

    @property
    def ok(self) -> bool:
        return self.status == "finished" and self.sub_status == "completed"

    def __str__(self) -> str:
        text = f"run {self.run_id}: {self.status}" + (f"/{self.sub_status}" if self.sub_status else "")
        text += f" ({self.details})" if self.details else ""
        text += " after medfed's timeout" if self.timed_out else ""
        return text + (f"; ServerApp log: {self.log}" if self.log else "")


class SuperLink:
    """A SuperLink started by medfed: its process, its address, and a Control API client that
    registers sites' keys and starts, watches and stops runs (``flwr run`` exits 0 even when
    the run failed, so medfed reads the status itself)."""

    def __init__(self, process: FlowerProcess, address: str, certs: CertSet) -> None:
        self.process = process
        self.address = address
        self.certs = certs
        self._control = None

    def __repr__(self) -> str:
        return f"SuperLink({self.address}, pid={self.process.pid})"

    @property
    def control(self):
        if self._control is None:
            from flwr.supercore.control import ControlHttpClient
            from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

            self._control = ControlHttpClient.from_server_address(
                self.address, False, self.certs.ca_cert.read_bytes(),
                interceptors=[RuntimeVersionHttpInterceptor(component_name="medfed")])
        return self._control

    def register(self, public_keys: Mapping[str, Path]) -> dict[str, int]:
        """Register each site's public key (OpenSSH, what ``flwr supernode register`` reads);
        the node id Flower gives each site. Only registered nodes may connect."""
        from cryptography.exceptions import UnsupportedAlgorithm
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from flwr.proto.control_pb2 import RegisterNodeRequest
        from flwr.supercore.primitives.asymmetric import public_key_to_bytes

        ids = {}
        for site, path in public_keys.items():
            try:
                key = serialization.load_ssh_public_key(Path(path).read_bytes())
            except (OSError, ValueError, UnsupportedAlgorithm) as exc:
                raise ConfigError(f"public key of site {site!r} ({path}) is not readable as an OpenSSH key: {exc}") from None
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise ConfigError(f"public key of site {site!r} ({path}) is not an elliptic-curve key")
            response = self.control.RegisterNode(RegisterNodeRequest(public_key=public_key_to_bytes(key), name=site))
            if not response.node_id:
                raise DeployError(f"the SuperLink at {self.address} did not register site {site!r}")
            ids[site] = int(response.node_id)
        return ids

    def nodes(self) -> dict[int, dict[str, str]]:
        """node id -> {name, status} as the SuperLink lists them (status: registered, online, ...)."""
        from flwr.proto.control_pb2 import ListNodesRequest

        return {int(n.node_id): {"name": n.name, "status": n.status}
                for n in self.control.ListNodes(ListNodesRequest()).nodes_info}

    def wait_online(self, node_ids: Iterable[int], timeout_s: float, poll_s: float = 0.1) -> set[int]:
        """Wait until every node given is online or ``timeout_s`` passed; the ones online."""
        wanted = set(node_ids)
        deadline = time.monotonic() + timeout_s
        while True:
            online = {i for i, n in self.nodes().items() if n["status"] == "online"} & wanted
            if online == wanted or time.monotonic() >= deadline:
                return online
            time.sleep(poll_s)

    def start_run(self, app: FlowerApp) -> int:
        """Start a run of ``app`` (built into a FAB here) and return its run id."""
        from flwr.common.serde import fab_to_proto, user_config_to_proto
        from flwr.proto.control_pb2 import StartRunRequest
        from flwr.supercore.fab import Fab

        fab = app.fab()
        request = StartRunRequest(fab=fab_to_proto(Fab(hashlib.sha256(fab).hexdigest(), fab, {})),
                                  override_config=user_config_to_proto({}), federation="")
        response = self.control.StartRun(request)
        if not response.HasField("run_id"):
            raise DeployError(f"the SuperLink at {self.address} did not start the run"
                              + (f": {response.note}" if response.HasField("note") else ""))
        return int(response.run_id)

    def run_status(self, run_id: int) -> RunStatus:
        from flwr.proto.control_pb2 import ListRunsRequest

        runs = self.control.ListRuns(ListRunsRequest(run_id=run_id)).run_dict
        if run_id not in runs:
            raise DeployError(f"the SuperLink at {self.address} has no run {run_id}")
        status = runs[run_id].status
        return RunStatus(run_id, status.status, status.sub_status, status.details)

    def stop_run(self, run_id: int) -> None:
        from flwr.proto.control_pb2 import StopRunRequest

        self.control.StopRun(StopRunRequest(run_id=run_id))

    def save_run_log(self, run_id: int) -> Path | None:
        """Write the run's ServerApp log, which Flower keeps at the SuperLink (the ServerApp's
        own output goes nowhere), next to the SuperLink's log; its path, or None if the
        SuperLink gave none."""
        from flwr.proto.control_pb2 import StreamLogsRequest

        try:
            text = "".join(r.log_output for r in self.control.StreamLogs(StreamLogsRequest(run_id=run_id)))
        except Exception:  # noqa: BLE001 - a log that cannot be fetched must not hide the run's status
            return None
        path = self.process.log_path.parent / f"run-{run_id}.log"
        path.write_text(text)
        return path

    def wait_run(self, run_id: int, timeout_s: float, poll_s: float = 0.5) -> RunStatus:
        """The run's final status, its ServerApp log saved; a run still going after
        ``timeout_s`` is stopped (and its status returned with ``timed_out``). A SuperLink
        that died ends the wait at once."""
        deadline = time.monotonic() + timeout_s
        timed_out = False
        while True:
            if not self.process.alive():
                return RunStatus(run_id, "unknown", details=f"the SuperLink exited with status "
                                 f"{self.process.returncode}; see {self.process.log_path}")
            status = self.run_status(run_id)
            if status.status == "finished":
                break
            if time.monotonic() >= deadline:
                timed_out = True
                self.stop_run(run_id)
                end = time.monotonic() + 10
                while (status := self.run_status(run_id)).status != "finished" and time.monotonic() < end:
                    time.sleep(poll_s)
                break
            time.sleep(poll_s)
        return RunStatus(run_id, status.status, status.sub_status, status.details, timed_out=timed_out,
                         log=self.save_run_log(run_id))

    def stop(self, timeout_s: float = 10.0) -> int | None:
        if self._control is not None:
            self._control.close()
            self._control = None
        return self.process.stop(timeout_s)


def _wait_ready(process: FlowerProcess, url: str, ca: Path, timeout_s: float) -> None:
    """Wait until ``url`` answers over TLS (the CA checked); a DeployError with the end of the
    log when the process exits first or the time runs out."""
    import ssl

    import httpx

    verify = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not process.alive():
            raise DeployError(f"{process.name} exited with status {process.returncode} before it was ready; "
                              f"end of {process.log_path}:\n{process.log_tail()}")
        try:
            if httpx.get(url, verify=verify, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.stop()
    raise DeployError(f"{process.name} was not ready after {timeout_s:g} s; end of {process.log_path}:\n{process.log_tail()}")


def start_superlink(certs: CertSet, workdir: Path, *, port: int, host: str = LOOPBACK,
                    task_poll_s: float | None = None, ready_timeout_s: float = 30.0,
                    env: Mapping[str, str] | None = None) -> SuperLink:
    """A SuperLink serving its Fleet, Control and Runtime APIs on ``host:port`` over TLS with
    the certificate folder's server certificate, SuperNode authentication on, and no
    dependency installation per run (it would run ``uv sync``, which fails offline). Its log
    (and its ServerApps') goes to ``workdir/superlink.log``. Returns once it answers."""
    require_flower()
    for path, what in ((certs.server_cert, "server certificate"), (certs.server_key, "server key")):
        if not path.is_file():
            raise ConfigError(f"--certs {certs.folder} lacks the {what} {path.name}")
    workdir = Path(workdir).absolute()
    extra = dict(env or {})
    if task_poll_s is not None:
        extra[TASK_POLL_ENV] = f"{task_poll_s:g}"
    args = ["flower-superlink", "--ssl-ca-certfile", str(certs.ca_cert), "--ssl-certfile", str(certs.server_cert),
            "--ssl-keyfile", str(certs.server_key), "--enable-supernode-auth",
            "--disable-runtime-dependency-installation", "--host", host, "--port", str(port)]
    process = FlowerProcess("superlink", args, workdir / "superlink.log",
                            flower_env(workdir / "superlink-home", extra), cwd=workdir)
    address = f"{host}:{port}"
    _wait_ready(process, f"https://{address}/health", certs.ca_cert, ready_timeout_s)
    return SuperLink(process, address, certs)


def _node_config(values: Mapping[str, str]) -> str:
    """``--node-config``'s ``key="value" ...`` (each value a quoted TOML string)."""
    import json

    bad = [k for k, v in values.items() if '"' in str(v) or "\\" in str(v)]
    if bad:
        raise ConfigError(f"node config {bad[0]}={values[bad[0]]!r}: quotes and backslashes cannot be passed to Flower")
    return " ".join(f"{k}={json.dumps(str(v))}" for k, v in values.items())


def start_supernode(site: str, certs: CertSet, superlink: str, workdir: Path, *, port: int, host: str = LOOPBACK,
                    task_poll_s: float | None = None, node_poll_s: float | None = None, worker: bool = False,
                    env: Mapping[str, str] | None = None, node_config: Mapping[str, str] | None = None) -> FlowerProcess:
    """A SuperNode for ``site`` connecting to ``superlink`` (host:port) over TLS (the CA
    checks the SuperLink), authenticated with the site's private key, telling its ClientApp
    ``site`` through ``--node-config``, serving its own Runtime API (ClientApp I/O) on
    ``host:port``. Its log goes to ``workdir/supernode-SITE.log``. Returns at once: an
    unregistered node is refused by the SuperLink and exits.

    Stock Flower unless asked: ``task_poll_s`` sets how often its SuperExec looks for work
    (Flower: 1 s); ``node_poll_s`` caps the SuperNode's own 3 s wait between pulls and
    ``worker`` runs medfed's long-lived ClientApp process instead of one per message, both
    through :mod:`medfed.deploy.node_main` (see this module's notes for what each saves).
    ``node_config`` adds to what the ClientApp reads (a study's site: ``data``, ``folder``).
    """
    require_flower()
    if not SITE_NAME.fullmatch(site):
        raise ConfigError(f"--name {site!r} is not a site name (1-63 letters, digits, '.', '_' or '-')")
    key = certs.site(site).private_key
    if not key.is_file():
        raise ConfigError(f"--certs {certs.folder} lacks {key.name}, the private key of site {site!r}")
    workdir = Path(workdir).absolute()
    extra = dict(env or {})
    if task_poll_s is not None:
        extra[TASK_POLL_ENV] = f"{task_poll_s:g}"
    args = ["--superlink", superlink, "--root-certificates", str(certs.ca_cert),
            "--auth-supernode-private-key", str(key), "--node-config", _node_config({"site": site, **(node_config or {})}),
            "--host", host, "--port", str(port)]
    if node_poll_s is None and not worker:
        args = ["flower-supernode", *args]
    else:
        args = [sys.executable, "-m", "medfed.deploy.node_main", *args]
        args += ["--medfed-poll-s", f"{node_poll_s:g}"] if node_poll_s is not None else []
        args += ["--medfed-worker", "--isolation", "process"] if worker else []
    return FlowerProcess(f"supernode-{site}", args, workdir / f"supernode-{site}.log",
                         flower_env(workdir / f"supernode-{site}-home", extra), cwd=workdir)
