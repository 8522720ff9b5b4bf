"""A deployed study over the loopback link: parity with simulation, refusals, dropouts, resume."""

import json

import numpy as np
import pandas as pd
import pytest
from deploy_support import heart_study, site_manifests, site_tables

from medfed.comm.wire import decode
from medfed.deploy.coordinator import drive
from medfed.deploy.loopback import LoopbackLink
from medfed.errors import ConfigError

STUDY = heart_study(["fedavg", "scaffold", "ditto"])


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """heart-disease as one pooled table and one file per site."""
    root = tmp_path_factory.mktemp("heart")
    site_tables(root)
    (root / "study.toml").write_text(STUDY)
    return root


def _nodes(root, tmp):
    return {s: {"site": s, "data": str(root / f"{s}.csv"), "folder": str(tmp / f"site-{s}")}
            for s in ("Cleveland", "Hungary", "Switzerland")}


def _simulate(study, source_flag, source, out, *flags):
    """``medfed run`` of ``study`` on the pooled data (``--data`` table or ``--manifest``): results.json."""
    from typer.testing import CliRunner

    from medfed.cli.app import app

    result = CliRunner().invoke(app, ["run", str(study), source_flag, str(source), "--out", str(out), *flags])
    assert result.exit_code == 0, result.output
    return json.loads((out / "results.json").read_text())


def _simulated(root, tmp):
    return _simulate(root / "study.toml", "--data", root / "all.csv", tmp / "sim", "--save-model")


def _rows(doc):
    return {(r["setting"], r["test_site"], r["model"]): r["metrics"] for r in doc["results"]}


def test_a_deployed_study_equals_its_simulation(tables, tmp_path):
    deployed = drive(LoopbackLink(_nodes(tables, tmp_path)), tables / "study.toml", tmp_path / "out", log=lambda m: None)
    simulated = _simulated(tables, tmp_path)
    assert _rows(deployed) == _rows(simulated)
    assert deployed["histories"].keys() == simulated["histories"].keys()
    for setting, h in simulated["histories"].items():
        assert deployed["histories"][setting]["train_loss"] == h["train_loss"]
        assert deployed["histories"][setting]["bytes_up_per_run"] == h["bytes_up_per_run"]
    for setting in ("FedAvg", "SCAFFOLD", "Ditto"):  # the final global models, as simulation saves them
        with np.load(tmp_path / "out" / "models" / f"{setting}.npz") as a, \
                np.load(tmp_path / "sim" / "models" / f"{setting}.npz") as b:
            params = [k for k in b.files if k.startswith("params/")]
            assert params and sorted(a.files) == sorted(b.files)
            for k in a.files:
                if k != "metadata":
                    np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-12)
    from typer.testing import CliRunner

    from medfed.cli.app import app

    for where in ("out", "sim"):  # medfed predict scores new rows with a deployed model as with a simulated one
        result = CliRunner().invoke(app, ["predict", "--model", str(tmp_path / where / "models" / "FedAvg.npz"),
                                          "--data", str(tables / "Hungary.csv"), "--site", "Hungary",
                                          "--out", str(tmp_path / f"{where}.csv")])
        assert result.exit_code == 0, result.output
    assert (tmp_path / "out.csv").read_text() == (tmp_path / "sim.csv").read_text()
    status = json.loads((tmp_path / "out" / "status.json").read_text())
    assert status["state"] == "finished" and status["round"] == "3/3"
    assert not (tmp_path / "out" / ".medfed-deploy").exists()
    # no row left any site: the site folders hold their own rows, the coordinator's folder none
    assert all((tmp_path / f"site-{s}" / "rows.npz").exists() for s in ("Cleveland", "Hungary"))
    # Ditto's personal models stay at their sites
    assert (tmp_path / "site-Hungary" / "models" / "ditto-personal.npz").exists()
    assert not list((tmp_path / "out").rglob("*personal*"))


