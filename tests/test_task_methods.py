"""Methods and audits follow the task (issue 11 §4): FedSLD over K classes, label attacks for every
task, the robustness audit on a multiclass federation, dynamic fusion's local accuracy bar."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from medfed.cli.app import app
from medfed.client import LocalData, LocalTraining
from medfed.client.adversary import corrupt_data, flip_labels, noisy_labels
from medfed.client.drift import batch_label_weights, label_counts
from medfed.client.reporting import training_accuracy, with_round_report
from medfed.client.local import local_sgd_update
from medfed.comm import UploadBoundary
from medfed.engine import run_federated
from medfed.errors import ConfigError, DataError
from medfed.experiments.config import TrainingSpec
from medfed.methods.method import BuildContext
from medfed.methods.registry import METHODS
from medfed.models.glm import SoftmaxRegression
from medfed.rng import KeyedRng
from medfed.server.control import federation_label_prior

runner = CliRunner()
SOFTMAX = SoftmaxRegression(3)


def _three_class_sites(counts, d=3, seed=0):
    """Sites whose rows of class c sit around a class mean; ``counts[k][c]`` rows of class c at site k,
    in class order (so a full batch is the site's whole distribution)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(3, d)) * 1.5
    out = []
    for k, per_class in enumerate(counts):
        y = np.repeat(np.arange(3), per_class)
        X = means[y] + rng.normal(size=(len(y), d)) + 0.3 * k
        out.append(LocalData(f"s{k}", X, y.astype(np.int64)))
    return out


def _build(name, sites):
    spec = METHODS[name]
    context = BuildContext(tuple(s.name for s in sites), 0, {s.name: label_counts(s.y, 3) for s in sites},
                           {s.name: float(s.n) for s in sites})
    return spec.build(spec.validate({}), TrainingSpec(), context)


def _run(algorithm, sites, rounds=5, **kw):
    training = LocalTraining(SOFTMAX, 0.3, 4, None, 0.01)
    return run_federated(algorithm, SOFTMAX.init_params((sites[0].X.shape[1],)), sites, training, rounds,
                         KeyedRng(0), **kw)


def _same(a, b):
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- FedSLD


def test_fedsld_weights_count_each_of_k_classes_in_the_federation_proportion():
    prior = np.array([0.5, 0.3, 0.2])
    yb = np.array([0, 0, 1, 1, 1, 1, 2, 2])  # batch shares 1/4, 1/2, 1/4
    w = batch_label_weights(prior)(yb)
    np.testing.assert_allclose([w[yb == c].sum() / len(yb) for c in range(3)], prior, rtol=1e-15)
    np.testing.assert_allclose(w, prior[yb] / np.array([0.25, 0.5, 0.25])[yb], rtol=1e-15)
    # a class the federation lacks weighs 0; a class the batch lacks is simply not read
    np.testing.assert_array_equal(batch_label_weights(np.array([0.6, 0.4, 0.0]))(np.array([0, 2, 2])), [1.8, 0, 0])


def test_fedsld_same_label_distribution_everywhere_is_plain_cross_entropy_on_three_classes():
    # defining property (METHODS.md): uniform labels => plain CE, bit for bit, with a softmax model
    sites = _three_class_sites([(10, 6, 4), (20, 12, 8), (5, 3, 2)])
    sent = []
    fedsld = _run(_build("fedsld", sites), sites, boundary=UploadBoundary([lambda u: sent.append(u) or u]))
    fedavg = _run(_build("fedavg", sites), sites)
    _same(fedsld.params, fedavg.params)
    np.testing.assert_array_equal(fedsld.train_loss, fedavg.train_loss)
    # every site shares K = 3 counts, its rows per class
    assert {u.site: u.extras["label_counts"].tolist() for u in sent[:3]} == {
        "s0": [10, 6, 4], "s1": [20, 12, 8], "s2": [5, 3, 2]}


def test_fedsld_skewed_three_classes_use_the_pooled_distribution_and_a_site_may_lack_a_class():
    sites = _three_class_sites([(30, 5, 5), (0, 20, 10), (4, 4, 22)])  # s1 has no class-0 rows
    fedsld = _run(_build("fedsld", sites), sites)
    prior = federation_label_prior(fedsld.server_state["label_distribution"].counts)
    np.testing.assert_allclose(prior, np.array([34, 29, 37]) / 100, rtol=1e-15)
    assert label_counts(sites[1].y, 3).tolist() == [0.0, 20.0, 10.0]
    assert np.sqrt(sum(np.sum((fedsld.params[k] - _run(_build("fedavg", sites), sites).params[k]) ** 2)
                       for k in fedsld.params)) > 1e-3  # the weights change the result


def test_binary_label_counts_are_two_numbers_as_before():
    y = np.array([0.0, 1.0, 1.0, 0.0, 1.0])
    assert label_counts(y).tolist() == [2.0, 3.0] and label_counts(y, 2).tolist() == [2.0, 3.0]


# --------------------------------------------------------------------------- label attacks


@pytest.mark.parametrize("K", [2, 3, 4, 7])
def test_label_flip_is_a_derangement_of_k_classes_and_one_minus_y_for_two(K):
    y = np.random.default_rng(K).integers(0, K, 300).astype(np.int64)
    flipped = flip_labels(y, "multiclass", K)
    assert (flipped != y).all() and flipped.dtype == y.dtype and set(flipped.tolist()) <= set(range(K))
    again = y
    for _ in range(K):  # a fixed permutation of the classes: K shifts give the labels back
        again = flip_labels(again, "multiclass", K)
    np.testing.assert_array_equal(again, y)
    if K == 2:
        np.testing.assert_array_equal(flipped, 1 - y)
        np.testing.assert_array_equal(flip_labels(y), 1 - y)


def test_label_flip_multilabel_segmentation_and_regression():
    bits = np.random.default_rng(0).integers(0, 2, (50, 4)).astype(np.int8)
    np.testing.assert_array_equal(flip_labels(bits, "multilabel", 4), 1 - bits)  # every bit flipped
    mask = np.random.default_rng(1).integers(0, 3, (5, 8, 8))
    flipped = flip_labels(mask, "segmentation", 3)
    assert (flipped != mask).all()  # background takes part: no pixel keeps its class
    np.testing.assert_array_equal(flip_labels(mask % 2, "segmentation", 2), 1 - mask % 2)  # a lesion mask inverts
    y = np.random.default_rng(2).normal(60, 8, 40)
    reflected = flip_labels(y, "regression")
    np.testing.assert_allclose(flip_labels(reflected, "regression"), y, rtol=1e-13)  # an involution
    assert reflected.mean() == pytest.approx(y.mean()) and np.corrcoef(y, reflected)[0, 1] == pytest.approx(-1)


def _old_binary_noise(y, rate, rng):
    """Today's binary noisy labels, written out: the draws a K-class version must keep for K = 2."""
    gen = rng.generator
    redraw = gen.random(y.shape) < rate
    return np.where(redraw, gen.integers(0, 2, size=y.shape), y).astype(y.dtype)


def test_noisy_labels_binary_unchanged_and_k_classes_change_rate_times_k_minus_one_over_k():
    yb = np.random.default_rng(0).integers(0, 2, 1000).astype(float)
    np.testing.assert_array_equal(noisy_labels(yb, 0.3, KeyedRng(5, (1,))), _old_binary_noise(yb, 0.3, KeyedRng(5, (1,))))
    K, n = 5, 40_000
    y = np.random.default_rng(1).integers(0, K, n)
    changed = {r: noisy_labels(y, r, KeyedRng(3, (7,)), "multiclass", K) != y for r in (0.2, 0.6)}
    for r, mask in changed.items():
        p = r * (K - 1) / K
        assert abs(mask.mean() - p) < 4 * np.sqrt(p * (1 - p) / n)
    assert not (changed[0.2] & ~changed[0.6]).any()  # coupled across rates: a superset
    at_one = noisy_labels(y, 1.0, KeyedRng(3, (7,)), "multiclass", K)
    np.testing.assert_allclose(np.bincount(at_one[y == 0], minlength=K) / (y == 0).sum(), 1 / K, atol=0.03)


def test_noisy_labels_multilabel_and_regression_and_what_is_refused():
    bits = np.random.default_rng(0).integers(0, 2, (2000, 3))
    noisy = noisy_labels(bits, 0.5, KeyedRng(0), "multilabel", 3)
    assert noisy.shape == bits.shape and abs((noisy != bits).mean() - 0.25) < 0.02  # each bit, rate / 2
    y = np.random.default_rng(1).normal(size=500)
    a, b = (noisy_labels(y, r, KeyedRng(4), "regression") for r in (0.2, 0.7))
    assert set(a.tolist()) <= set(y.tolist())  # a replaced target is another of the site's rows'
    assert not ((a != y) & (b == y)).any() and 0.1 < (a != y).mean() < 0.3
    with pytest.raises(ConfigError, match="'noisy_labels' is not defined for a segmentation task"):
        noisy_labels(np.zeros((2, 4, 4), int), 0.3, KeyedRng(0), "segmentation", 2)
    with pytest.raises(DataError, match=r"class indices 0..2"):
        flip_labels(np.array([0, 1, 3]), "multiclass", 3)
    data = LocalData("s", np.ones((3, 2)), np.array([0, 2, 1]))
    np.testing.assert_array_equal(corrupt_data(data, "label_flip", KeyedRng(0), task="multiclass", n_classes=3).y,
                                  [1, 0, 2])


# --------------------------------------------------------------------------- dynamic fusion's bar


def test_local_accuracy_per_task():
    p = np.array([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1], [0.3, 0.3, 0.4]])
    assert training_accuracy("multiclass", p, np.array([1, 0, 0])) == pytest.approx(2 / 3)  # argmax
    assert training_accuracy("multilabel", p, np.array([[0, 1, 0], [1, 1, 0], [0, 0, 0]])) == pytest.approx(8 / 9)  # row 1 misses a label
    assert training_accuracy("binary", np.array([0.7, 0.2]), np.array([1.0, 1.0])) == 0.5
    sites = _three_class_sites([(10, 6, 4)])
    rule = with_round_report(local_sgd_update, {}, 0.0)
    training = LocalTraining(SOFTMAX, 0.3, 4, None, 0.0)
    params = SOFTMAX.init_params((3,))
    upload, _ = rule(params, sites[0], training, None, KeyedRng(0))
    local = {k: params[k] + upload.payload[k] for k in params}
    expected = np.mean(SOFTMAX.predict(local, sites[0].X).argmax(1) == sites[0].y)
    assert upload.metrics["local_acc"] == expected and 0.5 < expected <= 1.0


