"""Decision thresholds chosen on training rows (0.5, youden, prevalence) and the metrics they decide."""

import json

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score
from sklearn.metrics import roc_curve as sk_roc_curve

from medfed.data.federation import Federation, Site
from medfed.experiments.config import build_config
from medfed.experiments.harness import run_experiment
from medfed.experiments.metrics import (
    BINARY,
    HALF,
    binary_metrics,
    choose_threshold,
    predicted_metrics,
    thresholded_metrics,
)
from medfed.experiments.results import results_document


@pytest.mark.parametrize("seed", range(6))
def test_balanced_accuracy_and_f1_agree_with_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(70) < 0.3 + 0.1 * seed).astype(int)
    logits = np.round(rng.normal(size=70) + y, 1)  # rounding creates ties
    probabilities = 1 / (1 + np.exp(-logits))
    for rule in ("0.5", "youden", "prevalence"):
        threshold = choose_threshold(rule, y, logits)
        m = thresholded_metrics(y, probabilities, logits, threshold)
        pred = threshold.predict(probabilities, logits).astype(int)
        assert m["balanced_acc"].value == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-15)
        assert m["f1"].value == pytest.approx(f1_score(y, pred), abs=1e-15)
        assert m["balanced_acc"].value == pytest.approx((m["sen"].value + m["spe"].value) / 2)


def test_undefined_balanced_accuracy_and_f1_are_null_with_a_reason():
    m = predicted_metrics(np.ones(6), np.array([1, 0, 1, 0, 1, 1]), np.arange(6.0))
    assert m["balanced_acc"].value is None and "both classes" in m["balanced_acc"].reason
    assert m["f1"].value == pytest.approx(f1_score(np.ones(6), [1, 0, 1, 0, 1, 1]))  # defined: there are positives
    m = predicted_metrics(np.zeros(5), np.zeros(5, dtype=bool), np.arange(5.0))
    # scikit-learn answers 0.0 with a zero-division warning; we have no number to report
    assert m["f1"].value is None and "none predicted" in m["f1"].reason
    assert m["acc"].value == 1.0 and m["spe"].value == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_youden_threshold_reaches_the_largest_tpr_minus_fpr_on_the_training_rows(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(90) < 0.4).astype(int)
    logits = np.round(rng.normal(size=90) + 1.5 * y, 1 + seed % 2)
    t = choose_threshold("youden", y, logits)
    fpr, tpr, thresholds = sk_roc_curve(y, logits, drop_intermediate=False)
    best = np.max((tpr - fpr)[np.isfinite(thresholds)])
    pred = logits >= t.logit
    assert tpr[0] == 0 and pred.mean() > 0
    assert pred[y == 1].mean() - pred[y == 0].mean() == pytest.approx(best, abs=1e-12)
    # the value lies between two training scores, so no training row sits on it
    assert not np.any(logits == t.logit)


def test_prevalence_threshold_predicts_as_many_positives_as_the_training_rows_hold():
    rng = np.random.default_rng(4)
    y = (rng.random(57) < 0.3).astype(int)
    logits = rng.normal(size=57)  # no ties: the count is exact
    t = choose_threshold("prevalence", y, logits)
    assert int((logits >= t.logit).sum()) == int(y.sum())
    tied = np.repeat([3.0, 2.0, 1.0, 0.0], [2, 3, 3, 2])  # counts 2, 5, 8, 10 reachable; 4 positives
    t = choose_threshold("prevalence", np.r_[np.ones(4), np.zeros(6)], tied)
    assert int((tied >= t.logit).sum()) == 5


def test_one_class_training_rows_leave_the_thresholded_metrics_undefined_and_auc_defined():
    t = choose_threshold("youden", np.ones(8), np.arange(8.0))
    assert t.logit is None and "one class" in t.reason
    y = np.array([0, 1, 0, 1])
    m = thresholded_metrics(y, np.full(4, 0.5), np.array([0.1, 0.9, 0.2, 0.8]), t)
    assert m["auc"].value == 1.0
    assert all(m[k].value is None and m[k].reason == t.reason for k in ("acc", "sen", "spe", "balanced_acc", "f1"))


