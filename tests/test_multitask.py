"""Federated multi-task learning (METHODS.md `multitask`; Smith et al., 2017; Huang et al., 2022b):
with one task it equals FedPer; task heads never leave their sites; sites with different targets
come from a table's per-site label columns (--label-column-site) or mni-phantom task=multitask."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from test_partial_sharing import Spy
from typer.testing import CliRunner

torch = pytest.importorskip("torch")

from medfed.cli.app import app
from medfed.client import LocalData, LocalTraining
from medfed.comm import UploadBoundary
from medfed.data.datasets import load_dataset
from medfed.data.tables import load_table
from medfed.engine import run_federated
from medfed.errors import ConfigError, DataError
from medfed.experiments.config import TrainingSpec, build_config
from medfed.experiments.metrics import binary_metrics
from medfed.methods.method import context_for
from medfed.methods.registry import METHODS, resolve
from medfed.models.registry import is_head, is_norm_statistic, make_model
from medfed.rng import KeyedRng

pytestmark = pytest.mark.usefixtures("torch_one_thread")
runner = CliRunner()
SITES = ("a", "b", "c")


def _algorithm(name, **opts):
    method, options = resolve(name, opts)
    return method.build(options, TrainingSpec(), context_for(list(SITES)))


def _local_sites(targets):
    """Three small sites with 6 features; ``targets[k]`` picks which feature decides site k's label
    (one task for all: the same index everywhere)."""
    sites = []
    for k, (name, feature) in enumerate(zip(SITES, targets)):
        rng = np.random.default_rng(10 + k)
        X = rng.normal(size=(24 + 4 * k, 6))
        sites.append(LocalData(name, X, (X[:, feature] > 0).astype(np.float64)))
    return sites


def _run(algorithm, sites, spy=None, rounds=3):
    model = make_model("mlp", (6,), hidden=(5,))
    init = model.init_params((6,), KeyedRng(0))
    training = LocalTraining(model, 0.1, 3, 8, 1e-3)
    boundary = UploadBoundary([spy]) if spy is not None else None
    return model, init, run_federated(algorithm, init, sites, training, rounds, KeyedRng(1), boundary=boundary)


def test_with_one_task_multitask_equals_fedper_bit_for_bit():
    sites = _local_sites((0, 0, 0))
    model, _, fedper = _run(_algorithm("fedper"), sites)
    _, _, multitask = _run(_algorithm("multitask"), sites)
    for k in fedper.params:
        np.testing.assert_array_equal(multitask.params[k], fedper.params[k])
    for s in sites:
        for k in fedper.personal[s.name]:
            np.testing.assert_array_equal(multitask.personal[s.name][k], fedper.personal[s.name][k])
        scores = model.predict_proba(multitask.personal[s.name], s.X)
        np.testing.assert_array_equal(scores, model.predict_proba(fedper.personal[s.name], s.X))
        assert binary_metrics(s.y, scores) == binary_metrics(s.y, model.predict_proba(fedper.personal[s.name], s.X))
    assert [(r.train_loss, r.bytes_up) for r in multitask.history] == [(r.train_loss, r.bytes_up) for r in fedper.history]


def test_with_different_tasks_uploads_never_carry_a_head_and_each_site_keeps_its_own():
    spy = Spy()
    sites = _local_sites((0, 3, 5))
    _, init, run = _run(_algorithm("multitask"), sites, spy=spy)
    assert len(spy.uploads) == 9
    body = {k for k in init if not is_head(k)}
    assert body and all(set(u.payload) == body for u in spy.uploads)
    for k in init:
        if is_head(k):  # the server never saw a head: its copy stays at the initial values
            np.testing.assert_array_equal(run.params[k], init[k])
    heads = [run.personal[s.name]["head.weight"] for s in sites]
    assert not np.allclose(heads[0], heads[1]) and not np.allclose(heads[1], heads[2])
    for s in sites:  # each personal model: the averaged encoder with the site's own head
        for k in body - {k for k in body if is_norm_statistic(k)}:  # statistics: recomputed on the site's rows
            np.testing.assert_array_equal(run.personal[s.name][k], run.params[k])


def test_the_method_is_registered_as_a_personal_method_with_fedpers_private_parts():
    spec = METHODS["multitask"]
    assert spec.personal and not spec.global_model and spec.uploads == "delta" and spec.family == "survey §3.2"
    assert "Smith et al., 2017" in spec.reference and "Huang et al., 2022b" in spec.reference
    assert _algorithm("multitask", private="decoder").private("up.0.conv.weight")
    with pytest.raises(ConfigError, match="option 'private'"):
        _algorithm("multitask", private="body")


def test_a_model_without_a_head_body_split_is_refused():
    model = make_model("torch_logistic", (6,))
    sites = _local_sites((0, 3, 5))
    with pytest.raises(ConfigError, match="multitask: every parameter of model .* nothing is left to share"):
        run_federated(_algorithm("multitask"), model.init_params((6,), KeyedRng(0)), sites,
                      LocalTraining(model, 0.1, 2, 8), 1, KeyedRng(0))


# --------------------------------------------------------------------------- tables


def _table(path, rows=12):
    """Sites a and c label column 'adhd', site b column 'asd' (empty where the site's task is not
    the column's); 'score' a regression target, 'grade' three classes."""
    rng = np.random.default_rng(5)
    lines = ["site,f1,f2,adhd,asd,score,grade"]
    for s in SITES:
        for i in range(rows):
            f1, f2 = rng.normal(size=2)
            adhd = "" if s == "b" else int(i % 2)
            asd = int(i % 3 == 0) if s == "b" else ""
            lines.append(f"{s},{f1:.3f},{f2:.3f},{adhd},{asd},{rng.normal():.3f},{'xyz'[i % 3]}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_each_site_reads_its_own_label_column_and_no_label_column_is_a_feature(tmp_path):
    path = _table(tmp_path / "t.csv")
    fed = load_table(path, site_column="site", label_column="adhd", label_column_site={"b": "asd"},
                     exclude=["score", "grade"])
    assert fed.feature_names == ("f1", "f2")
    assert fed.info["site_targets"] == {"a": "adhd", "b": "asd", "c": "adhd"}
    by_name = {s.name: s for s in fed.sites}
    np.testing.assert_array_equal(by_name["a"].y, np.arange(12) % 2)
    np.testing.assert_array_equal(by_name["b"].y, (np.arange(12) % 3 == 0).astype(int))
    assert fed.task == "binary" and all(s.unlabeled is None or not s.unlabeled.any() for s in fed.sites)
    # every site named: no --label-column needed; an empty cell of a site's own column is an unlabeled row
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace(",0,,", ",,,")  # site a's first row loses its adhd label
    path.write_text("\n".join(lines) + "\n")
    fed = load_table(path, site_column="site", label_column_site={"a": "adhd", "b": "asd", "c": "adhd"},
                     exclude=["score", "grade"])
    assert fed.sites[0].unlabeled[0] and fed.sites[0].unlabeled.sum() == 1


@pytest.mark.parametrize("kwargs, error, message", [
    ({"label_column_site": {"z": "asd"}}, DataError,
     r"t\.csv: --label-column-site z=\.\.\.: no site 'z' in site column 'site'; its sites: 'a', 'b', 'c'"),
    ({"label_column_site": {"b": "nope"}}, DataError,
     r"t\.csv: .*column 'nope' \(--label-column-site\) is not in the file"),
    ({"label_column_site": {"b": "score"}}, DataError,
     r"t\.csv: --label-column-site: the sites' label columns read as different tasks \(sites 'a', 'c' column "
     r"'adhd' reads as binary with positive '1'; site 'b' column 'score' reads as regression\)"),
    ({"label_column_site": {"b": "grade"}, "task": "multiclass"}, DataError,
     r"site 'b' column 'grade' reads as multiclass with classes \['x', 'y', 'z'\]"),
    ({"label_column_site": {"b": "site"}}, ConfigError, r"--label-column-site b=site: 'site' is the --site-column"),
    ({"label_column_site": {"b": "asd"}, "label_column": None, "label_columns": ["adhd", "asd"]}, ConfigError,
     "--label-column-site gives each site one label column; a multilabel task's --label-columns"),
])
def test_bad_per_site_label_columns_are_one_clear_error(tmp_path, kwargs, error, message):
    path = _table(tmp_path / "t.csv")
    unused = [c for c in ("asd", "score", "grade") if c not in kwargs["label_column_site"].values()]
    with pytest.raises(error, match=message):
        load_table(path, **{"site_column": "site", "label_column": "adhd", "exclude": unused, **kwargs})


def test_a_site_left_without_a_label_column_is_named(tmp_path):
    path = _table(tmp_path / "t.csv")
    with pytest.raises(DataError, match="site 'a' has no label column: name it with --label-column-site a=COL"):
        load_table(path, site_column="site", label_column_site={"b": "asd"}, exclude=["adhd", "score", "grade"])


def test_per_site_label_columns_apply_to_tables_only():
    with pytest.raises(Exception, match="--label-column-site .* applies to a table given with --data"):
        build_config({"data": {"dataset": "mni-phantom", "label_column_site": {"site-1": "x"}}})


# --------------------------------------------------------------------------- mni-phantom


def test_mni_phantom_multitask_sites_draw_their_own_disease_deterministically():
    small = {"n_per_site": 10, "size": 8, "n_sites": 3}
    fed = load_dataset("mni-phantom", task="multitask", **small)
    assert fed.task == "binary" and fed.info["site_targets"] == {"site-1": "atrophy", "site-2": "lesion",
                                                                 "site-3": "atrophy"}
    single = {t: load_dataset("mni-phantom", task=t, **small) for t in ("atrophy", "lesion")}
    for site, disease in zip(fed.sites, ("atrophy", "lesion", "atrophy")):  # site k draws what task=disease draws
        np.testing.assert_array_equal(site.X, single[disease].sites[int(site.name[-1]) - 1].X)
        np.testing.assert_array_equal(site.y, single[disease].sites[int(site.name[-1]) - 1].y)
    assert not np.array_equal(fed.sites[1].X, single["atrophy"].sites[1].X)  # site-2's images hold lesions
    again = load_dataset("mni-phantom", task="multitask", **small)
    assert all(np.array_equal(a.X, b.X) and np.array_equal(a.y, b.y) for a, b in zip(fed.sites, again.sites))
    other = load_dataset("mni-phantom", task="multitask", seed=1, **small)
    assert not np.array_equal(fed.sites[0].X, other.sites[0].X)
    cycled = load_dataset("mni-phantom", task="multitask", site_tasks="lesion", **small)
    assert set(cycled.info["site_targets"].values()) == {"lesion"}


@pytest.mark.parametrize("options, message", [
    ({"task": "multitask", "site_tasks": "atrophy,tumour"}, "option 'site_tasks' .* must be one of 'atrophy', 'lesion'"),
    ({"task": "multitask", "site_tasks": "atrophy,lesion,atrophy,lesion"}, "takes 1 to n_sites=3"),
    ({"task": "lesion", "site_tasks": "atrophy"}, "option 'site_tasks' .* applies to task='multitask'"),
])
def test_bad_site_tasks_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        load_dataset("mni-phantom", n_per_site=10, size=8, **options)


# --------------------------------------------------------------------------- end to end


def test_medfed_run_on_a_multitask_table_records_each_sites_target(tmp_path):
    path = _table(tmp_path / "t.csv", rows=16)
    base = ["run", "--data", str(path), "--site-column", "site", "--label-column", "adhd",
            "--exclude", "score,grade", "--model", "mlp", "--model-option", "hidden=4", "--rounds", "2",
            "--repeats", "1"]
    result = runner.invoke(app, base + ["--label-column-site", "b=asd", "--methods", "multitask,fedavg",
                                        "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "a predicts 'adhd', b predicts 'asd', c predicts 'adhd'" in result.output
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["site_targets"] == {"a": "adhd", "b": "asd", "c": "adhd"}
    assert {r["setting"] for r in doc["results"]} == {"MultiTask", "FedAvg"}
    bad = runner.invoke(app, base + ["--label-column-site", "q=asd", "--methods", "multitask",
                                     "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "no site 'q' in site column 'site'" in bad.output
    assert len(bad.output.strip().splitlines()) == 1


def test_a_deployed_multitask_study_reads_each_sites_own_column_and_equals_its_simulation(tmp_path):
    """Each hospital's table holds its own target's column (a site named in label_column_site reads
    that column, the others label_column): deployed over the loopback link, the multi-task study
    gives the numbers and site_targets of medfed run on the pooled table."""
    from deploy_support import site_tables

    from medfed.deploy.coordinator import drive
    from medfed.deploy.loopback import LoopbackLink

    names = site_tables(tmp_path)  # heart disease: column "target" at every site
    for file in [*(f"{s}.csv" for s in names), "all.csv"]:  # and another target every table holds
        df = pd.read_csv(tmp_path / file)
        df["old"] = (df["age"] > 55).astype(int)
        df.to_csv(tmp_path / file, index=False)
    study = tmp_path / "study.toml"
    study.write_text(f"""methods = ["fedavg", "multitask"]
seed = 2
repeats = 1
model = "mlp"
[model_options]
hidden = [4]
[training]
rounds = 3
local_steps = 2
[data]
site_column = "site"
label_column = "target"
impute = "median"
exclude = ["age"]
[data.label_column_site]
Hungary = "old"
[deploy]
sites = {json.dumps(list(names))}
round_timeout_s = 5
""")
    nodes = {s: {"site": s, "data": str(tmp_path / f"{s}.csv"), "folder": str(tmp_path / f"site-{s}")} for s in names}
    deployed = drive(LoopbackLink(nodes), study, tmp_path / "out", log=lambda m: None)
    result = runner.invoke(app, ["run", str(study), "--data", str(tmp_path / "all.csv"), "--out", str(tmp_path / "sim")])
    assert result.exit_code == 0, result.output
    simulated = json.loads((tmp_path / "sim" / "results.json").read_text())
    assert deployed["site_targets"] == simulated["site_targets"] == {**{s: "target" for s in names}, "Hungary": "old"}
    for setting in ("FedAvg", "MultiTask"):
        assert deployed["histories"][setting]["train_loss"] == simulated["histories"][setting]["train_loss"]
    rows = lambda doc: {(r["setting"], r["test_site"], r["model"]): r["metrics"] for r in doc["results"]}  # noqa: E731
    assert rows(deployed) == rows(simulated)


def test_audits_take_per_site_label_columns(tmp_path):
    """`medfed audit robustness` reads the same multi-task table as `medfed run` (one flag set)."""
    path = _table(tmp_path / "t.csv", rows=16)
    result = runner.invoke(app, ["audit", "robustness", "--data", str(path), "--site-column", "site",
                                 "--label-column", "adhd", "--label-column-site", "b=asd", "--exclude", "score,grade",
                                 "--attack", "label_flip", "--corrupt", "1", "--defenses", "fedavg", "--repeats", "1",
                                 "--rounds", "2", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "a" / "robustness.json").read_text())
    assert doc["config"]["data"]["label_column_site"] == {"b": "asd"}
