"""medfed across hospitals on Flower's runtime, end to end on 127.0.0.1: a coordinator and
three sites as separate processes (`medfed deploy server` / `medfed deploy site`) with TLS
and node authentication.

- parity: 3 rounds of FedAvg and SCAFFOLD on heart-disease sites written to files give the
  simulation's models (to 1e-12) and per-site metrics; an unregistered site is refused;
- the coordinator killed with SIGKILL mid-run and restarted with --resume ends bit-identical;
- a site that dies is missing from the rounds after, named with the reason, and the study ends.

Every process is started here and stopped by its PID in a ``finally``; each wait is bounded.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("flwr", minversion="1.42")

from medfed.data.datasets import load_dataset  # noqa: E402
from medfed.deploy.certs import make_certs  # noqa: E402
from medfed.deploy.processes import free_port  # noqa: E402

SITES = ("Cleveland", "Hungary", "Switzerland")
STUDY = """
methods = {methods}
seed = 5
repeats = 1
[training]
rounds = {rounds}
local_steps = 4
[data]
site_column = "site"
label_column = "target"
impute = "median"
[deploy]
sites = ["Cleveland", "Hungary", "Switzerland"]
round_timeout_s = {timeout}
"""


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """Each site's file, the pooled file for the simulation, and certificates for the three
    sites plus VA, which holds keys but is not in the study."""
    root = tmp_path_factory.mktemp("deploy")
    fed = load_dataset("heart-disease")
    frames = []
    for s in fed.sites:
        df = pd.DataFrame(s.X, columns=list(fed.feature_names))
        df.insert(0, "site", s.name)
        df["target"] = s.y.astype(int)
        df.to_csv(root / f"{s.name}.csv", index=False)
        if s.name in SITES:
            frames.append(df)
    pd.concat(frames).to_csv(root / "all.csv", index=False)
    make_certs(root / "certs", [*SITES, "VA"])
    return root


def _study(kit, name, methods='["fedavg", "scaffold"]', rounds=3, timeout=20):
    path = kit / f"{name}.toml"
    path.write_text(STUDY.format(methods=methods, rounds=rounds, timeout=timeout))
    return path


def _medfed(*args, log):
    return subprocess.Popen([sys.executable, "-m", "medfed.cli.app", *map(str, args)], stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


class Deployment:
    """The processes of one test, stopped by PID at the end whatever happened."""

    def __init__(self, kit, tmp_path):
        self.kit, self.tmp = kit, tmp_path
        self.port = free_port()
        self.procs: list[subprocess.Popen] = []

    def server(self, study, out, *extra):
        log = open(self.tmp / f"server-{len(self.procs)}.log", "wb")
        proc = _medfed("deploy", "server", study, "--certs", self.kit / "certs", "--address",
                       f"127.0.0.1:{self.port}", "--out", out, *extra, log=log)
        self.procs.append(proc)
        return proc

    def site(self, name):
        log = open(self.tmp / f"site-{name}.log", "wb")
        proc = _medfed("deploy", "site", "--name", name, "--data", self.kit / f"{name}.csv", "--server",
                       f"127.0.0.1:{self.port}", "--certs", self.kit / "certs", "--out", self.tmp / f"site-{name}",
                       log=log)
        self.procs.append(proc)
        return proc

    def stop(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


@pytest.fixture
def deployment(kit, tmp_path):
    d = Deployment(kit, tmp_path)
    try:
        yield d
    finally:
        d.stop()


def _wait(proc, timeout_s, what):
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} did not end within {timeout_s} s")


def _until(condition, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout_s} s for {what}")
        time.sleep(0.05)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc), children first found first."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rpartition(")")[2].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _simulate(kit, study, tmp_path):
    from typer.testing import CliRunner

    from medfed.cli.app import app

    out = tmp_path / "simulated"
    result = CliRunner().invoke(app, ["run", str(study), "--data", str(kit / "all.csv"), "--out", str(out),
                                      "--save-model"])
    assert result.exit_code == 0, result.output
    return out


def _same_as_simulation(deployed, simulated, settings=("FedAvg", "SCAFFOLD")):
    a = json.loads((deployed / "results.json").read_text())
    b = json.loads((simulated / "results.json").read_text())
    rows = {(r["setting"], r["test_site"], r["model"]): r["metrics"] for r in b["results"]}
    assert {(r["setting"], r["test_site"], r["model"]): r["metrics"] for r in a["results"]} == rows
    for setting in settings:
        assert a["histories"][setting]["train_loss"] == b["histories"][setting]["train_loss"]
        with np.load(deployed / "models" / f"{setting}.npz") as x, np.load(simulated / "models" / f"{setting}.npz") as y:
            params = [k for k in y.files if k.startswith("params/")]
            assert params and sorted(x.files) == sorted(y.files)
            for k in params:
                np.testing.assert_allclose(x[k], y[k], rtol=0, atol=1e-12)


def test_a_deployed_study_equals_the_simulation_and_refuses_an_unregistered_site(kit, deployment, tmp_path):
    study = _study(kit, "parity")
    out = tmp_path / "out"
    server = deployment.server(study, out)
    _until(lambda: "waiting for the sites" in (tmp_path / "server-0.log").read_text(), 60, "the coordinator's run")
    # VA holds keys from the same CA, but the study does not register it: the SuperLink refuses it
    deployment.site("VA")
    superlink_log = out / "flower" / "superlink.log"
    _until(lambda: "No SuperNode found with the given public key" in superlink_log.read_text(), 30,
           "the SuperLink to refuse VA")
    _until(lambda: "the SuperNode exited" in (tmp_path / "site-VA.log").read_text(), 30, "VA's SuperNode to exit")
    for name in SITES:
        deployment.site(name)
    assert _wait(server, 120, "the coordinator") == 0, (tmp_path / "server-0.log").read_text()
    _same_as_simulation(out, _simulate(kit, study, tmp_path))
    assert json.loads((out / "status.json").read_text())["round"] == "3/3"
    assert "VA" not in {r["test_site"] for r in json.loads((out / "results.json").read_text())["results"]}


def test_a_coordinator_killed_mid_run_resumes_bit_identically(kit, deployment, tmp_path):
    study = _study(kit, "resume", rounds=4)
    out = tmp_path / "out"
    server = deployment.server(study, out)
    for name in SITES:
        deployment.site(name)
    status = out / "status.json"

    def scaffold_under_way():
        try:
            st = json.loads(status.read_text())
        except (OSError, ValueError):
            return False
        return st.get("setting") == "SCAFFOLD" and st.get("round") in ("1/4", "2/4")

    _until(scaffold_under_way, 90, "SCAFFOLD's first rounds")
    os.kill(server.pid, signal.SIGKILL)
    server.wait(timeout=10)
    assert not (out / "results.json").exists()
    again = deployment.server(study, out, "--resume")
    assert _wait(again, 150, "the resumed coordinator") == 0, (tmp_path / "server-4.log").read_text()
    _same_as_simulation(out, _simulate(kit, study, tmp_path))


def test_a_site_that_dies_is_missing_with_its_reason_and_the_study_ends(kit, deployment, tmp_path):
    study = _study(kit, "dropout", methods='["fedavg"]', rounds=4, timeout=3)
    out = tmp_path / "out"
    server = deployment.server(study, out)
    sites = {name: deployment.site(name) for name in SITES}
    status = out / "status.json"

    def at_round_1():
        try:
            return json.loads(status.read_text()).get("round") == "1/4"
        except (OSError, ValueError):
            return False

    _until(at_round_1, 90, "round 1")
    for pid in [sites["Switzerland"].pid, *_descendants(sites["Switzerland"].pid)]:  # the hospital goes dark
        os.kill(pid, signal.SIGKILL)
    assert _wait(server, 90, "the coordinator") == 0, (tmp_path / "server-0.log").read_text()
    doc = json.loads((out / "results.json").read_text())
    notes = doc["histories"]["FedAvg"]["server_notes"][0]["rounds"]
    missing = {n["round"]: n.get("missing", {}) for n in notes}
    assert "Switzerland" in missing.get(3, {}), notes  # the last round at least went on without it
    assert all(set(m) == {"Switzerland"} for m in missing.values()), notes
    rows = {r["test_site"]: r for r in doc["results"]}
    assert rows["Cleveland"]["computable"] and not rows["Switzerland"]["computable"]


def test_medfed_run_on_the_flower_executor_equals_inprocess(kit, tmp_path):
    """`medfed run --executor flower`: the same study on a Flower deployment on 127.0.0.1."""
    from typer.testing import CliRunner

    from medfed.cli.app import app

    study = _study(kit, "executor", methods='["fedavg"]', rounds=2)
    docs = {}
    for executor in ("flower", "inprocess"):
        out = tmp_path / executor
        result = CliRunner().invoke(app, ["run", str(study), "--data", str(kit / "all.csv"), "--executor", executor,
                                          "--out", str(out)])
        assert result.exit_code == 0, result.output
        docs[executor] = json.loads((out / "results.json").read_text())
    rows = {e: {(r["setting"], r["test_site"]): r["metrics"] for r in d["results"]} for e, d in docs.items()}
    assert rows["flower"] == rows["inprocess"]
    assert docs["flower"]["histories"]["FedAvg"]["train_loss"] == docs["inprocess"]["histories"]["FedAvg"]["train_loss"]


def test_secure_aggregation_on_the_flower_executor_equals_inprocess(kit, tmp_path):
    """`medfed run --executor flower --secure-aggregation`: the masked exchange's stages travel
    as Flower messages and the sites keep their round secrets on disk between them."""
    pytest.importorskip("cryptography")
    pytest.importorskip("Crypto")
    from typer.testing import CliRunner

    from medfed.cli.app import app

    study = _study(kit, "secure", methods='["fedavg"]', rounds=2)
    docs = {}
    for executor in ("flower", "inprocess"):
        out = tmp_path / executor
        result = CliRunner().invoke(app, ["run", str(study), "--data", str(kit / "all.csv"), "--executor", executor,
                                          "--secure-aggregation", "--clip", "50", "--out", str(out)])
        assert result.exit_code == 0, result.output
        docs[executor] = json.loads((out / "results.json").read_text())
    rows = {e: {(r["setting"], r["test_site"]): r["metrics"] for r in d["results"]} for e, d in docs.items()}
    assert rows["flower"] == rows["inprocess"]
    assert docs["flower"]["histories"]["FedAvg"]["train_loss"] == docs["inprocess"]["histories"]["FedAvg"]["train_loss"]
    assert docs["flower"]["privacy"]["secure"]["settings"]["FedAvg"]["thresholds"] == [2]