@pytest.mark.parametrize("seed", range(4))
def test_the_half_threshold_gives_what_the_probability_cut_gave(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(50) < 0.5).astype(int)
    logits = rng.normal(scale=40, size=50)  # large logits: probabilities saturate at 0 and 1
    probabilities = 1 / (1 + np.exp(-logits))
    assert thresholded_metrics(y, probabilities, logits, HALF) == binary_metrics(y, probabilities, ranking=logits)
    assert choose_threshold("0.5", y, logits) == HALF


def _shifted_federation(test_flip: bool = False) -> Federation:
    """Two sites with one informative feature whose offset differs by site (a scanner effect),
    and a predefined split; ``test_flip`` flips every test label and touches no training row."""
    rng = np.random.default_rng(0)
    sites = []
    for name, offset in (("a", 0.0), ("b", 3.5)):
        n = 80
        y = (rng.random(n) < 0.5).astype(float)
        X = np.column_stack([y * 2.0 + rng.normal(size=n) + offset, rng.normal(size=n)])
        split = np.arange(n) < 60
        if test_flip:
            y = np.where(split, y, 1 - y)
        sites.append(Site(name, X, y, split=split))
    return Federation("shifted", tuple(sites), ("x", "noise"), description="test data")


def _doc(federation, threshold, methods=("single", "mix", "fedavg")):
    config = build_config({"data": {"dataset": "unused"}, "methods": list(methods), "repeats": 1,
                           "training": {"rounds": 10, "local_steps": 5, "lr": 0.3},
                           "evaluation": {"threshold": threshold}})
    return results_document(run_experiment(config, federation))


def _rows(doc):
    return {(r["setting"], r["test_site"]): r for r in doc["results"]}


@pytest.mark.parametrize("rule", ["youden", "prevalence"])
def test_a_site_local_threshold_fixes_the_offset_a_global_model_cannot_see(rule):
    half, chosen = _rows(_doc(_shifted_federation(), "0.5")), _rows(_doc(_shifted_federation(), rule))
    at_half, at_rule = half[("FedAvg", "a")]["metrics"], chosen[("FedAvg", "a")]["metrics"]
    # at 0.5 the global model calls every row of site a negative though it ranks them well: the
    # offset of site b moved the shared boundary
    assert at_half["sen"]["mean"] == 0.0 and at_half["auc"]["mean"] > 0.8
    assert at_rule["sen"]["mean"] > 0.6 and at_rule["balanced_acc"]["mean"] > at_half["balanced_acc"]["mean"] + 0.25
    assert at_rule["auc"] == at_half["auc"]  # AUC ranks: no threshold changes it
    t = {site: chosen[("FedAvg", site)]["threshold"] for site in "ab"}
    assert t["a"]["chosen_on"] == "the test site's own training rows"
    assert t["a"]["logit"] != t["b"]["logit"]  # one per site
    mix = {site: chosen[("Mix", site)]["threshold"] for site in "ab"}
    assert mix["a"] == mix["b"] and mix["a"]["chosen_on"] == "the training rows the model was fitted on"
    assert half[("FedAvg", "a")]["threshold"] == {"rule": "0.5", "chosen_on": "fixed", "logit": [0.0],
                                                  "probability": [0.5]}


@pytest.mark.parametrize("rule", ["youden", "prevalence"])
def test_the_threshold_is_chosen_on_training_rows_only(rule):
    # flipping every test label changes no threshold, so no prediction: each right one turns wrong
    plain, flipped = _doc(_shifted_federation(), rule), _doc(_shifted_federation(test_flip=True), rule)
    for key, row in _rows(plain).items():
        other = _rows(flipped)[key]
        assert row["threshold"] == other["threshold"], key
        assert other["metrics"]["acc"]["mean"] == pytest.approx(1 - row["metrics"]["acc"]["mean"]), key