@pytest.mark.parametrize("rule", ["youden", "prevalence"])
def test_a_deployed_site_chooses_the_threshold_on_its_own_rows_as_simulation_does(tables, tmp_path, rule):
    """Each site thresholds the global model (FedAvg) and its personal model (Ditto) on its own
    training rows: the same thresholds and metrics as in simulation."""
    study = tmp_path / "threshold.toml"
    study.write_text(STUDY.replace('["fedavg", "scaffold", "ditto"]', '["fedavg", "ditto"]')
                     + f'\n[evaluation]\nthreshold = "{rule}"\n')
    deployed = drive(LoopbackLink(_nodes(tables, tmp_path)), study, tmp_path / "out", log=lambda m: None)
    simulated = _simulate(study, "--data", tables / "all.csv", tmp_path / "sim")
    assert _rows(deployed) == _rows(simulated)
    thresholds = {(r["setting"], r["test_site"], r["model"]): r["threshold"] for r in simulated["results"]}
    assert {(r["setting"], r["test_site"], r["model"]): r["threshold"] for r in deployed["results"]} == thresholds
    chosen = [t["logit"][0] for t in thresholds.values()]
    assert all(t["rule"] == rule and t["chosen_on"] == "the test site's own training rows" for t in thresholds.values())
    assert len(set(chosen)) > 1 and 0.0 not in chosen  # one per site and model, none of them 0.5's


def test_a_site_whose_file_misses_a_column_is_refused_by_name(tables, tmp_path):
    nodes = _nodes(tables, tmp_path)
    bad = tmp_path / "bad.csv"
    pd.read_csv(tables / "Hungary.csv").drop(columns=["chol"]).to_csv(bad, index=False)
    nodes["Hungary"]["data"] = str(bad)
    logged = []
    doc = drive(LoopbackLink(nodes), tables / "study.toml", tmp_path / "out", log=logged.append)
    assert [r["name"] for r in doc["sites"]] == ["Cleveland", "Switzerland"]
    assert any("Hungary" in line and "'chol'" in line for line in logged), logged
    assert any("Hungary" in w and "chol" in w for w in doc["warnings"])


def test_a_site_that_misses_a_round_is_named_and_the_round_goes_on(tables, tmp_path):
    calls = {"n": 0}

    def fail(site, payload):
        if site == "Switzerland" and decode(payload)["op"] == "train":
            calls["n"] += 1
            if calls["n"] == 2:
                return "timeout after 5 s"
        return None

    doc = drive(LoopbackLink(_nodes(tables, tmp_path), fail), tables / "study.toml", tmp_path / "out",
                log=lambda m: None)
    notes = doc["histories"]["FedAvg"]["server_notes"][0]["rounds"]
    assert notes == [{"round": 1, "rejected": {}, "skipped": None, "missing": {"Switzerland": "timeout after 5 s"}}]


def test_an_unlisted_site_and_a_wrong_file_are_refused(tables, tmp_path):
    nodes = _nodes(tables, tmp_path)
    nodes["Cleveland"]["data"] = str(tables / "Hungary.csv")  # another site's rows
    logged = []
    doc = drive(LoopbackLink(nodes), tables / "study.toml", tmp_path / "out", log=logged.append)
    assert "Cleveland" not in [r["name"] for r in doc["sites"]]
    assert any("Cleveland" in line and "its own rows" in line for line in logged)


def test_a_study_that_cannot_be_deployed_is_refused_in_one_line(tables, tmp_path):
    study = tmp_path / "s.toml"
    study.write_text(STUDY.replace('["fedavg", "scaffold", "ditto"]', '["mix", "fedavg"]'))
    with pytest.raises(ConfigError, match="mix pool or move rows"):
        drive(LoopbackLink(_nodes(tables, tmp_path)), study, tmp_path / "out", log=lambda m: None)
    study.write_text(STUDY.replace("[deploy]\nsites", "[elsewhere]\nsites"))
    with pytest.raises(ConfigError):
        drive(LoopbackLink(_nodes(tables, tmp_path)), study, tmp_path / "out", log=lambda m: None)
    # hidden labels are the simulation harness's split: a deployed site would silently train on all of them
    study.write_text(STUDY.replace('impute = "median"', 'impute = "median"\nlabeled_fraction = 0.5'))
    with pytest.raises(ConfigError, match="labeled_fraction and labeled_fraction_site hide labels in simulation"):
        drive(LoopbackLink(_nodes(tables, tmp_path)), study, tmp_path / "out", log=lambda m: None)
    # what a few-label method cannot combine with, refused as in simulation (before any site is asked)
    study.write_text(STUDY.replace('["fedavg", "scaffold", "ditto"]', '["fedavg", "semisupervised"]')
                     + '[harmonize]\nmethod = "combat"\n')
    with pytest.raises(ConfigError, match="'semisupervised' learns from unlabeled rows, which \\[harmonize\\]"):
        drive(LoopbackLink(_nodes(tables, tmp_path)), study, tmp_path / "out", log=lambda m: None)
    study.write_text(STUDY.replace('["fedavg", "scaffold", "ditto"]', '["fedavg", "distill"]'))
    with pytest.raises(ConfigError, match="method 'distill' needs a teacher model"):
        drive(LoopbackLink(_nodes(tables, tmp_path)), study, tmp_path / "out", log=lambda m: None)


