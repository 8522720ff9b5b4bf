"""medfed on Flower's deployment runtime, for real: a SuperLink and SuperNodes as separate
processes on 127.0.0.1 with TLS and node authentication, driven from medfed's code.

One deployment serves the file: sites a and b registered (a a stock SuperNode, b with
medfed's short poll and long-lived ClientApp worker, so both paths run), site c holding keys
the SuperLink was never told about. Every port is picked free, every process is stopped by
PID when the module ends, and the whole module runs under a hard time limit.
"""

import json
import os
import signal
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("flwr", minversion="1.42")

from medfed.deploy import echo as echo_site
from medfed.deploy.certs import make_certs
from medfed.deploy.processes import FlowerApp, free_port, start_superlink, start_supernode, stop_all

MODULE_LIMIT_S = 150  # the file takes ~25 s on an idle 2-core machine


class HardTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise HardTimeout(f"tests/test_deploy_flower.py ran past {MODULE_LIMIT_S} s")


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    work = tmp_path_factory.mktemp("deploy")
    certs = make_certs(work / "certs", ["a", "b", "c"])
    before = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(MODULE_LIMIT_S)
    started = []
    try:
        link = start_superlink(certs, work, port=free_port())
        started.append(link)
        ids = link.register({s: certs.site(s).public_key for s in ("a", "b")})
        nodes = {
            "a": start_supernode("a", certs, link.address, work, port=free_port()),
            "b": start_supernode("b", certs, link.address, work, port=free_port(), task_poll_s=0.1,
                                 node_poll_s=0.1, worker=True),
            "c": start_supernode("c", certs, link.address, work, port=free_port()),
        }
        started += nodes.values()
        assert link.wait_online(ids.values(), timeout_s=30) == set(ids.values()), link.process.log_tail()
        yield SimpleNamespace(work=work, certs=certs, link=link, ids=ids, nodes=nodes)
    finally:
        stop_all(started, timeout_s=10)
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)
    groups = {getattr(p, "process", p).pid for p in started}
    left = _live_processes(lambda pgrp, cmdline: pgrp in groups or str(work).encode() in cmdline)
    assert not left, f"processes still running after stop_all: {left}"


def _live_processes(match) -> list[int]:
    """Live processes whose (process group, command line) ``match``: found from /proc, not
    from medfed's own bookkeeping, so that a process medfed lost track of is found too."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = open(f"/proc/{entry.name}/stat").read().rpartition(")")[2].split()
            cmdline = open(f"/proc/{entry.name}/cmdline", "rb").read()
        except OSError:
            continue
        if fields[0] != "Z" and match(int(fields[2]), cmdline):
            found.append(int(entry.name))
    return found


def test_two_registered_sites_run_echo_fedavg_with_the_right_average(federation):
    out = federation.work / "out"
    app = FlowerApp({"program": "echo", "out": str(out), "sites": "a,b", "rounds": 2, "round-timeout-s": 40, "poll-s": 0.05})
    run_id = federation.link.start_run(app)
    status = federation.link.wait_run(run_id, timeout_s=90)
    assert status.ok, f"{status}\n{status.log.read_text() if status.log else ''}"
    record = json.loads((out / "echo.json").read_text())
    # the nodes said which site they are; Flower gave those node ids at registration
    assert record["sites"] == federation.ids
    assert [r["missing"] for r in record["rounds"]] == [{}, {}]
    assert [r["answered"] for r in record["rounds"]] == [["a", "b"], ["a", "b"]]
    # each site moves half-way to its target, the server averages: (1 - 0.5**2) * mean target
    expected = 0.75 * (echo_site.target("a") + echo_site.target("b")) / 2
    np.testing.assert_allclose(record["vector"], expected, rtol=0, atol=1e-12)
    # a ran Flower's ClientApp process per message, b medfed's worker
    assert "Start `flwr-clientapp` process" in federation.nodes["a"].log_text()
    assert "medfed-worker: ClientApp answered train.medfed_exchange" in federation.nodes["b"].log_text()
    assert f"site 'b' is node {federation.ids['b']}" in status.log.read_text()


def test_a_failed_run_is_reported_failed_with_the_serverapps_log(federation):
    """``flwr run`` exits 0 here; medfed reads the status and keeps the ServerApp's log."""
    run_id = federation.link.start_run(FlowerApp({"program": "echo", "out": str(federation.work / "bad"), "sites": ""}))
    status = federation.link.wait_run(run_id, timeout_s=60)
    assert (status.status, status.sub_status) == ("finished", "failed")
    assert "run config 'sites' names no site" in status.details
    assert "ConfigError: run config 'sites' names no site" in status.log.read_text()


def test_unregistered_site_is_refused_and_the_refusal_is_logged(federation):
    intruder = federation.nodes["c"]
    assert intruder.popen.wait(timeout=30) != 0
    assert "Failed to activate SuperNode" in intruder.log_text()
    assert "No SuperNode found with the given public key" in federation.link.process.log_text()
    assert set(federation.link.nodes()) == set(federation.ids.values())


def test_a_superlink_that_cannot_start_is_one_error_with_its_log(tmp_path):
    """Its server key missing: refused before any process starts."""
    from medfed.errors import ConfigError

    certs = make_certs(tmp_path / "certs", ["a"])
    certs.server_key.unlink()
    with pytest.raises(ConfigError, match="lacks the server key server.key"):
        start_superlink(certs, tmp_path, port=free_port())