def test_leave_one_site_out_takes_the_threshold_of_the_training_sites_pooled_rows():
    config = build_config({"data": {"dataset": "unused"}, "methods": ["fedavg"], "repeats": 1, "loso": True,
                           "training": {"rounds": 5, "local_steps": 5}, "evaluation": {"threshold": "youden"}})
    doc = results_document(run_experiment(config, _shifted_federation()))
    unseen = [r for r in doc["results"] if r["evaluation"] == "loso"]
    assert len(unseen) == 2 and all("pooled" in r["threshold"]["chosen_on"] for r in unseen)


def test_every_metric_is_in_the_files_and_the_headline_ones_on_an_80_column_screen(tmp_path):
    from rich.console import Console

    from medfed.cli.app import render_table
    from medfed.experiments.report import results_csv, results_markdown

    doc = _doc(_shifted_federation(), "prevalence")
    header = results_csv(doc).splitlines()[0].split(",")
    assert [h for h in header if h.endswith("_mean")] == [f"{m}_mean" for m in BINARY.keys]
    md = results_markdown(doc)
    assert "| Test site | Setting | ACC | SEN | SPE | AUC | BACC | F1 |" in md
    assert "decision threshold: prevalence" in md
    console = Console(width=80, record=True, force_terminal=False)
    render_table(doc, console)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "AUC" in text and "BACC" not in text and "decision threshold: prevalence" in text
    assert doc["threshold"] == "prevalence" and doc["metrics"] == list(BINARY.keys)
    json.dumps(doc, allow_nan=False)


@pytest.mark.parametrize("given, ok", [("youden", True), ("Prevalence", True), (0.5, True), ("0.5", True),
                                       (0.3, False), ("median", False)])
def test_the_threshold_rule_is_validated_up_front(given, ok):
    from medfed.errors import ConfigError

    values = {"data": {"dataset": "heart-disease"}, "evaluation": {"threshold": given}}
    if ok:
        assert build_config(values).evaluation.threshold in ("youden", "prevalence", "0.5")
    else:
        with pytest.raises(ConfigError, match=r"evaluation.threshold \(--threshold\): .* use 0.5, youden, prevalence"):
            from medfed.cli.common import flag_for

            build_config(values, "flags", flag_for)


def test_a_bad_threshold_flag_is_one_line_and_exit_2(tmp_path):
    from typer.testing import CliRunner

    from medfed.cli.app import app

    result = CliRunner().invoke(app, ["run", "--dataset", "heart-disease", "--threshold", "best",
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "--threshold" in result.output and "youden" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_a_saved_model_predicts_at_the_threshold_its_rows_were_scored_at():
    from medfed.data.tables import ScoringRows
    from medfed.errors import ConfigError
    from medfed.experiments.harness import prepare_repeat

    fed = _shifted_federation()
    config = build_config({"data": {"dataset": "unused"}, "methods": ["mix", "fedavg"], "repeats": 1,
                           "save_model": True, "training": {"rounds": 10, "local_steps": 5, "lr": 0.3},
                           "evaluation": {"threshold": "youden"}})
    run = run_experiment(config, fed)
    doc, models = results_document(run), {m.name: m.model for m in run.models}
    rows = _rows(doc)
    assert models["Mix"].threshold(None).logit == rows[("Mix", "a")]["threshold"]["logit"][0]
    with pytest.raises(ConfigError, match="chosen on each site's own training rows: pass --site NAME, one of a, b"):
        models["FedAvg"].threshold(None)
    test_a = prepare_repeat(fed, config, 0)[0]
    scored = models["FedAvg"].score(ScoringRows(test_a.X_test, test_a.y_test, None, {}), "a")
    # the predictions give the run's numbers for site a: the same threshold on the same rows
    m = predicted_metrics(test_a.y_test, scored.predicted, scored.scores)
    for key in BINARY.keys:
        assert m[key].value == pytest.approx(rows[("FedAvg", "a")]["metrics"][key]["values"][0], abs=1e-12), key
    assert models["FedAvg"].threshold("a").logit == rows[("FedAvg", "a")]["threshold"]["logit"][0]
