"""The §6 harness: settings, splits, scaling, single-class sites, determinism."""

import json

import numpy as np
import pytest
from conftest import synthetic_federation

from medfed.client import LocalData, LocalTraining, sgd_steps
from medfed.data.federation import Federation, SingleClassSiteWarning, Site
from medfed.data.preprocess import Moments, Standardizer
from medfed.experiments.config import build_config
from medfed.experiments.harness import prepare_repeat, run_experiment
from medfed.experiments.metrics import binary_metrics
from medfed.experiments.results import results_document
from medfed.models import LogisticRegression
from medfed.rng import KeyedRng, name_key

ALL = ["cross", "single", "mix", "fedavg", "fedsgd", "fedprox"]


def _config(**kw):
    values = {"data": {"dataset": "adni-like"}, "repeats": 2, "training": {"rounds": 10, "local_steps": 5}}
    values.update(kw)
    return build_config(values)


def _rows(doc):
    return {(r["setting"], r["train_site"], r["test_site"]): r for r in doc["results"]}


def test_every_setting_reported_per_test_site(federation):
    doc = results_document(run_experiment(_config(methods=ALL), federation))
    rows = _rows(doc)
    names = federation.site_names
    for s in names:
        for setting in ("Single",):
            assert (setting, s, s) in rows
        for setting in ("Mix", "FedAvg", "FedSGD", "FedProx"):
            assert (setting, None, s) in rows
        # Cross: every other training site, never the test site itself
        assert {k[1] for k in rows if k[0] == "Cross" and k[2] == s} == set(names) - {s}
    r = rows[("FedAvg", None, names[0])]
    assert set(r["metrics"]) == {"acc", "sen", "spe", "auc", "balanced_acc", "f1"}
    assert len(r["metrics"]["acc"]["values"]) == 2
    assert r["metrics"]["acc"]["mean"] == pytest.approx(np.mean(r["metrics"]["acc"]["values"]))
    assert r["metrics"]["acc"]["std"] == pytest.approx(np.std(r["metrics"]["acc"]["values"], ddof=1))


def test_splits_are_stratified_80_20_and_differ_by_repeat(federation):
    cfg = _config()
    a, b = prepare_repeat(federation, cfg, 0), prepare_repeat(federation, cfg, 1)
    for site, sa in zip(federation.sites, a):
        n_test = len(sa.y_test)
        assert n_test == pytest.approx(0.2 * site.n, abs=2)
        for cls in (0, 1):
            total = int((site.y == cls).sum())
            assert int((sa.y_test == cls).sum()) == pytest.approx(0.2 * total, abs=1)
    assert not np.array_equal(a[0].y_test, b[0].y_test) or not np.array_equal(a[0].X_test, b[0].X_test)


def test_single_equals_independent_per_site_training(federation):
    """Single on a site depends on nothing but that site: changing another site changes nothing."""
    cfg = _config(methods=["single"], scaling="global")
    base = _rows(results_document(run_experiment(cfg, federation)))
    changed_sites = list(federation.sites)
    other = changed_sites[1]
    changed_sites[1] = Site(other.name, other.X * 3 + 1, 1 - other.y)
    changed = Federation(federation.name, tuple(changed_sites), federation.feature_names)
    after = _rows(results_document(run_experiment(cfg, changed)))
    name = federation.site_names[0]
    assert base[("Single", name, name)]["metrics"] == after[("Single", name, name)]["metrics"]


def test_single_and_cross_use_the_same_model_trained_on_the_training_site_only(federation):
    cfg = _config(methods=["single", "cross"], repeats=1)
    run = run_experiment(cfg, federation)
    sites = prepare_repeat(federation, cfg, 0)
    scale = Standardizer.from_moments([sites[0].moments])
    model = LogisticRegression()
    t = cfg.training
    params, _ = sgd_steps(
        model.init(5), LocalData("a", scale(sites[0].X_train), sites[0].y_train),
        LocalTraining(model, t.lr, t.rounds * t.local_steps, None, t.l2),
        KeyedRng(cfg.seed, (1, 0, name_key("single"), 0)),
    )
    expected = binary_metrics(sites[1].y_test, model.predict_proba(params, scale(sites[1].X_test)))
    cell = next(c for c in run.cells if c.setting == "Cross" and c.train_site == "site-0" and c.test_site == "site-1")
    assert cell.metrics["auc"][0].value == expected["auc"].value
    assert cell.metrics["acc"][0].value == expected["acc"].value


def test_mix_equals_full_batch_fedsgd(federation):
    """Both are gradient descent on the pooled training rows: identical predictions."""
    doc = results_document(run_experiment(_config(methods=["mix", "fedsgd"]), federation))
    rows = _rows(doc)
    for s in federation.site_names:
        for m in ("acc", "auc"):
            np.testing.assert_allclose(
                rows[("Mix", None, s)]["metrics"][m]["values"], rows[("FedSGD", None, s)]["metrics"][m]["values"],
                atol=1e-9,
            )