class _CoordinatorDied(Exception):
    pass


def test_a_coordinator_that_dies_mid_run_resumes_bit_identically(tables, tmp_path):
    whole = drive(LoopbackLink(_nodes(tables, tmp_path / "a")), tables / "study.toml", tmp_path / "whole",
                  log=lambda m: None)
    trains = {"n": 0}

    def die(site, payload):
        if decode(payload)["op"] == "train":
            trains["n"] += 1
            if trains["n"] == 3 * 4 + 2:  # SCAFFOLD's second round, after two of its sites answered
                raise _CoordinatorDied
        return None

    nodes = _nodes(tables, tmp_path / "b")
    with pytest.raises(_CoordinatorDied):
        drive(LoopbackLink(nodes, die), tables / "study.toml", tmp_path / "out", log=lambda m: None)
    with pytest.raises(ConfigError, match="--resume"):
        drive(LoopbackLink(nodes), tables / "study.toml", tmp_path / "out", log=lambda m: None)
    resumed = drive(LoopbackLink(nodes), tables / "study.toml", tmp_path / "out", resume=True, log=lambda m: None)
    assert _rows(resumed) == _rows(whole)
    assert resumed["histories"] == whole["histories"]


class _CorruptingLink(LoopbackLink):
    """Hungary's round-2 answer arrives as garbage; Switzerland's round-3 upload holds a NaN."""

    def exchange(self, requests, timeout_s):
        from medfed.comm.wire import encode

        out = super().exchange(requests, timeout_s)
        for site, raw in list(out.items()):
            if isinstance(raw, str):
                continue
            reply = decode(raw)
            round_ = decode(requests[site]).get("plan", {}).get("round")
            if site == "Hungary" and round_ == 1:
                out[site] = raw[:20] + b"garbage"
            elif site == "Switzerland" and round_ == 2:
                payload = {k: np.full_like(v, np.nan) for k, v in reply.payload.items()}
                out[site] = encode(type(reply)(reply.site, payload, reply.n_examples, reply.kind, reply.metrics,
                                               reply.extras))
        return out


def test_a_malformed_or_non_finite_answer_is_refused_and_the_federation_goes_on(tables, tmp_path):
    doc = drive(_CorruptingLink(_nodes(tables, tmp_path)), tables / "study.toml", tmp_path / "out",
                log=lambda m: None)
    notes = {n["round"]: n for n in doc["histories"]["FedAvg"]["server_notes"][0]["rounds"]}
    assert notes[1]["missing"]["Hungary"].startswith("malformed answer")
    assert "Switzerland" in notes[2]["rejected"] and notes[2]["skipped"] is None
    assert all(r["computable"] for r in doc["results"])


