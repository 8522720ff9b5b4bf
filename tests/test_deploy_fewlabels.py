"""Few-label methods in a deployed study (loopback link): a site's unlabeled rows and its own
teacher file, with the numbers of ``medfed run`` on the pooled file."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from deploy_support import HEART_SITES, heart_study, site_tables
from typer.testing import CliRunner

from medfed.cli.app import app
from medfed.deploy.coordinator import drive
from medfed.deploy.loopback import LoopbackLink
from medfed.errors import ConfigError

SITES = HEART_SITES


def _few_labels(site, df, target):
    """Every third row of a site unlabeled (an empty cell), as a hospital's table may hold them."""
    return np.where(np.arange(len(df)) % 3 == 0, "", target.astype(str))


def _nodes(root, workdirs=None):
    return {s: {"site": s, "data": str(root / f"{s}.csv"), "folder": str(root / f"site-{s}"),
                **({"workdir": str(workdirs[s])} if workdirs else {})} for s in SITES}


def _simulate(root, study, *flags):
    result = CliRunner().invoke(app, ["run", str(study), "--data", str(root / "all.csv"), "--out", str(root / "sim"),
                                      *flags])
    assert result.exit_code == 0, result.output
    return json.loads((root / "sim" / "results.json").read_text())


def _rows(doc):
    return {(r["setting"], r["test_site"], r["model"]): r["metrics"] for r in doc["results"]}


def test_deployed_semisupervised_on_tables_with_empty_label_cells_equals_its_simulation(tmp_path):
    """Each site prepares its unlabeled rows as medfed run does (imputed and globally scaled from the
    labeled rows' moments only) and its program learns from them: the same losses, metrics and
    per-site counts of unlabeled rows as the simulation of the pooled file."""
    site_tables(tmp_path, label_of=_few_labels)
    study = tmp_path / "study.toml"
    study.write_text(heart_study(["fedavg", "semisupervised"], options={"semisupervised": "threshold = 0.6"}))
    deployed = drive(LoopbackLink(_nodes(tmp_path)), study, tmp_path / "out", log=lambda m: None)
    simulated = _simulate(tmp_path, study)
    assert deployed["histories"]["SemiSup"]["train_loss"] == simulated["histories"]["SemiSup"]["train_loss"]
    # the unlabeled rows reached the sites' programs: the losses part from FedAvg's
    assert deployed["histories"]["SemiSup"]["train_loss"] != deployed["histories"]["FedAvg"]["train_loss"]
    assert _rows(deployed) == _rows(simulated)
    # each site's labeled and unlabeled rows, as the simulation reports them
    assert deployed["sites"] == simulated["sites"] and all(s["n_unlabeled"] for s in deployed["sites"])
    note = [w for w in deployed["warnings"] if "unlabeled training rows" in w]
    assert note == [w for w in simulated["warnings"] if "unlabeled training rows" in w]
    held = {s: int((pd.read_csv(tmp_path / f"{s}.csv")["target"].isna()).sum()) for s in SITES}
    assert note[0].startswith(f"{sum(held.values())} unlabeled training rows ("
                              + ", ".join(f"{s}: {n}" for s, n in held.items()))


def _teacher(root) -> str:
    """A teacher as medfed run --save-model writes it: Mix on the pooled labeled file."""
    site_tables(root)
    result = CliRunner().invoke(app, ["run", "--data", str(root / "all.csv"), "--site-column", "site",
                                      "--label-column", "target", "--impute", "median", "--methods", "mix",
                                      "--rounds", "3", "--save-model", "--out", str(root / "teach")])
    assert result.exit_code == 0, result.output
    return str(root / "teach" / "models" / "Mix.npz")


def _distill_study(root):
    study = root / "study.toml"
    # relative: each site resolves it against its own directory; the coordinator's has no such file
    study.write_text(heart_study(["fedavg", "distill"], options={"distill": 'teacher = "models/teacher.npz"\nweight = 0.7'}))
    return study


def _site_dirs(root, teacher, without=()):
    dirs = {s: root / f"machine-{s}" for s in SITES}
    for s, d in dirs.items():
        (d / "models").mkdir(parents=True)
        if s not in without:
            shutil.copy(teacher, d / "models" / "teacher.npz")
    return dirs


def test_deployed_distill_with_each_site_holding_its_teacher_equals_its_simulation(tmp_path):
    """Each site loads the teacher from its own machine (the study's relative path, resolved against
    the site's directory); the coordinator, whose directory has no such file, never reads it."""
    teacher = _teacher(tmp_path)
    study = _distill_study(tmp_path)
    deployed = drive(LoopbackLink(_nodes(tmp_path, _site_dirs(tmp_path, teacher))), study, tmp_path / "out",
                     log=lambda m: None)
    pooled = tmp_path / "pooled.toml"  # medfed run resolves the teacher where it runs: the same file
    pooled.write_text(study.read_text().replace('"models/teacher.npz"', json.dumps(teacher)))
    simulated = _simulate(tmp_path, pooled)
    assert deployed["histories"]["Distill"]["train_loss"] == simulated["histories"]["Distill"]["train_loss"]
    assert deployed["histories"]["Distill"]["train_loss"] != deployed["histories"]["FedAvg"]["train_loss"]
    assert _rows(deployed) == _rows(simulated)


