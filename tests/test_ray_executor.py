"""The Ray executor: sites as Ray actors give the in-process executor's numbers for a seed
(stateful SCAFFOLD, personalizing Ditto, Krum's screening, dropouts, a torch model with private
BatchNorm, secure aggregation), the
coordinator holds no site rows, and no Ray process outlives ``ray.shutdown()``."""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from medfed.data.datasets import load_dataset
from medfed.errors import ConfigError
from medfed.experiments.config import build_config
from medfed.experiments.harness import run_experiment
from medfed.experiments.results import results_document

VOLATILE = {"runtime_s", "setting_runtime_s", "config", "command", "environment", "workers"}


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (Linux /proc): a local Ray's GCS, raylet and workers."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its exit status waits to be read


@pytest.fixture(scope="module")
def ray():
    ray = pytest.importorskip("ray")
    if not Path("/proc").is_dir():
        pytest.skip("the check that no Ray process survives reads /proc")
    before = _descendants(os.getpid())
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    started = _descendants(os.getpid()) - before
    yield ray
    ray.shutdown()
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in started) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [p for p in started if _alive(p)]
    assert started and not survivors, f"Ray processes survived ray.shutdown(): {survivors}"


@pytest.fixture(scope="module")
def heart():
    return load_dataset("heart-disease")


def _numbers(config, federation):
    doc = results_document(run_experiment(build_config(config), federation))
    return {k: v for k, v in doc.items() if k not in VOLATILE}


def test_ray_actors_give_the_inprocess_numbers(ray, heart):
    study = {"data": {"dataset": "heart-disease"}, "repeats": 1, "seed": 3,
             "methods": ["fedavg", "scaffold", "ditto", "krum"], "method_options": {"krum": {"f": 0}},
             "training": {"rounds": 3, "local_steps": 2}, "drop": ["VA@2"]}
    serial = _numbers({**study, "executor": "inprocess"}, heart)
    actors = _numbers({**study, "executor": "ray"}, heart)
    assert serial == actors
    assert {r["setting"] for r in serial["results"]} >= {"FedAvg", "SCAFFOLD", "Ditto", "Krum"}


def test_a_torch_model_on_ray_gives_the_inprocess_numbers(ray, heart):
    pytest.importorskip("torch")  # the site program, torch module included, travels to the actors pickled
    study = {"data": {"dataset": "heart-disease"}, "repeats": 1, "model": "mlp", "model_options": {"hidden": [8]},
             "methods": ["fedbn"], "training": {"rounds": 2, "local_steps": 2, "batch_size": 32}}
    assert _numbers({**study, "executor": "inprocess"}, heart) == _numbers({**study, "executor": "ray"}, heart)


def test_a_securely_aggregated_run_on_ray_equals_the_inprocess_one(ray, heart):
    pytest.importorskip("cryptography")
    pytest.importorskip("Crypto")
    study = {"data": {"dataset": "heart-disease"}, "repeats": 1, "seed": 1, "methods": ["scaffold"],
             "training": {"rounds": 2, "local_steps": 2}, "privacy": {"secure_aggregation": True, "clip": 50.0},
             "drop": ["VA@2:unmask"]}  # masked, then gone: recovered from its neighbours' shares
    assert _numbers({**study, "executor": "inprocess"}, heart) == _numbers({**study, "executor": "ray"}, heart)


def test_sites_live_in_the_actors_not_in_the_coordinator(ray):
    from medfed.client.local import LocalData, LocalTraining, local_sgd_update
    from medfed.engine.executors import local_executor
    from medfed.engine.protocol import FederatedAlgorithm, SiteProgram
    from medfed.engine.runtime import SiteRuntime
    from medfed.models import LogisticRegression
    from medfed.rng import KeyedRng
    from medfed.server.aggregate import apply_delta, chain, weighted_mean

    gen = np.random.default_rng(0)
    sites = [LocalData(f"s{i}", gen.normal(size=(20 + i, 3)), gen.integers(0, 2, 20 + i).astype(float))
             for i in range(5)]
    program = SiteProgram(FederatedAlgorithm("fedavg", local_sgd_update, chain(weighted_mean(), apply_delta())),
                          LocalTraining(LogisticRegression(), 0.1, 2))
    executor = local_executor("ray", program, sites, KeyedRng(0))
    try:
        assert len(executor._actors) == 2  # one per CPU of the cluster, sites dealt among them
        held = list(vars(executor).values())
        assert not any(isinstance(v, (LocalData, SiteRuntime, np.ndarray)) for v in held)
        assert {s: v.n_examples for s, v in executor.setup().items()} == {s.name: s.n for s in sites}
        answers = executor.stage("share", 0, {"s0": None})  # a site's error comes back as its reason
        assert answers["s0"].startswith("site error:") and "no 'share' stage" in answers["s0"]
        pids = executor._ray.get([a.__ray_call__.remote(lambda self: os.getpid()) for a in executor._actors])
        assert len(set(pids)) == 2 and os.getpid() not in pids
    finally:
        executor.close()