def test_deploy_commands_refuse_bad_input_in_one_line_before_starting_anything(tables, tmp_path):
    from typer.testing import CliRunner

    from medfed.cli.app import app
    from medfed.deploy.certs import make_certs

    make_certs(tmp_path / "certs", ["Cleveland", "Hungary"])
    bad_study = tmp_path / "bad.toml"
    bad_study.write_text(STUDY.replace('["fedavg", "scaffold", "ditto"]', '["single", "fedavg"]'))
    cases = [
        (["deploy", "server", str(bad_study), "--certs", str(tmp_path / "certs"), "--address", "127.0.0.1:1",
          "--out", str(tmp_path / "o")], "single pool or move rows"),
        (["deploy", "server", str(tables / "study.toml"), "--certs", str(tmp_path / "certs"), "--address",
          "127.0.0.1:1", "--out", str(tmp_path / "o")], "no keys for site(s) Switzerland"),
        (["deploy", "server", str(tables / "study.toml"), "--certs", str(tmp_path / "certs"), "--address",
          "localhost", "--out", str(tmp_path / "o")], "HOST:PORT"),
        (["deploy", "site", "--name", "Hungary", "--data", str(tmp_path / "none.csv"), "--server", "127.0.0.1:1",
          "--certs", str(tmp_path / "certs")], "no such file"),
        (["deploy", "site", "--name", "VA", "--data", str(tables / "Hungary.csv"), "--server", "127.0.0.1:1",
          "--certs", str(tmp_path / "certs")], "no key of site 'VA'"),
        (["deploy", "status", str(tmp_path)], "has no status.json"),
    ]
    for args, words in cases:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert words in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "o" / "flower").exists()  # no SuperLink was started


def _image_study(tmp_path, extra=""):
    """Two hospitals' PNG manifests (one file each, and pooled in all.csv) and a small-CNN study."""
    sites = site_manifests(tmp_path)
    study = tmp_path / "images.toml"
    study.write_text('''methods = ["fedavg"]
model = "cnn2d"
seed = 1
repeats = 1
[model_options]
channels = [4]
[training]
rounds = 2
local_steps = 2
[data]
site_column = "site"
label_column = "label"
[deploy]
sites = ["hospital-0", "hospital-1"]
site_files = "manifest"
''' + extra)
    return study, {s: {"site": s, "data": str(tmp_path / f"{s}.csv"), "folder": str(tmp_path / f"site-{s}")}
                   for s in sites}


def test_a_deployed_image_study_equals_its_simulation(tmp_path):
    """Sites holding PNG manifests, a small CNN: the deployed run equals `medfed run --manifest`."""
    pytest.importorskip("torch")
    study, nodes = _image_study(tmp_path)
    deployed = drive(LoopbackLink(nodes), study, tmp_path / "out", log=lambda m: None)
    simulated = _simulate(study, "--manifest", tmp_path / "all.csv", tmp_path / "sim", "--save-model")
    assert _rows(deployed) == _rows(simulated)
    assert deployed["sample_shape"] == [1, 10, 10]
    with np.load(tmp_path / "out" / "models" / "FedAvg.npz") as a, np.load(tmp_path / "sim" / "models" / "FedAvg.npz") as b:
        for k in b.files:
            if k.startswith("params/"):
                np.testing.assert_array_equal(a[k], b[k])


