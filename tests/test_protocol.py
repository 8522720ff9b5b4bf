"""The round as a protocol: executors agree, dropouts, commit of site state, resume."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from medfed.client.drift import scaffold_update
from medfed.client.local import LocalData, LocalTraining
from medfed.data.datasets import load_dataset
from medfed.engine import run_federated
from medfed.engine.executors import local_executor
from medfed.engine.faults import parse_drops
from medfed.engine.protocol import FederatedAlgorithm, SiteProgram
from medfed.engine.runtime import SiteRuntime
from medfed.errors import ConfigError
from medfed.experiments.config import build_config
from medfed.experiments.harness import run_experiment
from medfed.experiments.results import results_document
from medfed.models import LogisticRegression
from medfed.rng import KeyedRng
from medfed.server.aggregate import apply_delta, chain, weighted_mean

VOLATILE = {"runtime_s", "setting_runtime_s", "config", "command", "environment", "workers"}


def _numbers(doc):
    return {k: v for k, v in doc.items() if k not in VOLATILE}


def _doc(federation, **values):
    return results_document(run_experiment(build_config(values), federation))


@pytest.fixture(scope="module")
def heart():
    return load_dataset("heart-disease")


def test_inprocess_and_process_executors_give_identical_results(heart):
    study = {"data": {"dataset": "heart-disease"}, "repeats": 1, "loso": True,
             "methods": ["fedavg", "scaffold", "ditto", "krum", "dos"], "method_options": {"krum": {"f": 0}},
             "training": {"rounds": 4, "local_steps": 3}}
    serial = _doc(heart, **study, executor="inprocess")
    pooled = _doc(heart, **study, executor="process")
    assert _numbers(serial) == _numbers(pooled)
    assert {r["setting"] for r in serial["results"]} >= {"FedAvg", "SCAFFOLD", "Ditto", "Krum", "DOS"}
    assert sum(r["evaluation"] == "loso" for r in serial["results"]) == 4 * 5  # every site unseen, per method


def test_executors_agree_for_fedbn_on_a_torch_model(heart):
    study = {"data": {"dataset": "heart-disease"}, "repeats": 1, "model": "mlp", "model_options": {"hidden": [8]},
             "methods": ["fedbn"], "training": {"rounds": 2, "local_steps": 2, "batch_size": 32}}
    assert _numbers(_doc(heart, **study, executor="inprocess")) == _numbers(_doc(heart, **study, executor="process"))


def _sites(k=3, n=40, d=4, seed=0):
    gen = np.random.default_rng(seed)
    out = []
    for i in range(k):
        X = gen.normal(i * 0.5, 1.0, (n + 7 * i, d))
        y = (X @ np.arange(1, d + 1) + gen.normal(0, 1, len(X)) > i).astype(float)
        out.append(LocalData(f"s{i}", X, y))
    return out


def _scaffold(names):
    from medfed.server.control import scaffold_control

    return FederatedAlgorithm(
        "scaffold", scaffold_update,
        chain(scaffold_control({n: 1.0 for n in names}, "uniform"), weighted_mean(), apply_delta()),
        broadcast=lambda state: {"server_control": state["scaffold_control"].control},
    )


def _training():
    return LocalTraining(LogisticRegression(), 0.1, 3)


def _init(d=4):
    return LogisticRegression().init_params((d,), KeyedRng(0))


def test_a_dropped_site_is_named_and_its_state_does_not_move():
    sites = _sites()
    names = [s.name for s in sites]
    faults = parse_drops(["s1@2"], names)
    run = run_federated(_scaffold(names), _init(), sites, _training(), 2, KeyedRng(3), faults=faults)
    assert run.history[1].missing == {"s1": "dropped out (fault injected with --drop s1@2)"}
    assert "s1" not in run.history[1].sites and run.history[1].skipped is None
    one_round = run_federated(_scaffold(names), _init(), sites, _training(), 1, KeyedRng(3))
    # s1's control variate after round 2 is the one it had after round 1: it did not take part
    np.testing.assert_array_equal(run.client_states["s1"].control["weight"],
                                  one_round.client_states["s1"].control["weight"])
    assert not np.array_equal(run.client_states["s0"].control["weight"],
                              one_round.client_states["s0"].control["weight"])


def test_a_round_missing_too_many_sites_keeps_the_model():
    sites = _sites()
    names = [s.name for s in sites]
    algorithm = FederatedAlgorithm("fedavg", _fedavg_rule(), chain(weighted_mean(), apply_delta()))
    run = run_federated(algorithm, _init(), sites, _training(), 2, KeyedRng(0), min_sites=3,
                        faults=parse_drops(["s2@1"], names))
    assert run.history[0].skipped and run.history[0].missing == {"s2": "dropped out (fault injected with --drop s2@1)"}
    assert run.history[1].skipped is None


def _fedavg_rule():
    from medfed.client.local import local_sgd_update

    return local_sgd_update


def test_bad_drop_specs_are_one_clear_error():
    for spec, words in [("s1", "SITE@ROUND"), ("s1@0", "from 1"), ("x@2", "no site 'x'"), ("s1@3-2", "SITE@FIRST")]:
        with pytest.raises(ConfigError, match=words):
            parse_drops([spec], ["s0", "s1"])


class _Crash(Exception):
    pass


def test_resume_after_a_crash_is_bit_identical(tmp_path):
    """The coordinator dies after round 3's commit reached the sites but before its checkpoint:
    the resumed run repeats round 3 from the sites' earlier state and ends bit-identical."""
    sites = _sites()
    names = [s.name for s in sites]
    whole = run_federated(_scaffold(names), _init(), sites, _training(), 6, KeyedRng(5))

    def crash_at_round_3(params, calls=[0]):
        calls[0] += 1
        if calls[0] == 3:
            raise _Crash
        return {}

    with pytest.raises(_Crash):
        run_federated(_scaffold(names), _init(), sites, _training(), 6, KeyedRng(5), evaluate=crash_at_round_3,
                      eval_every=1, checkpoint_dir=tmp_path, fingerprint="study")
    assert (tmp_path / "server.checkpoint").exists() and (tmp_path / "sites" / "s0.state").exists()
    resumed = run_federated(_scaffold(names), _init(), sites, _training(), 6, KeyedRng(5),
                            checkpoint_dir=tmp_path, fingerprint="study")
    for k in whole.params:
        np.testing.assert_array_equal(whole.params[k], resumed.params[k])
    np.testing.assert_array_equal(whole.train_loss, resumed.train_loss)
    for site in names:
        np.testing.assert_array_equal(whole.client_states[site].control["weight"],
                                      resumed.client_states[site].control["weight"])
    with pytest.raises(ConfigError, match="another study"):
        run_federated(_scaffold(names), _init(), sites, _training(), 6, KeyedRng(5),
                      checkpoint_dir=tmp_path, fingerprint="other")