def test_a_site_missing_its_teacher_stops_the_study_before_training_naming_the_site_and_path(tmp_path):
    teacher = _teacher(tmp_path)
    study = _distill_study(tmp_path)
    dirs = _site_dirs(tmp_path, teacher, without=("Hungary",))
    with pytest.raises(ConfigError) as raised:
        drive(LoopbackLink(_nodes(tmp_path, dirs)), study, tmp_path / "out", log=lambda m: None)
    message = str(raised.value)
    assert "\n" not in message and "'Hungary'" in message
    assert str(dirs["Hungary"] / "models" / "teacher.npz") in message and "does not exist" in message
    assert not any((tmp_path / f"site-{s}" / "runs").exists() for s in SITES)  # no site trained a round
    # a file that is no medfed model stops it too, by site and file
    (dirs["Hungary"] / "models" / "teacher.npz").write_bytes(b"not a model")
    with pytest.raises(ConfigError, match=r"^site 'Hungary': .*teacher\.npz"):
        drive(LoopbackLink(_nodes(tmp_path, dirs)), study, tmp_path / "out2", log=lambda m: None)


def _contrastive_study(root, sites):
    """A deployed contrastive study (2 pretraining rounds, then 2 FedAvg rounds) of the PNG manifests."""
    study = root / "images.toml"
    study.write_text(f'''methods = ["fedavg", "contrastive"]
model = "cnn2d"
seed = 1
repeats = 1
[model_options]
channels = [4, 4]
[training]
rounds = 2
local_steps = 2
[data]
site_column = "site"
label_column = "label"
[method_options.contrastive]
pretrain_rounds = 2
projection = 8
[deploy]
sites = {json.dumps(list(sites))}
site_files = "manifest"
''')
    return study


def _image_nodes(root, sites, folder="site"):
    return {s: {"site": s, "data": str(root / f"{s}.csv"), "folder": str(root / f"{folder}-{s}")} for s in sites}


def test_deployed_contrastive_pretrains_over_the_link_and_equals_its_simulation(tmp_path):
    """Phase 1 (NT-Xent on every row, labeled or not) runs over the link, then the fine-tuning method
    from its final model: the simulation's losses, metrics and communication (phase 1's rounds and
    bytes counted); pretraining moved the model away from plain FedAvg."""
    pytest.importorskip("torch")
    from deploy_support import site_manifests

    sites = site_manifests(tmp_path, unlabeled=(0, 3, 6, 9))
    study = _contrastive_study(tmp_path, sites)
    deployed = drive(LoopbackLink(_image_nodes(tmp_path, sites)), study, tmp_path / "out", log=lambda m: None)
    result = CliRunner().invoke(app, ["run", str(study), "--manifest", str(tmp_path / "all.csv"),
                                      "--out", str(tmp_path / "sim")])
    assert result.exit_code == 0, result.output
    simulated = json.loads((tmp_path / "sim" / "results.json").read_text())
    for what in ("train_loss", "communication_rounds", "bytes_up_per_run"):
        assert deployed["histories"]["Contrastive"][what] == simulated["histories"]["Contrastive"][what], what
    assert deployed["histories"]["Contrastive"]["communication_rounds"] == 4  # 2 pretraining + 2 fine-tuning
    assert deployed["histories"]["Contrastive"]["train_loss"] != deployed["histories"]["FedAvg"]["train_loss"]
    assert _rows(deployed) == _rows(simulated)


def test_a_site_whose_state_dict_teacher_does_not_fit_the_model_stops_the_study(tmp_path):
    """A torch state dict teacher is checked at each site against the study's model (the site's own
    copy; the coordinator never reads it): a wrong shape is one line naming the site, the key and
    the shape it expects."""
    torch = pytest.importorskip("torch")
    site_tables(tmp_path)
    study = tmp_path / "study.toml"
    study.write_text(heart_study(["fedavg", "distill"], options={"distill": 'teacher = "models/teacher.pt"\nweight = 0.7'}))
    dirs = {s: tmp_path / f"machine-{s}" for s in SITES}
    for d in dirs.values():
        (d / "models").mkdir(parents=True)
        torch.save({"weight": torch.zeros(2), "bias": torch.zeros(())}, d / "models" / "teacher.pt")
    with pytest.raises(ConfigError) as raised:
        drive(LoopbackLink(_nodes(tmp_path, dirs)), study, tmp_path / "out", log=lambda m: None)
    message = str(raised.value)
    assert "\n" not in message and message.startswith("site '") and "teacher.pt" in message, message
    assert "'weight' has shape (2,), expected (10,)" in message, message
    assert not any((tmp_path / f"site-{s}" / "runs").exists() for s in SITES)


class _CoordinatorDied(Exception):
    pass


@pytest.mark.parametrize("fatal", [7, 9], ids=["in pretraining", "in fine-tuning"])
def test_a_deployed_contrastive_study_resumes_bit_identically(tmp_path, fatal):
    """The coordinator dies in contrastive's pretraining phase (its 2nd round) or in its fine-tuning
    (FedAvg's 4 site trainings come first, 2 sites a round); --resume gives the whole run's numbers."""
    pytest.importorskip("torch")
    from deploy_support import site_manifests

    from medfed.comm.wire import decode

    sites = site_manifests(tmp_path, unlabeled=(0, 3, 6, 9))
    study = _contrastive_study(tmp_path, sites)
    whole = drive(LoopbackLink(_image_nodes(tmp_path, sites, "a")), study, tmp_path / "whole", log=lambda m: None)
    trains = {"n": 0}

    def die(site, payload):
        if decode(payload)["op"] == "train":
            trains["n"] += 1
            if trains["n"] == fatal:
                raise _CoordinatorDied
        return None

    nodes = _image_nodes(tmp_path, sites, "b")
    with pytest.raises(_CoordinatorDied):
        drive(LoopbackLink(nodes, die), study, tmp_path / "out", log=lambda m: None)
    resumed = drive(LoopbackLink(nodes), study, tmp_path / "out", resume=True, log=lambda m: None)
    assert trains["n"] == fatal
    assert resumed["histories"] == whole["histories"]
    assert _rows(resumed) == _rows(whole)
