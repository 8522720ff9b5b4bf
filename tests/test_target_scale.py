"""Regression targets are standardized per training group (issue 11 §2): each setting trains on
(y - mean) / std, mean and std pooled from the moments of its training sites' training rows, and
predictions are mapped back before every metric (medfed.data.tasks.TargetScale)."""

from __future__ import annotations

import numpy as np
import pytest

from medfed.data.federation import Federation, Site
from medfed.data.preprocess import Moments
from medfed.data.tasks import TargetScale, target_moments
from medfed.experiments.config import ExperimentConfig
from medfed.experiments.harness import ScaledViews, prepare_repeat, run_experiment
from medfed.experiments.results import results_document

L2 = 0.05


def federation(a: float = 1.0, b: float = 0.0, n: int = 40) -> Federation:
    """Three sites of a linear target a * (x w + noise) + b, each with its own offset of x."""
    rng = np.random.default_rng(0)
    sites = []
    for k, name in enumerate("ABC"):
        X = rng.normal(size=(n, 3)) + k
        y = X @ np.array([1.0, -0.5, 0.3]) + 0.4 * rng.normal(size=n)
        sites.append(Site(name, X, a * y + b, task="regression"))
    return Federation("lin", tuple(sites), ("x0", "x1", "x2"), task="regression")


def config(**extra) -> ExperimentConfig:
    training = {"rounds": 8, "local_steps": 3, "lr": 0.3, "l2": L2, **extra.pop("training", {})}
    return ExperimentConfig(data={"dataset": "heart-disease", **extra.pop("data", {})},
                            methods=extra.pop("methods", ["single", "mix", "fedavg"]), training=training, **extra)


def metrics(run) -> dict[tuple, dict[str, float]]:
    return {(c.setting, c.train_site, c.test_site): {m: v[0].value for m, v in c.metrics.items()} for c in run.cells}


def test_target_scale_pools_moments_as_the_rows_would():
    rng = np.random.default_rng(3)
    parts = [rng.normal(70, 8, n) for n in (5, 17, 30)]
    scale = TargetScale.of([target_moments(p) for p in parts])
    pooled = np.concatenate(parts)
    assert scale.mean == pytest.approx(pooled.mean(), rel=1e-13) and scale.std == pytest.approx(pooled.std(), rel=1e-12)
    np.testing.assert_allclose(scale.inverse(scale.forward(pooled)), pooled, rtol=1e-14)
    assert TargetScale.of([Moments.of(np.full((4, 1), 3.0))]).std == 1.0  # a constant target is not divided by 0


def test_metrics_follow_an_affine_change_of_the_target():
    """y -> a y + b: MAE and RMSE scale by a, R² and Pearson r stay, for every setting and site.
    Trained raw (as before, and with ``standardize_target = false``), the offset of 500 is still
    being learnt by the zero-initialised bias after FedAvg's 8 rounds: R² moves by up to 0.3."""
    base = metrics(run_experiment(config(), federation()))
    a, b = 7.5, 500.0
    shifted = metrics(run_experiment(config(), federation(a, b)))
    assert base.keys() == shifted.keys() and len(base) == 3 + 3 + 3
    for key, m in base.items():
        s = shifted[key]
        assert s["mae"] == pytest.approx(a * m["mae"], rel=1e-9) and s["rmse"] == pytest.approx(a * m["rmse"], rel=1e-9)
        assert s["r2"] == pytest.approx(m["r2"], rel=1e-9, abs=1e-12)
        assert s["pearson_r"] == pytest.approx(m["pearson_r"], rel=1e-9)
    assert min(m["r2"] for m in base.values()) > 0.5
    raw = metrics(run_experiment(config(data={"standardize_target": False}), federation(a, b)))
    assert max(abs(raw[key]["r2"] - m["r2"]) for key, m in base.items()) > 0.1


def test_mix_linear_equals_ridge_on_the_original_scale():
    """Ridge on z = (y - m) / s with alpha is Ridge on y with the same alpha, the weights times s
    (both terms of the objective scale by s²; the bias is not penalized), so Mix's predictions,
    mapped back, are scikit-learn Ridge's fitted on the raw targets."""
    from sklearn.linear_model import Ridge

    fed = federation(6.0, 70.0)
    cfg = config(methods=["mix"], training={"rounds": 400, "local_steps": 10, "lr": 1.0})
    run = run_experiment(cfg, fed)
    sites = prepare_repeat(fed, cfg, 0)
    train, tests = ScaledViews(sites, "global")((0, 1, 2))  # the rows as Mix sees them, targets raw
    X, y = np.concatenate([d.X for d in train]), np.concatenate([d.y for d in train])
    np.testing.assert_array_equal(y, np.concatenate([s.y_train for s in sites]))
    ref = Ridge(alpha=len(y) * L2).fit(X, y)
    for s, X_test in zip(sites, tests):
        c = next(c for c in run.cells if c.setting == "Mix" and c.test_site == s.name)
        y_test, predicted = c.scores[0]
        np.testing.assert_array_equal(y_test, s.y_test)
        np.testing.assert_allclose(predicted, ref.predict(X_test), atol=1e-6)


def test_results_record_each_training_groups_scale():
    fed = federation(1.0, 60.0)
    cfg = config(repeats=2)
    doc = results_document(run_experiment(cfg, fed))
    entry = doc["target_scale"]
    assert entry["standardized"] is True and len(entry["repeats"]) == 2
    for r, scales in enumerate(entry["repeats"]):
        sites = {s.name: s for s in prepare_repeat(fed, cfg, r)}
        groups = sorted(tuple(g["train_sites"]) for g in scales)
        assert groups == [("A",), ("A", "B", "C"), ("B",), ("C",)]  # Single's sites; Mix and FedAvg share one
        for g in scales:
            y = np.concatenate([sites[name].y_train for name in g["train_sites"]])
            assert g["n"] == y.size and g["mean"] == pytest.approx(y.mean(), rel=1e-12)
            assert g["std"] == pytest.approx(y.std(), rel=1e-10)
    assert results_document(run_experiment(config(data={"standardize_target": False}), fed))["target_scale"] == {
        "standardized": False, "note": "targets trained as they are ([data] standardize_target = false)", "repeats": []}