# --------------------------------------------------------------------------- end to end


def _table(path, target="dx") -> str:
    rng = np.random.default_rng(0)
    n = 40
    X = rng.normal(size=(3 * n, 3))
    if target == "dx":
        y = np.array(["ad", "mci", "nc"])[np.argmax(X @ rng.normal(size=(3, 3)) * 2 + rng.gumbel(size=(3 * n, 3)), 1)]
        y[n:2 * n][y[n:2 * n] == "ad"] = "nc"  # site B has no 'ad' rows
    else:
        y = np.round(60 + 5 * X @ np.array([1.0, -0.5, 0.3]) + rng.normal(size=3 * n), 2)
    pd.DataFrame({"site": np.repeat(["A", "B", "C"], n), "a": X[:, 0], "b": X[:, 1], "c": X[:, 2], target: y}).to_csv(
        path, index=False)
    return str(path)


def _data(tmp_path, target="dx"):
    return ["--data", _table(tmp_path / "t.csv", target), "--site-column", "site", "--label-column", target]


def test_fedsld_and_dynamic_fusion_run_a_multiclass_table(tmp_path):
    result = runner.invoke(app, ["run", *_data(tmp_path), "--methods", "fedavg,fedsld,dynamic_fusion", "--rounds", "4",
                                 "--method-option", "dynamic_fusion.jitter=0", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = {(r["setting"], r["test_site"]): r["metrics"] for r in doc["results"]}
    assert {s for s, _ in rows} == {"FedAvg", "FedSLD", "DynamicFusion"}
    assert all(0.0 <= m["acc"]["mean"] <= 1.0 for m in rows.values())
    assert rows[("FedSLD", "A")] != rows[("FedAvg", "A")]  # B lacks a class: the weights are not all 1


@pytest.mark.parametrize("method", ["fedsld", "dynamic_fusion"])
def test_methods_that_read_classes_refuse_regression_in_one_line(tmp_path, method):
    result = runner.invoke(app, ["run", *_data(tmp_path, "age"), "--methods", method, "--rounds", "2",
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and f"method {method!r} trains binary or multiclass" in result.output
    assert "these data are regression" in result.output and result.output.count("\n") == 1, result.output


@pytest.mark.parametrize("attack", ["label_flip", "noisy_labels"])
def test_robustness_audit_on_a_multiclass_table_reports_its_metrics(tmp_path, attack):
    out = tmp_path / "audit"
    result = runner.invoke(app, ["audit", "robustness", *_data(tmp_path), "--attack", attack, "--rate", "1",
                                 "--defenses", "fedavg,median", "--rounds", "5", "--repeats", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "macro-AUC" in result.output and "AUC" in result.output
    doc = json.loads((out / "robustness.json").read_text())
    assert doc["task"] == "multiclass" and doc["classes"] == ["ad", "mci", "nc"] and doc["screen"] == ["acc", "macro_auc"]
    assert doc["headline"] == ["acc", "balanced_acc", "macro_f1", "macro_auc"]
    assert doc["metrics"][:4] == doc["headline"] and "sen:ad" in doc["metrics"]
    fedavg = doc["defenses"][0]
    assert set(fedavg["clean"]) == set(doc["metrics"]) and fedavg["computable"] == {"clean": True, "attacked": True}
    pooled = [(r["clean"]["pooled"], r["attacked"]["pooled"]) for r in fedavg["per_repeat"]]
    assert all(0.0 <= a["macro_auc"] <= 1.0 and c != a for c, a in pooled)  # the corrupted labels moved the model
    assert fedavg["drop"]["acc"]["mean"] == pytest.approx(np.mean([c["acc"] - a["acc"] for c, a in pooled]))
    assert "macro-AUC" in (out / "robustness.md").read_text()
    assert "macro_auc_mean" in (out / "robustness.csv").read_text().splitlines()[0]


def test_robustness_audit_on_a_regression_table_reports_errors_whose_drop_is_positive_when_they_grow(tmp_path):
    out = tmp_path / "audit"
    result = runner.invoke(app, ["audit", "robustness", *_data(tmp_path, "age"), "--attack", "label_flip",
                                 "--defenses", "fedavg", "--rounds", "10", "--repeats", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "robustness.json").read_text())
    assert doc["task"] == "regression" and doc["screen"] == ["mae", "r2"]
    assert doc["metrics"] == ["mae", "rmse", "r2", "pearson_r"]
    fedavg = doc["defenses"][0]
    pooled = [(r["clean"]["pooled"], r["attacked"]["pooled"]) for r in fedavg["per_repeat"]]
    # one of three sites reflects its targets about its mean: the federation's errors grow
    assert all(a["mae"] > c["mae"] and a["r2"] < c["r2"] for c, a in pooled)
    # errors: drop = attacked - clean (positive: hurt), as for R2's clean - attacked
    assert fedavg["drop"]["mae"]["mean"] == pytest.approx(np.mean([a["mae"] - c["mae"] for c, a in pooled]))
    assert fedavg["drop"]["mae"]["mean"] > 0 and fedavg["drop"]["r2"]["mean"] > 0
    # errors are in the target's own units (years about 60 +- 5): standardized training, mapped back
    assert 0.5 < pooled[0][0]["mae"] < 10
    assert "attacked − clean for errors" in (out / "robustness.md").read_text()


def test_robustness_audit_of_a_unet_segmentation_federation(tmp_path):
    from medfed.experiments.audit import Attack, run_robustness_audit
    from medfed.experiments.config import ExperimentConfig

    config = ExperimentConfig(data={"dataset": "mni-phantom", "options": {
        "task": "segmentation", "n_sites": 3, "n_per_site": 12, "size": 16, "lesion_mm": 20}}, methods=["fedavg"],
        repeats=1, model="unet2d", model_options={"channels": [4, 8], "norm": "group"},
        training={"rounds": 8, "local_steps": 10})
    doc = run_robustness_audit(config, Attack("label_flip", corrupt=1))
    assert doc["task"] == "segmentation" and doc["screen"] == ["dice", "hd95"]
    repeat = doc["defenses"][0]["per_repeat"][0]
    clean, attacked = repeat["clean"]["pooled"], repeat["attacked"]["pooled"]
    assert clean != attacked and 0.0 <= attacked["dice"] <= 1.0
    with pytest.raises(ConfigError, match="noisy_labels"):
        run_robustness_audit(config, Attack("noisy_labels", corrupt=1))


def test_robustness_audit_command_takes_a_multilabel_tables_label_columns(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(90, 3))
    Y = (X @ rng.normal(size=(3, 2)) * 2 + rng.logistic(size=(90, 2)) > 0).astype(int)
    pd.DataFrame({"site": np.repeat(["A", "B", "C"], 30), "a": X[:, 0], "b": X[:, 1], "c": X[:, 2],
                  "edema": Y[:, 0], "mass": Y[:, 1]}).to_csv(tmp_path / "m.csv", index=False)
    out = tmp_path / "audit"
    result = runner.invoke(app, ["audit", "robustness", "--data", str(tmp_path / "m.csv"), "--site-column", "site",
                                 "--label-columns", "edema,mass", "--task", "multilabel", "--attack", "label_flip",
                                 "--defenses", "fedavg", "--rounds", "3", "--repeats", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "robustness.json").read_text())
    assert doc["task"] == "multilabel" and doc["classes"] == ["edema", "mass"]


def test_robustness_audit_on_a_multilabel_table_flips_every_bit(tmp_path):
    from medfed.experiments.audit import Attack, robustness_markdown, run_robustness_audit
    from medfed.experiments.config import ExperimentConfig

    rng = np.random.default_rng(0)
    X = rng.normal(size=(90, 3))
    Y = (X @ rng.normal(size=(3, 2)) * 2 + rng.logistic(size=(90, 2)) > 0).astype(int)
    pd.DataFrame({"site": np.repeat(["A", "B", "C"], 30), "a": X[:, 0], "b": X[:, 1], "c": X[:, 2],
                  "edema": Y[:, 0], "mass": Y[:, 1]}).to_csv(tmp_path / "m.csv", index=False)
    config = ExperimentConfig(data={"path": str(tmp_path / "m.csv"), "site_column": "site",
                                    "label_columns": ["edema", "mass"]}, methods=["fedavg"], repeats=1,
                              training={"rounds": 5})
    doc = run_robustness_audit(config, Attack("label_flip", corrupt=2))
    assert doc["task"] == "multilabel" and doc["screen"] == ["macro_auc", "subset_acc"]
    assert doc["metrics"] == ["macro_auc", "subset_acc", "auc:edema", "auc:mass"]
    repeat = doc["defenses"][0]["per_repeat"][0]
    # two of three sites train on inverted labels: the federation's model ranks below chance
    assert repeat["clean"]["pooled"]["macro_auc"] > 0.7 > 0.5 > repeat["attacked"]["pooled"]["macro_auc"]
    assert "subset ACC" in robustness_markdown(doc)