def test_ray_address_belongs_to_the_ray_executor(heart):
    config = build_config({"data": {"dataset": "heart-disease"}, "repeats": 1, "ray_address": "10.0.0.1:6379"})
    with pytest.raises(ConfigError, match="--ray-address is the cluster of --executor ray"):
        run_experiment(config, heart)
    config = build_config({"data": {"dataset": "heart-disease"}, "repeats": 2, "workers": 2, "executor": "ray"})
    with pytest.raises(ConfigError, match="--workers 1"):
        run_experiment(config, heart)


def test_an_unreachable_ray_address_is_refused_before_anything_trains(heart, tmp_path):
    pytest.importorskip("ray")
    import socket

    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    config = build_config({"data": {"dataset": "heart-disease"}, "repeats": 1, "executor": "ray",
                           "ray_address": f"127.0.0.1:{port}", "out": str(tmp_path / "out")})
    with pytest.raises(ConfigError, match=f"--ray-address '127.0.0.1:{port}': no Ray cluster answers there"):
        run_experiment(config, heart)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def cluster():
    """A Ray cluster started apart from this process (``ray start --head``), on 127.0.0.1 only
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray on the loopback address) with token
    authentication; stopped by its process group, whose every process must be gone after."""
    pytest.importorskip("ray")
    import secrets
    import signal
    import socket

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    # its own temp dir: `ray start` writes the machine's "current cluster" file there, which any
    # later ray.init() without an address (Flower's simulation, a user's session) would join
    temp = tempfile.mkdtemp(prefix="mfray", dir="/tmp")  # short: Ray's socket paths live below it
    head = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--port", str(port), "--num-cpus",
         "2", "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("ray start --head did not listen within 60 s")
        yield f"127.0.0.1:{port}", env
    finally:
        started = _descendants(head.pid) | {head.pid}
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:  # Ray drains for up to 30 s on SIGTERM: not worth waiting for
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in started) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in started if _alive(p)], "processes of the Ray cluster survived"
        shutil.rmtree(temp, ignore_errors=True)
        assert not Path("/tmp/ray/ray_current_cluster").exists() or \
            str(port) not in Path("/tmp/ray/ray_current_cluster").read_text(), "the cluster registered machine-wide"


def _run_in_child(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medfed.cli.app", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_an_existing_ray_cluster_at_ray_address_gives_the_inprocess_numbers(cluster, tmp_path):
    address, env = cluster
    common = ["run", "--dataset", "heart-disease", "--methods", "fedavg,scaffold", "--rounds", "3", "--repeats", "1"]
    on_cluster = _run_in_child([*common, "--executor", "ray", "--ray-address", address, "--out",
                                str(tmp_path / "ray")], env)
    assert on_cluster.returncode == 0, on_cluster.stderr[-2000:]
    here = _run_in_child([*common, "--out", str(tmp_path / "here")], env)
    assert here.returncode == 0, here.stderr[-2000:]
    import json

    docs = [json.loads((tmp_path / name / "results.json").read_text()) for name in ("ray", "here")]
    assert docs[0]["results"] == docs[1]["results"] and docs[0]["histories"] == docs[1]["histories"]


def test_a_cluster_that_refuses_the_token_is_one_line_before_anything_trains(cluster, tmp_path):
    address, env = cluster
    wrong = {**env, "RAY_AUTH_TOKEN": "0" * 32}
    result = _run_in_child(["run", "--dataset", "heart-disease", "--methods", "single,fedavg", "--rounds", "2",
                            "--executor", "ray", "--ray-address", address, "--out", str(tmp_path / "out")], wrong)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "refused this process's token" in lines[0] and "RAY_AUTH_TOKEN" in lines[0], lines
    assert not (tmp_path / "out").exists()
