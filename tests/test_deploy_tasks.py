"""Deployed studies of every task over the loopback link: the labels exchange agrees on the task
and the classes, each site codes its labels against them, and the numbers equal simulation's."""

import json

import numpy as np
import pytest
from deploy_support import heart_study, site_tables

from medfed.deploy.coordinator import drive
from medfed.deploy.loopback import LoopbackLink
from medfed.errors import ConfigError
from medfed.experiments.saved_model import load_saved_model

SITES = ("Cleveland", "Hungary", "Switzerland")


def _study(data: str, methods=("fedavg", "ditto")) -> str:
    return heart_study(methods, data=data, seed=5, sites=SITES)


def _tables(root, label_of) -> None:
    """The three site files and all.csv with the label column ``label`` holding ``label_of(site
    name, features, 0/1 target)``."""
    site_tables(root, "label", label_of)

def _nodes(root, tmp, files=None):
    return {s: {"site": s, "data": str((files or {}).get(s, root / f"{s}.csv")), "folder": str(tmp / f"site-{s}")}
            for s in SITES}


def _simulate(study, source_flag, source, out, *flags):
    from typer.testing import CliRunner

    from medfed.cli.app import app

    result = CliRunner().invoke(app, ["run", str(study), source_flag, str(source), "--out", str(out), *flags])
    assert result.exit_code == 0, result.output
    return json.loads((out / "results.json").read_text())


def _rows(doc):
    return {(r["setting"], r["test_site"], r["model"]): (r["metrics"], r.get("per_class")) for r in doc["results"]}


def _same_numbers(deployed, simulated):
    assert _rows(deployed) == _rows(simulated)
    for key in ("task", "classes", "metrics", "sites"):
        assert deployed[key] == simulated[key], key
    for setting, h in simulated["histories"].items():
        assert deployed["histories"][setting]["train_loss"] == h["train_loss"]


def _three_classes(site, df, target):
    # names whose sorted order is not any one site's order of appearance; Switzerland holds no "b-older"
    older = df["age"].to_numpy() > 55
    names = np.where(target == 1, "c-disease", np.where(older & (site != "Switzerland"), "b-older", "a-young"))
    return names


def test_a_deployed_multiclass_study_equals_its_simulation_with_a_site_missing_a_class(tmp_path):
    _tables(tmp_path, _three_classes)
    study = tmp_path / "study.toml"
    # fedsld: each site's label counts cover all three classes (a 0 for Switzerland's missing one)
    study.write_text(_study('label_column = "label"\ntask = "multiclass"', methods=("fedavg", "ditto", "fedsld")))
    deployed = drive(LoopbackLink(_nodes(tmp_path, tmp_path)), study, tmp_path / "out", log=lambda m: None)
    simulated = _simulate(study, "--data", tmp_path / "all.csv", tmp_path / "sim")
    _same_numbers(deployed, simulated)
    assert deployed["classes"] == ["a-young", "b-older", "c-disease"]
    swiss = next(s for s in deployed["sites"] if s["name"] == "Switzerland")
    assert swiss["class_counts"]["b-older"] == 0 and swiss["class_counts"]["c-disease"] > 0
    assert any("'Switzerland' has no rows of class 'b-older'" in w for w in deployed["warnings"])
    assert {"acc", "balanced_acc", "macro_f1", "macro_auc"} <= set(deployed["metrics"])


def test_a_deployed_study_infers_the_task_from_every_sites_labels_and_logs_it(tmp_path):
    # every site holds all three classes (a site's own two class names alone would be ambiguous)
    _tables(tmp_path, lambda site, df, target: _three_classes("every", df, target))
    study = tmp_path / "study.toml"
    study.write_text(_study('label_column = "label"', methods=("fedavg",)))
    logged = []
    deployed = drive(LoopbackLink(_nodes(tmp_path, tmp_path)), study, tmp_path / "out", log=logged.append)
    simulated = _simulate(study, "--data", tmp_path / "all.csv", tmp_path / "sim")
    _same_numbers(deployed, simulated)
    assert deployed["task_source"] == simulated["task_source"] == "the label column holds 3 class names"
    assert "task: multiclass (the label column holds 3 class names)" in logged


def test_sites_whose_labels_read_as_different_tasks_stop_the_study_in_one_line(tmp_path):
    # Switzerland holds two of the classes only: its own labels alone read as ambiguous, the others' as multiclass
    _tables(tmp_path, lambda site, df, target: np.where(target == 1, "1", "0") if site == "Switzerland"
            else _three_classes(site, df, target))
    study = tmp_path / "study.toml"
    study.write_text(_study('label_column = "label"', methods=("fedavg",)))
    with pytest.raises(ConfigError, match=r"^the sites' labels read as different tasks \(Cleveland: multiclass .*"
                                          r"Switzerland: binary .*\); say which in STUDY.toml's \[data\] task"):
        drive(LoopbackLink(_nodes(tmp_path, tmp_path)), study, tmp_path / "out", log=lambda m: None)
    # said once in STUDY.toml, the same files run: Switzerland's 0/1 are two of the federation's classes
    study.write_text(_study('label_column = "label"\ntask = "multiclass"', methods=("fedavg",)))
    doc = drive(LoopbackLink(_nodes(tmp_path, tmp_path)), study, tmp_path / "out", log=lambda m: None)
    assert doc["classes"] == ["0", "1", "a-young", "b-older", "c-disease"]


