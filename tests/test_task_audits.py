"""The privacy audits on every task (issue 11): membership and privacy on a multiclass and a
regression table, gradient inversion on a multiclass image set, refusals in one line."""

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from medfed.cli.app import app
from medfed.client.local import LocalData, LocalTraining, local_sgd_update
from medfed.experiments.config import build_config
from medfed.experiments.harness import load_federation, run_experiment
from medfed.experiments.inversion import idlg_label
from medfed.experiments.leakage import example_losses, run_privacy_audit
from medfed.experiments.metrics import metric_set
from medfed.models.registry import make_model
from medfed.rng import KeyedRng

TINY = ["--site-column", "site", "--clip", "1", "--rounds", "3", "--repeats", "1"]


def _tables(folder):
    """The 3-class and the regression tables of the issue: three sites of 60 rows, three features."""
    g = np.random.default_rng(0)
    X = g.normal(size=(180, 3))
    columns = {"site": np.repeat(list("ABC"), 60), "a": X[:, 0], "b": X[:, 1], "c": X[:, 2]}
    dx = np.array(["ad", "mci", "nc"])[np.argmax(X @ g.normal(size=(3, 3)) + g.gumbel(size=(180, 3)), 1)]
    age = np.round(60 + 5 * X @ np.array([1, -0.5, 0.3]) + g.normal(size=180), 2)
    paths = {"multiclass": folder / "mc.csv", "regression": folder / "rg.csv"}
    pd.DataFrame({**columns, "dx": dx}).to_csv(paths["multiclass"], index=False)
    pd.DataFrame({**columns, "age": age}).to_csv(paths["regression"], index=False)
    return paths


LABEL = {"multiclass": "dx", "regression": "age"}


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    return _tables(tmp_path_factory.mktemp("tables"))


# --------------------------------------------------------------------------- each row's loss


@pytest.mark.parametrize("name,task,k", [("softmax", "multiclass", 3), ("linear", "regression", None),
                                         ("multilabel_logistic", "multilabel", 2), ("mlp", "multiclass", 3),
                                         ("mlp", "regression", None), ("mlp", "multilabel", 2)])
def test_example_losses_are_the_rows_of_the_models_own_loss(name, task, k):
    """A row's loss is the model's data term on that row: their mean is the model's loss (no L2),
    and a row the model fits better has the lower loss."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(40, 4))
    y = {"multiclass": rng.integers(0, 3, 40).astype(float), "regression": rng.normal(size=40),
         "multilabel": (rng.random((40, 2)) > 0.5).astype(float)}[task]
    model = make_model(name, (4,), task=task, n_classes=k)
    params = model.init_params((4,), KeyedRng(0, (1,)))
    params = {n: v + rng.normal(scale=0.5, size=v.shape) for n, v in params.items()}
    losses = example_losses(model, params, X, y)
    assert losses.shape == (40,)
    np.testing.assert_allclose(losses.mean(), model.loss(params, X, y), rtol=1e-9)
    # a torch network's float32 forward pass on one row may differ in the last bits from the batch's
    tol = 1e-6 if name == "mlp" else 1e-12
    for i in (0, 7):
        np.testing.assert_allclose(losses[i], model.loss(params, X[i:i + 1], y[i:i + 1]), rtol=tol)


# --------------------------------------------------------------------------- membership and privacy


@pytest.mark.parametrize("task", ["multiclass", "regression"])
@pytest.mark.parametrize("audit", ["membership", "privacy"])
def test_cli_audits_every_task_with_its_metrics(tmp_path, tables, audit, task):
    out = tmp_path / audit
    result = CliRunner().invoke(app, ["audit", audit, "--data", str(tables[task]), "--label-column", LABEL[task],
                                      *TINY, "--noise", "0,1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / f"{audit}.json").read_text())
    keys = metric_set(task).keys
    assert doc["task"] == task and doc["metrics"] == list(keys)
    assert len(doc["rows"]) == 2 * 3  # two noises, three sites, the global model
    for row in doc["rows"]:
        assert 0 <= row["attack_auc"]["mean"] <= 1
        assert all(row[m]["n"] == 1 for m in keys), row
    header = (out / f"{audit}.csv").read_text().splitlines()[0]
    assert all(f"{m}_mean" in header for m in keys)
    if audit == "privacy":
        assert (out / "privacy.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("task", ["multiclass", "regression"])
def test_noise_zero_is_medfed_runs_model_scored_as_medfed_run_scores_it(tables, task):
    """At noise 0 the audit trains medfed run's FedAvg (regression: on the same standardized
    targets) and its utility columns are medfed run's metrics of that model."""
    config = build_config({"data": {"path": str(tables[task]), "site_column": "site", "label_column": LABEL[task]},
                           "methods": ["fedavg"], "repeats": 1, "training": {"rounds": 3}}, "test", lambda k: None)
    federation = load_federation(config.data)
    doc = run_privacy_audit(config, "privacy", [0], None, federation=federation)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = run_experiment(config, federation)
    for site in federation.site_names:
        cell = next(c for c in plain.cells if c.method == "fedavg" and c.test_site == site)
        row = next(r for r in doc["rows"] if r["site"] == site)
        for m in metric_set(task).keys:
            np.testing.assert_allclose(row[m]["values"], [x.value for x in cell.metrics[m]], rtol=1e-12, err_msg=m)