def test_the_process_executor_keeps_no_site_rows_in_the_coordinator():
    sites = _sites()
    program = SiteProgram(FederatedAlgorithm("fedavg", _fedavg_rule(), chain(weighted_mean(), apply_delta())),
                          _training())
    executor = local_executor("process", program, sites, KeyedRng(0))
    try:
        held = list(vars(executor).values())
        assert not any(isinstance(v, (LocalData, SiteRuntime, np.ndarray)) for v in held)
        assert {s: v.n_examples for s, v in executor.setup().items()} == {s.name: s.n for s in sites}
        pids = [p.pid for p in executor._procs]
        assert len(set(pids)) == len(sites) and os.getpid() not in pids
    finally:
        executor.close()
    assert all(not p.is_alive() for p in executor._procs) if executor._procs else True


def _medfed(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "medfed.cli.app", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, **kw)


def test_medfed_run_resumes_after_sigkill_bit_identically(tmp_path):
    study = ["run", "--dataset", "heart-disease", "--methods", "fedavg,scaffold", "--rounds", "300",
             "--local-steps", "5", "--repeats", "2", "--resume"]
    whole = _medfed(*study[:-1], "--out", str(tmp_path / "whole"))
    assert whole.wait(timeout=120) == 0, whole.stderr.read().decode()
    out = tmp_path / "killed"
    proc = _medfed(*study, "--out", str(out))
    marker = out / ".medfed-resume" / "r2-fedavg" / "server.checkpoint"
    deadline = time.monotonic() + 90
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert not (out / "results.json").exists(), "the run finished before it could be killed; make it longer"
    again = _medfed(*study, "--out", str(out))
    assert again.wait(timeout=120) == 0, again.stderr.read().decode()
    a = json.loads((tmp_path / "whole" / "results.json").read_text())
    b = json.loads((out / "results.json").read_text())
    assert _numbers(a) == _numbers(b)
    assert not (out / ".medfed-resume").exists()  # checkpoints of a finished run are removed