@pytest.mark.parametrize("standardize", [True, False])
def test_a_deployed_regression_study_equals_its_simulation(tmp_path, standardize):
    # a target in years (about 30-80): standardized, it trains on the pooled scale of every site's targets
    _tables(tmp_path, lambda site, df, target: df["age"].to_numpy() + 10.0 * target)
    study = tmp_path / "study.toml"
    study.write_text(_study('label_column = "label"\ntask = "regression"\nexclude = ["age"]\n'
                            f'standardize_target = {str(standardize).lower()}'))
    deployed = drive(LoopbackLink(_nodes(tmp_path, tmp_path)), study, tmp_path / "out", log=lambda m: None)
    simulated = _simulate(study, "--data", tmp_path / "all.csv", tmp_path / "sim")
    _same_numbers(deployed, simulated)
    assert deployed["target_scale"] == simulated["target_scale"]
    assert deployed["target_scale"]["standardized"] is standardize
    assert {"mae", "rmse", "r2", "pearson_r"} <= set(deployed["metrics"])
    assert all(r["metrics"]["mae"]["mean"] is not None for r in deployed["results"])
    # the deployed run keeps its global model, with the scale its predictions are mapped back by
    saved = load_saved_model(tmp_path / "out" / "models" / "FedAvg.npz")
    assert saved.meta["task"] == "regression"
    scale = deployed["target_scale"]["repeats"][0][0] if standardize else {"mean": 0.0, "std": 1.0}
    assert saved.meta["target_scale"] == {"mean": scale["mean"], "std": scale["std"]}


# --------------------------------------------------------------------------- image manifests with masks


def _mask_manifests(tmp_path, mask_of=None):
    """Two hospitals' tiny PNG images and masks (labels 0/3/7; hospital A's masks hold no 7), a
    manifest per site and pooled (all.csv), and a U-Net segmentation study."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = {"A": [], "B": []}
    for s in rows:
        for i in range(10):
            mask = np.zeros((16, 16), np.uint8)
            mask[2:6, 2 + i % 4:8] = 3
            mask[9:13, 8:12] = 7 if (s == "B" and i % 2) else 0
            img = (rng.integers(0, 40, (16, 16)) + 100 * (mask > 0)).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / f"{s}{i}.png")
            Image.fromarray(mask if mask_of is None else mask_of(s, i, mask)).save(tmp_path / f"{s}{i}_mask.png")
            rows[s].append(f"{s}{i}.png,{s}{i}_mask.png,{s}")
    for s, lines in rows.items():
        (tmp_path / f"{s}.csv").write_text("path,mask,site\n" + "\n".join(lines) + "\n")
    (tmp_path / "all.csv").write_text("path,mask,site\n" + "\n".join(rows["A"] + rows["B"]) + "\n")
    study = tmp_path / "seg.toml"
    study.write_text('''methods = ["fedavg"]
model = "unet2d"
seed = 2
repeats = 1
[model_options]
norm = "group"
channels = [4, 8]
[training]
rounds = 2
local_steps = 2
[data]
site_column = "site"
mask_column = "mask"
[deploy]
sites = ["A", "B"]
site_files = "manifest"
''')
    return study, {s: {"site": s, "data": str(tmp_path / f"{s}.csv"), "folder": str(tmp_path / f"site-{s}")}
                   for s in rows}


def test_a_deployed_segmentation_study_reads_each_sites_masks_and_equals_its_simulation(tmp_path):
    pytest.importorskip("monai")
    study, nodes = _mask_manifests(tmp_path)
    deployed = drive(LoopbackLink(nodes), study, tmp_path / "out", log=lambda m: None)
    simulated = _simulate(study, "--manifest", tmp_path / "all.csv", tmp_path / "sim")
    _same_numbers(deployed, simulated)
    # A holds classes background and 3 only; coded against the federation's, its 3 is class 1 as at B
    assert deployed["classes"] == ["background", "3", "7"]
    assert [s["images_with"] for s in deployed["sites"]] == [{"background": 10, "3": 10, "7": 0},
                                                            {"background": 10, "3": 10, "7": 5}]


def test_a_deployed_site_whose_mask_is_off_its_images_grid_is_refused_by_both_files(tmp_path):
    study, nodes = _mask_manifests(tmp_path, mask_of=lambda s, i, m: np.pad(m, ((0, 0), (0, 4))) if (s, i) == ("B", 3)
                                   else m)
    logged = []
    doc = drive(LoopbackLink(nodes), study, tmp_path / "out", log=logged.append)
    assert [s["name"] for s in doc["sites"]] == ["A"]  # B's file is refused at the site, by both files' names
    refusal = next(line for line in logged if line.startswith("refused site B: "))
    assert "B3_mask.png: is a mask of spatial shape 16×20 while its image" in refusal and "B3.png has 16×16" in refusal