def test_the_flower_executor_refuses_what_a_deployment_cannot_run_in_one_line(tables, tmp_path):
    from typer.testing import CliRunner

    from medfed.cli.app import app

    base = ["run", str(tables / "study.toml"), "--data", str(tables / "all.csv"), "--executor", "flower",
            "--out", str(tmp_path / "o")]
    for extra, words in [(["--repeats", "2"], "--repeats 2"), (["--loso"], "--loso"),
                         (["--methods", "mix,fedavg"], "mix pool or move rows"),
                         (["--drop", "Hungary@2"], "--drop")]:
        result = CliRunner().invoke(app, base + extra)
        assert result.exit_code == 2 and words in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    result = CliRunner().invoke(app, ["run", "--dataset", "heart-disease", "--methods", "fedavg", "--repeats", "1",
                                      "--executor", "flower", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "embedded data set" in result.output


@pytest.mark.parametrize("adaptive", ["false", "true"])
def test_a_deployed_study_with_client_level_dp_and_compression_equals_its_simulation(tables, tmp_path, adaptive):
    pytest.importorskip("dp_accounting")
    study = tmp_path / "private.toml"
    study.write_text('compress = "q8"\n' + STUDY.replace('["fedavg", "scaffold", "ditto"]', '["fedavg", "ditto"]')
                     + f'\n[privacy]\ndp = "client"\nclip = 0.5\nnoise = 0.8\nadaptive_clip = {adaptive}\n')
    deployed = drive(LoopbackLink(_nodes(tables, tmp_path)), study, tmp_path / "out", log=lambda m: None)
    simulated = _simulate(study, "--data", tables / "all.csv", tmp_path / "sim")
    assert _rows(deployed) == _rows(simulated)
    assert deployed["histories"]["FedAvg"]["train_loss"] == simulated["histories"]["FedAvg"]["train_loss"]
    assert deployed["privacy"]["ledger"] == simulated["privacy"]["ledger"]
    assert deployed["privacy"]["epsilon_by_setting"]["FedAvg"] > 0


def test_a_deployed_study_with_secure_aggregation_equals_its_simulations(tables, tmp_path):
    """Masked rounds over the link (the site keeps its upload, secrets and shares on disk between
    the stages) give the numbers of the inprocess and process simulations."""
    pytest.importorskip("cryptography")
    pytest.importorskip("Crypto")
    study = tmp_path / "secure.toml"
    study.write_text(STUDY + '\n[privacy]\nsecure_aggregation = true\nclip = 50\n')
    deployed = drive(LoopbackLink(_nodes(tables, tmp_path)), study, tmp_path / "out", log=lambda m: None)
    for executor in ("inprocess", "process"):
        simulated = _simulate(study, "--data", tables / "all.csv", tmp_path / executor, "--executor", executor)
        assert _rows(deployed) == _rows(simulated)
        for setting, h in simulated["histories"].items():
            assert deployed["histories"][setting]["train_loss"] == h["train_loss"]
    assert deployed["privacy"]["secure_aggregation"] and deployed["privacy"]["channel"][-1] == "mask"
    assert set(deployed["privacy"]["secure"]["settings"]) == {"FedAvg", "SCAFFOLD", "Ditto"}
    # what a site kept for the masked exchange is gone once the round is unmasked
    memory = decode((tmp_path / "site-Hungary" / "runs" / "r1-fedavg" / "Hungary.state").read_bytes())
    assert memory.secure is None


def test_a_deployed_study_quantized_in_the_ring_equals_its_simulation(tables, tmp_path):
    """q8 with secure aggregation deployed: the sites quantize with the run's keyed dither, so the
    loopback deployment gives the inprocess simulation's numbers and bytes."""
    pytest.importorskip("cryptography")
    pytest.importorskip("Crypto")
    study = tmp_path / "q8.toml"
    study.write_text('compress = "q8"\n' + STUDY.replace('["fedavg", "scaffold", "ditto"]', '["fedavg"]')
                     .replace("rounds = 3", "rounds = 2") + '\n[privacy]\nsecure_aggregation = true\nclip = 5\n')
    deployed = drive(LoopbackLink(_nodes(tables, tmp_path)), study, tmp_path / "out", log=lambda m: None)
    simulated = _simulate(study, "--data", tables / "all.csv", tmp_path / "sim")
    assert _rows(deployed) == _rows(simulated)
    assert deployed["histories"]["FedAvg"]["train_loss"] == simulated["histories"]["FedAvg"]["train_loss"]
    for doc in (deployed, simulated):
        assert doc["privacy"]["channel"] == ["sharing policy", "clip", "quantize (q8)", "mask"]
        assert doc["privacy"]["secure"]["settings"]["FedAvg"]["ring_bits"] == [16]
    assert deployed["privacy"]["bytes_up_per_round_by_site"] == simulated["privacy"]["bytes_up_per_round_by_site"]


def test_deployed_distributed_dp_noise_comes_from_the_sites_own_seed(tables, tmp_path):
    """--dp distributed deployed: each site noises with a seed the coordinator never had (its
    folder's noise.seed), so the models differ from the simulation's; the ledger is the same."""
    pytest.importorskip("dp_accounting")
    pytest.importorskip("Crypto")
    study = tmp_path / "distributed.toml"
    study.write_text(STUDY.replace('["fedavg", "scaffold", "ditto"]', '["fedavg"]')
                     + '\n[privacy]\nsecure_aggregation = true\ndp = "distributed"\nclip = 0.5\nnoise = 1.0\n')
    deployed = drive(LoopbackLink(_nodes(tables, tmp_path)), study, tmp_path / "out", log=lambda m: None)
    simulated = _simulate(study, "--data", tables / "all.csv", tmp_path / "sim")
    assert deployed["privacy"]["ledger"] == simulated["privacy"]["ledger"]
    assert {e["mode"] for e in deployed["privacy"]["ledger"]} == {"distributed"}
    assert deployed["histories"]["FedAvg"]["train_loss"] != simulated["histories"]["FedAvg"]["train_loss"]
    assert all((tmp_path / f"site-{s}" / "noise.seed").exists() for s in ("Cleveland", "Hungary"))


def test_deployed_dp_sgd_draws_batches_and_noise_from_the_sites_own_seed(tables, tmp_path):
    """--dp sample deployed: each site runs DP-SGD with batches and noise from a seed the
    coordinator never had (a server that knew the noise could subtract it), so the models differ
    from the simulation's; every site's ledger entry, at its own rate, is the simulation's."""
    pytest.importorskip("dp_accounting")
    study = tmp_path / "sample.toml"
    study.write_text(STUDY.replace('["fedavg", "scaffold", "ditto"]', '["fedavg"]')
                     .replace("local_steps = 4", "local_steps = 4\nbatch_size = 16")
                     + '\n[privacy]\ndp = "sample"\nclip = 1.0\nnoise = 1.0\n')
    deployed = drive(LoopbackLink(_nodes(tables, tmp_path)), study, tmp_path / "out", log=lambda m: None)
    simulated = _simulate(study, "--data", tables / "all.csv", tmp_path / "sim")
    ledger = deployed["privacy"]["ledger"]
    assert ledger == simulated["privacy"]["ledger"]
    assert {e["mode"] for e in ledger} == {"sample"} and len({e["sampling_rate"] for e in ledger}) == 3
    assert deployed["results"] != simulated["results"]
    assert all((tmp_path / f"site-{s}" / "noise.seed").exists() for s in ("Cleveland", "Hungary"))


def test_a_deployed_dp_sgd_study_refuses_a_method_it_cannot_make_private_before_training(tables, tmp_path):
    pytest.importorskip("dp_accounting")
    study = tmp_path / "sample.toml"
    study.write_text(STUDY.replace('["fedavg", "scaffold", "ditto"]', '["fedavg", "scaffold"]')
                     .replace("local_steps = 4", "local_steps = 4\nbatch_size = 16")
                     + '\n[privacy]\ndp = "sample"\nclip = 1.0\nnoise = 1.0\n')
    with pytest.raises(ConfigError, match="scaffold"):
        drive(LoopbackLink(_nodes(tables, tmp_path)), study, tmp_path / "out", log=lambda m: None)
    from medfed.deploy.coordinator import CHECKPOINTS

    assert not (tmp_path / "out" / CHECKPOINTS / "r1-fedavg").exists()  # fedavg did not train first


# -- [harmonize] deployed: the setup exchange of statistics ---------------------------------------


class _RecordingLink(LoopbackLink):
    """A loopback link that keeps every request and answer, decoded, by operation."""

    def __init__(self, nodes):
        super().__init__(nodes)
        self.seen = []  # (op, step, site, request, answer)

    def exchange(self, requests, timeout_s):
        answers = super().exchange(requests, timeout_s)
        for site, payload in requests.items():
            request = decode(payload)
            self.seen.append((request["op"], request.get("step"), site, request, decode(answers[site])))
        return answers


def _array_sizes(value):
    """The element counts of every array inside a decoded message."""
    import dataclasses

    if isinstance(value, np.ndarray):
        return [value.size]
    if dataclasses.is_dataclass(value):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return [n for v in value.values() for n in _array_sizes(v)]
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _array_sizes(v)]
    return []


def _covariate_tables(root, sizes=(30, 45, 25)):
    """Three hospitals whose features carry a site shift and scale, age and sex effects."""
    rng = np.random.default_rng(4)
    frames = []
    for k, n in enumerate(sizes):
        age, sex = rng.normal(70, 6, n), rng.integers(0, 2, n)
        y = rng.integers(0, 2, n)
        X = 0.05 * age[:, None] + 0.3 * sex[:, None] + 0.8 * y[:, None] + rng.normal(0, 1 + 0.4 * k, (n, 4)) + 1.5 * k
        df = pd.DataFrame({"hospital": f"H{k}", "age": age, "sex": sex, "dx": y, **{f"v{j}": X[:, j] for j in range(4)}})
        df.to_csv(root / f"H{k}.csv", index=False)
        frames.append(df)
    pd.concat(frames).to_csv(root / "all.csv", index=False)
    return {f"H{k}": {"site": f"H{k}", "data": str(root / f"H{k}.csv"), "folder": str(root / f"site-H{k}")}
            for k in range(len(sizes))}


COMBAT_STUDY = """methods = ["fedavg", "fedprox"]
seed = 5
repeats = 1
[training]
rounds = 3
local_steps = 2
[data]
site_column = "hospital"
label_column = "dx"
covariates = ["age", "sex"]
[harmonize]
method = "combat"
[deploy]
sites = ["H0", "H1", "H2"]
"""


def _harmonizing_messages(link):
    """The setup and harmonization messages the link carried: (op, step) -> [(site, request, answer)]."""
    by_step = {}
    for op, step, site, request, answer in link.seen:
        if op in ("setup", "harmonize"):
            by_step.setdefault((op, step), []).append((site, request, answer))
    return by_step


def _largest_statistic(by_step):
    """The most elements any array of a harmonization statistic or fit carries (not the study payload)."""
    later = [m for (op, _), seen in by_step.items() if op == "harmonize" for m in seen]
    parts = [a["harmonize"] for _, _, a in by_step[("setup", None)]]
    parts += [r.get("location", r.get("model")) for _, r, _ in later] + [a for _, _, a in later]
    return max(_array_sizes(parts))


@pytest.mark.parametrize("eb", [True, False])
def test_a_deployed_combat_study_equals_its_simulation_and_shares_only_statistics(tmp_path, eb):
    from medfed.data.harmonize import (
        CombatDesignStats,
        CombatLocation,
        CombatModel,
        CombatResidualStats,
    )

    nodes = _covariate_tables(tmp_path)
    study = tmp_path / "study.toml"
    study.write_text(COMBAT_STUDY.replace('method = "combat"', f'method = "combat"\neb = {str(eb).lower()}'))
    link = _RecordingLink(nodes)
    deployed = drive(link, study, tmp_path / "out", log=lambda m: None)
    simulated = _simulate(study, "--data", tmp_path / "all.csv", tmp_path / "sim")
    assert _rows(deployed) == _rows(simulated)
    assert deployed["histories"].keys() == simulated["histories"].keys()
    for setting, h in simulated["histories"].items():
        assert deployed["histories"][setting]["train_loss"] == h["train_loss"]
    assert not (tmp_path / "out" / "models" / "FedAvg.npz").exists()  # it would score unharmonized rows
    fit = deployed["harmonization"]["fit"]
    assert fit["empirical_bayes"] is eb and sorted(fit["sites"]) == ["H0", "H1", "H2"]
    plain = tmp_path / "plain.toml"  # harmonization changed the numbers: the exchange was not skipped
    plain.write_text(COMBAT_STUDY.replace('method = "combat"', 'method = "none"'))
    assert _rows(drive(LoopbackLink(nodes), plain, tmp_path / "out-plain", log=lambda m: None)) != _rows(deployed)
    # what crossed: the statistics dataclasses, each site's own, smaller than any site's rows
    by_step = _harmonizing_messages(link)
    assert all(isinstance(a["harmonize"], CombatDesignStats) and a["harmonize"].site == s
               for s, _, a in by_step[("setup", None)])
    assert all(isinstance(r["location"], CombatLocation) and isinstance(a, CombatResidualStats) and a.site == s
               for s, r, a in by_step[("harmonize", "residuals")])
    for site, request, answer in by_step[("harmonize", "apply")]:
        assert isinstance(request["model"], CombatModel) and [e.site for e in request["model"].sites] == [site]
        assert set(answer) == {"moments"}
    assert _largest_statistic(by_step) <= 3 * 4  # sites x features, or (1 + covariates) x features; rows: >= 25


def test_a_deployed_frequency_study_equals_its_simulation_and_shares_only_amplitudes(tmp_path):
    """Image manifests harmonized in the frequency domain: the same metrics and losses as
    `medfed run --manifest`; the sites share their mean low-band amplitudes, no image."""
    pytest.importorskip("torch")
    from medfed.data.frequency import AmplitudeStats, FrequencyModel

    study, nodes = _image_study(tmp_path, '[harmonize]\nmethod = "frequency"\nband = 0.2\nstrength = 0.8\n')
    link = _RecordingLink(nodes)
    deployed = drive(link, study, tmp_path / "out", log=lambda m: None)
    simulated = _simulate(study, "--manifest", tmp_path / "all.csv", tmp_path / "sim")
    assert _rows(deployed) == _rows(simulated)
    assert deployed["histories"]["FedAvg"]["train_loss"] == simulated["histories"]["FedAvg"]["train_loss"]
    (tmp_path / "plain").mkdir()
    plain, _ = _image_study(tmp_path / "plain")  # harmonization changed the numbers: the exchange was not skipped
    unharmonized = drive(LoopbackLink(nodes), plain, tmp_path / "out-plain", log=lambda m: None)
    assert unharmonized["histories"]["FedAvg"]["train_loss"] != deployed["histories"]["FedAvg"]["train_loss"]
    fitted_on = deployed["harmonization"]["fit"]["images"]
    assert sorted(fitted_on) == ["hospital-0", "hospital-1"] and all(0 < n < 14 for n in fitted_on.values())
    by_step = _harmonizing_messages(link)
    assert all(isinstance(a["harmonize"], AmplitudeStats) for _, _, a in by_step[("setup", None)])
    assert all(isinstance(r["model"], FrequencyModel) and set(a) == {"moments"}
               for _, r, a in by_step[("harmonize", "apply")])
    assert ("harmonize", "residuals") not in by_step  # one exchange of statistics
    assert _largest_statistic(by_step) < 10 * 10  # a band of one image's spectrum: less than an image


def test_a_harmonized_study_refuses_a_site_without_a_covariate_and_fits_without_it(tmp_path):
    nodes = _covariate_tables(tmp_path)
    study = tmp_path / "study.toml"
    study.write_text(COMBAT_STUDY.replace('["fedavg", "fedprox"]', '["fedavg"]'))
    pd.read_csv(nodes["H1"]["data"]).drop(columns=["age"]).to_csv(tmp_path / "bad.csv", index=False)
    nodes["H1"]["data"] = str(tmp_path / "bad.csv")
    logged = []
    doc = drive(LoopbackLink(nodes), study, tmp_path / "out", log=logged.append)
    assert sorted(doc["harmonization"]["fit"]["sites"]) == ["H0", "H2"]
    assert any("H1" in line and "'age'" in line for line in logged), logged
    two = tmp_path / "two.toml"  # H1 refused, one site left: nothing to harmonize between, refused before training
    two.write_text(COMBAT_STUDY.replace('["H0", "H1", "H2"]', '["H0", "H1"]').replace("[deploy]", "[deploy]\nmin_sites = 1"))
    with pytest.raises(ConfigError, match="removes differences between sites; only 1 site joined"):
        drive(LoopbackLink(nodes), two, tmp_path / "out2", log=lambda m: None)


def test_a_fresh_site_or_coordinator_process_can_decode_the_harmonization_messages():
    """Flower starts a ClientApp process per message: the statistics' wire types must be known
    once the site's (and the coordinator's) module is imported, before a request is decoded."""
    import subprocess
    import sys

    names = ["CombatDesignStats", "CombatLocation", "CombatResidualStats", "CombatModel", "AmplitudeStats",
             "FrequencyModel"]
    for module in ("medfed.deploy.site", "medfed.deploy.coordinator"):
        code = (f"import {module}; from medfed.wiretypes import wire_class; "
                f"print([n for n in {names!r} if wire_class(n) is None])")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "[]", (module, out.stdout, out.stderr)


def test_a_deployed_study_whose_targets_its_site_files_cannot_hold_is_refused_in_one_line(tmp_path):
    from medfed.deploy.study import load_study

    study = tmp_path / "seg.toml"
    study.write_text(STUDY.replace('[data]\n', '[data]\ntask = "segmentation"\n'))
    with pytest.raises(ConfigError, match=r"a segmentation task reads each image's mask from a manifest's mask column; "
                                          r"set \[deploy\] site_files = \"manifest\"$"):
        load_study(study)
    study.write_text(STUDY.replace('label_column = "target"', 'label_columns = ["a", "b"]')
                     .replace("[deploy]\n", '[deploy]\nsite_files = "manifest"\n').replace('impute = "median"\n', ""))
    with pytest.raises(ConfigError, match=r"label_columns \(a multilabel task\) name a table's columns"):
        load_study(study)
