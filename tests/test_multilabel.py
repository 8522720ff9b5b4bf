"""Multi-label tables: --label-columns reads K 0/1 columns as one multilabel task; the numpy
multilabel_logistic is K binary logistic regressions (scikit-learn's, per label); per-label AUC,
macro AUC and subset accuracy agree with scikit-learn; `medfed run` end to end (numpy and mlp);
bad label settings refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from medfed.cli.app import app
from medfed.data.tables import load_table
from medfed.data.tasks import strata
from medfed.experiments.metrics import multilabel_metrics
from medfed.models.registry import make_model

runner = CliRunner()
LABELS = ("effusion", "edema", "mass")


def _table(path, n: int = 30) -> str:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(3 * n, 3))
    Y = (X @ rng.normal(size=(3, 3)) + rng.logistic(size=(3 * n, 3)) > 0).astype(int)
    frame = pd.DataFrame({"site": np.repeat(["A", "B", "C"], n), "a": X[:, 0], "b": X[:, 1], "c": X[:, 2]})
    for k, name in enumerate(LABELS):
        frame[name] = Y[:, k]
    frame.to_csv(path, index=False)
    return str(path)


def test_label_columns_load_a_multilabel_federation(tmp_path):
    fed = load_table(_table(tmp_path / "t.csv"), site_column="site", label_columns=list(LABELS))
    assert fed.task == "multilabel" and fed.classes == LABELS and fed.n_classes == 3
    assert fed.feature_names == ("a", "b", "c")  # label columns are never features
    assert fed.sites[0].y.shape == (30, 3) and fed.sites[0].y.dtype == np.int8
    raw = pd.read_csv(tmp_path / "t.csv")
    np.testing.assert_array_equal(fed.sites[1].y, raw[raw.site == "B"][list(LABELS)].to_numpy())
    assert set(fed.site_summaries()[0]["label_positives"]) == set(LABELS)


def test_label_powerset_strata_pool_rare_combinations():
    Y = np.array([[0, 1], [0, 1], [1, 1], [1, 0], [1, 0], [0, 0]])
    s = strata("multilabel", Y)
    assert s[0] == s[1] and s[3] == s[4] and s[0] != s[3] and s[2] == s[5] == -1


def test_multilabel_metrics_agree_with_sklearn():
    from sklearn import metrics as sk

    rng = np.random.default_rng(1)
    Y = (rng.random((60, 3)) < 0.4).astype(int)
    P = np.clip(0.6 * Y + 0.5 * rng.random((60, 3)), 0, 1)
    out = multilabel_metrics(Y, P, LABELS)
    for k, name in enumerate(LABELS):
        assert out[f"auc:{name}"].value == pytest.approx(sk.roc_auc_score(Y[:, k], P[:, k]), abs=1e-12)
    assert out["macro_auc"].value == pytest.approx(sk.roc_auc_score(Y, P, average="macro"), abs=1e-12)
    assert out["subset_acc"].value == pytest.approx(sk.accuracy_score(Y, (P >= 0.5).astype(int)), abs=1e-12)
    Y[:, 2] = 0  # a label absent from the test set: its AUC undefined, the macro mean over the others
    out = multilabel_metrics(Y, P, LABELS)
    assert out["auc:mass"].value is None and "0 in every test row" in out["auc:mass"].reason
    assert out["macro_auc"].value == pytest.approx(np.mean([sk.roc_auc_score(Y[:, k], P[:, k]) for k in (0, 1)]))


def test_numpy_multilabel_model_is_sklearns_logistic_regression_per_label():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(2)
    X = rng.normal(size=(80, 4))
    Y = (X @ rng.normal(size=(4, 3)) + rng.logistic(size=(80, 3)) > 0).astype(np.float64)
    model, l2 = make_model("logistic", (4,), task="multilabel", n_classes=3), 0.1
    params = model.init_params((4,))
    for _ in range(3000):  # gradient descent on the convex objective
        grads, _ = model.gradient(params, X, Y, l2)
        params = {k: params[k] - 1.0 * grads[k] for k in params}
    for k in range(3):
        ref = LogisticRegression(C=1.0 / (X.shape[0] * l2), tol=1e-12, max_iter=10_000).fit(X, Y[:, k])
        np.testing.assert_allclose(params["weight"][:, k], ref.coef_[0], atol=1e-6)
        assert params["bias"][k] == pytest.approx(ref.intercept_[0], abs=1e-6)
    np.testing.assert_allclose(model.predict(params, X)[:, 2], ref.predict_proba(X)[:, 1], atol=1e-6)


def _run(tmp_path, *extra):
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", "--data", _table(tmp_path / "t.csv"), "--site-column", "site",
                                 "--label-columns", ",".join(LABELS), "--repeats", "1", "--rounds", "4",
                                 "--out", str(out), *extra])
    return result, out / "results.json"


@pytest.mark.parametrize("model", ["logistic", "mlp"])
def test_multilabel_run_end_to_end(tmp_path, model):
    methods = "single,mix,fedavg,fedprox" + (",fedper" if model == "mlp" else "")  # FedPer keeps a torch head private
    result, path = _run(tmp_path, "--model", model, "--methods", methods, "--lr", "0.5")
    assert result.exit_code == 0, result.output
    assert f"task: multilabel (given); model {'multilabel_logistic' if model == 'logistic' else 'mlp'}" in result.output
    doc = json.loads(path.read_text())
    assert doc["task"] == "multilabel" and doc["classes"] == list(LABELS)
    assert doc["metrics"] == ["macro_auc", "subset_acc"]
    rows = [r for r in doc["results"] if r["computable"]]
    assert {r["setting"] for r in rows} == {"Single", "Mix", "FedAvg", "FedProx"} | ({"FedPer"} if model == "mlp" else set())
    for r in rows:
        assert set(r["per_label"]["auc"]) == set(LABELS) and 0.0 <= r["metrics"]["subset_acc"]["mean"] <= 1.0
    mix = [r["metrics"]["macro_auc"]["mean"] for r in rows if r["setting"] == "Mix"]
    assert np.mean(mix) > 0.7  # the labels are linear in the features: the models learn them


@pytest.mark.parametrize("extra, message", [
    (["--label-column", "edema"], "give --label-column (one label) or --label-columns (a multilabel task), not both"),
    (["--task", "regression"], "--label-columns makes a multilabel task; --task says 'regression'"),
    (["--positive-label", "1"], "--positive-label binarizes one label column"),
    (["--methods", "fedsld"], "method 'fedsld' trains binary or multiclass tasks; these data are multilabel"),
])
def test_bad_label_settings_refused_in_one_line(tmp_path, extra, message):
    result, _ = _run(tmp_path, *extra)
    assert result.exit_code == 2 and message in result.output and result.output.count("\n") == 1, result.output


def test_one_label_column_or_a_missing_one_refused(tmp_path):
    from medfed.errors import ConfigError, DataError

    path = _table(tmp_path / "t.csv")
    with pytest.raises(ConfigError, match="names one column .'mass'.: a single 0/1 label is a binary task"):
        load_table(path, site_column="site", label_columns=["mass"])
    with pytest.raises(ConfigError, match="a multilabel task reads several 0/1 label columns"):
        load_table(path, site_column="site", label_column="mass", task="multilabel")
    with pytest.raises(DataError, match="'nodule' \\(--label-columns\\) is not in the file"):
        load_table(path, site_column="site", label_columns=["mass", "nodule"])