def test_task_flag_reaches_the_audit_and_a_wrong_one_is_one_line(tmp_path, tables):
    ok = CliRunner().invoke(app, ["audit", "membership", "--data", str(tables["regression"]), "--label-column", "age",
                                  "--task", "regression", *TINY, "--noise", "0", "--out", str(tmp_path / "ok")])
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(app, ["audit", "privacy", "--data", str(tables["multiclass"]), "--label-column", "dx",
                                   "--task", "regression", *TINY, "--noise", "0", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    assert len(bad.output.strip().splitlines()) == 1 and "regression" in bad.output
    assert not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------- gradient inversion


@pytest.mark.parametrize("optimizer,steps", [("sgd", 1), ("sgd", 4), ("adam", 3)])
def test_idlg_reads_every_class_from_a_k_logit_head_bias_at_one_image(optimizer, steps):
    """iDLG with cross-entropy over K = 3 classes: the bias update is largest at the true class."""
    rng = np.random.default_rng(2)
    model = make_model("cnn2d", (1, 8, 8), task="multiclass", n_classes=3, channels="4", optimizer=optimizer,
                       norm="none")
    params = model.init_params((1, 8, 8), KeyedRng(0, (0,)))
    params["head.bias"] = rng.normal(size=3)  # a model leaning some way
    found = []
    for i in range(12):
        X, y = rng.normal(size=(1, 1, 8, 8)), np.array([float(i % 3)])
        upload, _ = local_sgd_update(params, LocalData("a", X, y), LocalTraining(model, 0.05, steps, 1, 1e-3),
                                     None, KeyedRng(0, (i,)))
        found.append(idlg_label(upload.payload["head.bias"]) == y[0])
    assert np.mean(found) == 1.0


PHANTOM = ["--dataset", "mni-phantom", "--dataset-option", "size=8", "--dataset-option", "n_per_site=12",
           "--dataset-option", "n_sites=2", "--model-option", "channels=4", "--model-option", "norm=none",
           "--model-option", "optimizer=sgd", "--lr", "0.1", "--attack-steps", "20", "--local-steps", "1",
           "--noise", "0", "--sharing", "none", "--secure-aggregation", "off"]


def test_leakage_attacks_a_multiclass_upload(tmp_path):
    out = tmp_path / "leak"
    result = CliRunner().invoke(app, ["audit", "leakage", *PHANTOM, "--dataset-option", "task=multiclass",
                                      "--task", "multiclass", "--batch-sizes", "1,2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "leakage.json").read_text())
    assert [r["label_rule"] for r in doc["records"]] == ["idlg", "optimized"]
    classes = {im["recovered_label"] for r in doc["records"] for im in r["images"]}
    assert classes <= {0, 1, 2}
    assert doc["records"][0]["label_accuracy"] == 1.0  # iDLG's rule at one image is exact


@pytest.mark.parametrize("flags", [["--data", "TABLE", "--site-column", "site", "--label-column", "age"],
                                   ["--dataset", "mni-phantom", "--dataset-option", "task=age",
                                    "--dataset-option", "size=8", "--dataset-option", "n_per_site=12"]])
def test_leakage_refuses_a_task_without_class_labels_in_one_line(tmp_path, tables, flags):
    flags = [str(tables["regression"]) if f == "TABLE" else f for f in flags]
    out = tmp_path / "leak"
    result = CliRunner().invoke(app, ["audit", "leakage", *flags, "--exclude", "b", "--out", str(out)]
                                if "--data" in flags else ["audit", "leakage", *flags, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert "regression task" in result.output and "binary or multiclass" in result.output
    assert not out.exists()


@pytest.mark.parametrize("task,audit,shown", [
    ("binary", "membership", ["Attack AUC", "Test AUC"]), ("binary", "privacy", ["Test ACC", "Test AUC"]),
    ("multiclass", "membership", ["Attack AUC", "Test macro-AUC"]), ("regression", "privacy", ["Test MAE", "Test R2"]),
    ("segmentation", "membership", ["Attack AUC", "Test Dice"])])
def test_the_tables_head_the_tasks_metrics(task, audit, shown):
    from medfed.experiments.leakage import table_cells

    header, _ = table_cells({"audit": audit, "task": task, "rows": []})
    assert header[5:] == shown


def test_a_model_the_dp_noise_swamps_is_named_in_the_notes_not_only_scored(tables):
    """A regression target has no bounded metric: at a huge noise the MAE is real but the model
    is noise; the audit says its training loss rose, as medfed run does, and not at noise 0."""
    config = build_config({"data": {"path": str(tables["regression"]), "site_column": "site", "label_column": "age"},
                           "methods": ["fedavg"], "repeats": 1, "training": {"rounds": 5}}, "test", lambda k: None)
    doc = run_privacy_audit(config, "privacy", [0, 50], 1.0)
    rose = [n for n in doc["notes"] if "training loss ended above" in n]
    assert len(rose) == 1 and rose[0].startswith("fedavg at noise 50:") and "noise may swamp" in rose[0], doc["notes"]
