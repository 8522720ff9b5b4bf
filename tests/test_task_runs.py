"""Multiclass and regression end to end: metrics agree with scikit-learn on the same predictions;
`medfed run` on a table through Single, Cross, Mix, FedAvg, FedProx (and SCAFFOLD, DP-SGD); what
assumes two classes is refused before training."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from medfed.cli.app import app
from medfed.experiments.metrics import multiclass_metrics, regression_metrics

runner = CliRunner()
METHODS = "single,cross,mix,fedavg,fedprox,scaffold"


def test_multiclass_metrics_agree_with_sklearn():
    from sklearn import metrics as sk

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 80)
    y[y == 3] = 2  # class 3 absent from the test set: a site missing a class
    p = rng.dirichlet(np.ones(4), 80)
    p[np.arange(80), y] += 0.3 * rng.random(80)  # informative but imperfect
    p /= p.sum(axis=1, keepdims=True)
    out = multiclass_metrics(y, p, ("a", "b", "c", "d"))
    pred = p.argmax(axis=1)
    assert out["acc"].value == pytest.approx(sk.accuracy_score(y, pred), abs=1e-12)
    assert out["balanced_acc"].value == pytest.approx(sk.balanced_accuracy_score(y, pred), abs=1e-12)
    assert out["macro_f1"].value == pytest.approx(sk.f1_score(y, pred, average="macro"), abs=1e-12)
    present = [0, 1, 2]
    ovr = np.mean([sk.roc_auc_score(y == k, p[:, k]) for k in present])
    assert out["macro_auc"].value == pytest.approx(ovr, abs=1e-12)
    full = y.copy()
    full[:5] = 3  # every class present: scikit-learn's own one-vs-rest macro AUC
    q = p / p.sum(axis=1, keepdims=True)
    assert multiclass_metrics(full, q, tuple("abcd"))["macro_auc"].value == pytest.approx(
        sk.roc_auc_score(full, q, multi_class="ovr", average="macro"), abs=1e-12)
    recall = sk.recall_score(y, pred, labels=[0, 1, 2], average=None)
    np.testing.assert_allclose([out[f"sen:{c}"].value for c in "abc"], recall, atol=1e-12)
    cm = sk.multilabel_confusion_matrix(y, pred, labels=[0, 1, 2, 3])
    np.testing.assert_allclose([out[f"spe:{c}"].value for c in "abcd"], cm[:, 0, 0] / cm[:, 0].sum(axis=1), atol=1e-12)
    assert out["sen:d"].value is None and "no 'd' rows" in out["sen:d"].reason


def test_regression_metrics_agree_with_sklearn_and_scipy():
    from scipy.stats import pearsonr
    from sklearn import metrics as sk

    rng = np.random.default_rng(1)
    y = rng.normal(60, 8, 50)
    p = y + rng.normal(0, 4, 50)
    out = regression_metrics(y, p)
    assert out["mae"].value == pytest.approx(sk.mean_absolute_error(y, p), rel=1e-12)
    assert out["rmse"].value == pytest.approx(np.sqrt(sk.mean_squared_error(y, p)), rel=1e-12)
    assert out["r2"].value == pytest.approx(sk.r2_score(y, p), rel=1e-12)
    assert out["pearson_r"].value == pytest.approx(pearsonr(y, p)[0], rel=1e-12)
    constant = regression_metrics(np.full(5, 3.0), np.arange(5.0))
    assert constant["r2"].value is None and constant["pearson_r"].value is None and constant["mae"].value == pytest.approx(1.4)


def _table(path, target: str) -> str:
    rng = np.random.default_rng(0)
    n = 40
    X = rng.normal(size=(3 * n, 3))
    if target == "dx":
        y = np.array(["ad", "mci", "nc"])[np.argmax(X @ rng.normal(size=(3, 3)) + rng.gumbel(size=(3 * n, 3)), 1)]
        y[n:2 * n][y[n:2 * n] == "ad"] = "nc"  # site B has no 'ad' rows
    else:
        y = np.round(60 + 5 * X @ np.array([1.0, -0.5, 0.3]) + rng.normal(size=3 * n), 2)
    pd.DataFrame({"site": np.repeat(["A", "B", "C"], n), "a": X[:, 0], "b": X[:, 1], "c": X[:, 2], target: y}).to_csv(
        path, index=False)
    return str(path)


def _run(tmp_path, target, *extra):
    result = runner.invoke(app, ["run", "--data", _table(tmp_path / "t.csv", target), "--site-column", "site",
                                 "--label-column", target, "--methods", METHODS, "--repeats", "2", "--rounds", "5",
                                 "--out", str(tmp_path / "out"), *extra])
    return result


def test_multiclass_run_end_to_end(tmp_path):
    result = _run(tmp_path, "dx", "--eval-every", "5")
    assert result.exit_code == 0, result.output
    assert "task: multiclass (the label column holds 3 class names); model softmax" in result.output
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["task"] == "multiclass" and doc["classes"] == ["ad", "mci", "nc"] and doc["model"]["fitted"] == "softmax"
    assert doc["metrics"] == ["acc", "balanced_acc", "macro_f1", "macro_auc"]
    rows = {(r["setting"], r["train_site"], r["test_site"]): r for r in doc["results"]}
    assert {s for s, _, _ in rows} == {"Single", "Cross", "Mix", "FedAvg", "FedProx", "SCAFFOLD"}
    for r in rows.values():
        assert r["computable"] and r["threshold"] is None
        assert 0.0 <= r["metrics"]["macro_auc"]["mean"] <= 1.0
        assert set(r["per_class"]["sen"]) == {"ad", "mci", "nc"}
    assert rows[("FedAvg", None, "B")]["per_class"]["sen"]["ad"]["mean"] is None  # B has no 'ad' test rows
    assert any("site 'B' has no rows of class 'ad'" in w for w in doc["warnings"])
    evaluation = doc["histories"]["FedAvg"]["evaluation"][0][0]
    assert set(evaluation["test_metrics"]["A"]) >= {"acc", "macro_auc", "sen:ad"}
    # SCAFFOLD, FedProx and FedAvg move differently: the client rules reach the softmax session
    losses = {s: doc["histories"][s]["train_loss"][0] for s in ("FedAvg", "FedProx", "SCAFFOLD")}
    assert losses["SCAFFOLD"] != losses["FedAvg"] != losses["FedProx"] and all(np.isfinite(losses["FedAvg"]))


def test_regression_run_end_to_end_with_dp_sgd(tmp_path):
    result = _run(tmp_path, "age", "--lr", "0.3")
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["task"] == "regression" and doc["model"]["fitted"] == "linear"
    assert "not all whole" in doc["task_source"] and doc["positive_label"] is None
    mix = next(r for r in doc["results"] if r["setting"] == "Mix" and r["test_site"] == "A")
    assert mix["metrics"]["r2"]["mean"] > 0.5 and mix["metrics"]["rmse"]["mean"] >= mix["metrics"]["mae"]["mean"]
    private = runner.invoke(app, ["run", "--data", str(tmp_path / "t.csv"), "--site-column", "site",
                                  "--label-column", "age", "--methods", "fedavg", "--rounds", "3", "--dp", "sample",
                                  "--batch-size", "8", "--clip", "1", "--noise", "1", "--out", str(tmp_path / "dp")])
    assert private.exit_code == 0, private.output


@pytest.mark.parametrize("extra, message", [
    (["--threshold", "youden"], "--threshold youden chooses a binary decision threshold"),
    (["--model", "linear"], "model 'linear' cannot train a multiclass task"),
    (["--task", "regression"], "label column 'dx' is not numeric"),
    (["--task", "segmentation"], "a segmentation task reads a mask per image"),
])
def test_two_class_assumptions_refused_in_one_line(tmp_path, extra, message):
    result = _run(tmp_path, "dx", *extra)
    assert result.exit_code == 2 and message in result.output and result.output.count("\n") == 1, result.output