def test_global_scaling_is_assembled_from_site_moments():
    rng = np.random.default_rng(0)
    parts = [rng.normal(loc=k, scale=k + 1, size=(20 + 5 * k, 3)) for k in range(3)]
    pooled = np.vstack(parts)
    s = Standardizer.from_moments([Moments.of(p) for p in parts])
    np.testing.assert_allclose(s.mean, pooled.mean(0), atol=1e-12)
    np.testing.assert_allclose(s.scale, pooled.std(0), atol=1e-12)


@pytest.mark.parametrize("scaling", ["global", "site", "none"])
def test_scaling_modes_run_and_are_recorded(federation, scaling):
    doc = results_document(run_experiment(_config(methods=["single", "fedavg"], scaling=scaling, repeats=1), federation))
    assert doc["scaling"] == scaling and doc["config"]["scaling"] == scaling


def test_same_config_and_seed_give_identical_numbers_serial_or_parallel(federation):
    a = results_document(run_experiment(_config(methods=ALL, training={"rounds": 5, "batch_size": 8}), federation))
    b = results_document(run_experiment(_config(methods=ALL, training={"rounds": 5, "batch_size": 8}), federation))
    c = results_document(
        run_experiment(_config(methods=ALL, training={"rounds": 5, "batch_size": 8}, workers=2), federation)
    )
    d = results_document(run_experiment(_config(methods=ALL[::-1], training={"rounds": 5, "batch_size": 8}), federation))
    assert json.dumps(a["results"]) == json.dumps(b["results"]) == json.dumps(c["results"])
    # method order changes the row order, never a number
    assert sorted(map(json.dumps, a["results"])) == sorted(map(json.dumps, d["results"]))
    e = results_document(run_experiment(_config(methods=ALL, seed=1, training={"rounds": 5}), federation))
    assert json.dumps(a["results"]) != json.dumps(e["results"])


def _single_class_federation():
    fed = synthetic_federation(sizes=(60, 40, 30))
    sites = list(fed.sites)
    s = sites[2]
    y = s.y.copy()
    split = np.ones(s.n, dtype=bool)
    split[-6:] = False
    y[split] = 1  # training rows: positive only, as in real label-skewed benchmark splits
    y[-6:] = [0, 1, 0, 1, 0, 0]
    sites[2] = Site(s.name, s.X, y, split)
    for i in (0, 1):
        sp = np.zeros(sites[i].n, dtype=bool)
        sp[: int(0.8 * sites[i].n)] = True
        sites[i] = Site(sites[i].name, sites[i].X, sites[i].y, sp)
    return Federation("skewed", tuple(sites), fed.feature_names)


def test_single_class_site_joins_federated_training_and_its_local_rows_are_not_computable():
    fed = _single_class_federation()
    with pytest.warns(SingleClassSiteWarning, match="site-2"):
        run = run_experiment(_config(methods=ALL, repeats=1), fed)
    doc = results_document(run)
    rows = _rows(doc)
    assert not rows[("Single", "site-2", "site-2")]["computable"]
    assert "one class" in rows[("Single", "site-2", "site-2")]["reason"]
    assert rows[("Single", "site-2", "site-2")]["metrics"]["acc"]["mean"] is None
    assert not rows[("Cross", "site-2", "site-0")]["computable"]
    assert rows[("Cross", "site-0", "site-2")]["computable"]
    for setting in ("FedAvg", "FedSGD", "FedProx", "Mix"):
        assert rows[(setting, None, "site-2")]["computable"]
        assert rows[(setting, None, "site-2")]["metrics"]["auc"]["mean"] is not None
    assert any("site-2" in w for w in doc["warnings"])
    json.dumps(doc, allow_nan=False)


def test_auc_undefined_on_a_one_class_test_set_is_null_with_reason():
    fed = _single_class_federation()
    sites = list(fed.sites)
    s = sites[2]
    y = s.y.copy()
    y[-6:] = 1  # test rows all positive
    y[:5] = 0  # training rows hold both classes
    sites[2] = Site(s.name, s.X, y, s.split)
    fed = Federation("t", tuple(sites), fed.feature_names)
    rows = _rows(results_document(run_experiment(_config(methods=["fedavg"], repeats=1), fed)))
    auc = rows[("FedAvg", None, "site-2")]["metrics"]["auc"]
    assert auc["mean"] is None and auc["values"] == [None]
    assert "one class" in auc["undefined_reason"]
    assert rows[("FedAvg", None, "site-2")]["metrics"]["sen"]["mean"] is not None


def test_results_document_records_config_seed_versions_sites(federation):
    doc = results_document(run_experiment(_config(methods=["fedavg"], seed=3), federation))
    for key in ("dataset", "seed", "repeats", "sites", "config", "versions", "runtime_s", "results"):
        assert key in doc
    assert doc["seed"] == 3 and doc["config"]["seed"] == 3
    assert doc["versions"]["numpy"] == np.__version__
    assert [s["name"] for s in doc["sites"]] == federation.site_names
    assert doc["histories"]["FedAvg"]["communication_rounds"] == 10
    assert len(doc["histories"]["FedAvg"]["train_loss"][0]) == 10
