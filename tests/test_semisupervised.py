"""The `semisupervised` method (issue 14 §2; Yang et al., 2021a, FixMatch-style): its defining
property (no unlabeled row: FedAvg, bit for bit), pseudo-labels from the global model above the
threshold, keyed augmentations, determinism across executors, the harness's plumbing and refusals."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medfed.client import LocalData, LocalTraining
from medfed.client.local import batch_indices
from medfed.client.optimizer import descend
from medfed.client.semisupervised import STRONG_STREAM, WEAK_STREAM, augment, pseudo_labels, semisupervised_update
from medfed.data.tables import load_table
from medfed.engine import run_federated
from medfed.errors import ConfigError
from medfed.experiments.config import TrainingSpec, build_config
from medfed.experiments.harness import check_unlabeled_study, run_experiment
from medfed.experiments.results import results_document
from medfed.methods.method import BuildContext
from medfed.methods.registry import METHODS
from medfed.models import LogisticRegression
from medfed.models.glm import SoftmaxRegression
from medfed.rng import KeyedRng

MODEL = LogisticRegression()
OPTS = dict(threshold=0.9, weight=1.0, weak=0.05, strong=0.5)


def _build(name, **opts):
    spec = METHODS[name]
    return spec.build(spec.validate(opts), TrainingSpec(), BuildContext(("s0", "s1", "s2")))


def _sites(unlabeled=(0, 0, 0), d=4, seed=0):
    """Three sites with a linear label rule; ``unlabeled[k]`` extra rows without a target at site k."""
    rng = np.random.default_rng(seed)
    out = []
    for k, (n, m) in enumerate(zip((30, 24, 18), unlabeled)):
        X = rng.normal(size=(n + m, d)) + 0.3 * k
        y = (X[:, 0] + 0.5 * X[:, 1] > 0.3 * k).astype(float)
        out.append(LocalData(f"s{k}", X[:n], y[:n], X[n:] if m else None))
    return out


def _run(name, sites, executor="inprocess", batch_size=8, **opts):
    training = LocalTraining(MODEL, lr=0.3, steps=4, batch_size=batch_size)
    run = run_federated(_build(name, **opts), MODEL.init(sites[0].X.shape[1]), sites, training, 4, KeyedRng(7),
                        executor=executor)
    return run.params


@pytest.mark.parametrize("batch_size", [None, 8])
def test_without_unlabeled_rows_it_is_fedavg_bit_for_bit(batch_size):
    sites = _sites()
    fedavg = _run("fedavg", sites, batch_size=batch_size)
    empty = [LocalData(s.name, s.X, s.y, np.empty((0, s.X.shape[1]))) for s in sites]  # none, or an empty array
    for data in (sites, empty):
        semi = _run("semisupervised", data, batch_size=batch_size, **OPTS)
        assert all(np.array_equal(semi[k], fedavg[k]) for k in fedavg)


def test_unlabeled_rows_change_the_training():
    sites = _sites((40, 40, 40))
    fedavg, semi = _run("fedavg", sites), _run("semisupervised", sites, **OPTS)
    assert not np.array_equal(fedavg["weight"], semi["weight"])


def test_pseudo_labels_are_the_rows_at_or_above_the_threshold():
    X = np.array([[-3.0], [-0.5], [0.0], [0.4], [2.9], [5.0]])
    params = {"weight": np.array([1.0]), "bias": np.array([0.0])}
    p = MODEL.predict_proba(params, X)
    threshold = float(np.maximum(p, 1 - p)[4])  # row 4 exactly at the threshold is kept
    got = pseudo_labels(MODEL, params, X, threshold)
    assert got.rows.tolist() == [0, 4, 5]
    assert got.labels.tolist() == [0.0, 1.0, 1.0]
    # multiclass: the argmax class of the rows whose top probability reaches it
    soft = SoftmaxRegression(3)
    sp = {"weight": np.array([[1.0, 0.0, -1.0]]), "bias": np.zeros(3)}
    Xm = np.array([[4.0], [0.1], [-4.0]])
    got = pseudo_labels(soft, sp, Xm, 0.9)
    assert got.rows.tolist() == [0, 2] and got.labels.tolist() == [0.0, 2.0]


def test_pseudo_labels_come_from_the_global_model_and_train_the_strong_view():
    """The update equals, to the bit, local steps from the global model on the labeled rows plus the
    rows the *global* model (on the weak view) is confident about, strongly augmented, with its labels."""
    site = _sites((25, 0, 0))[0]
    global_params = {"weight": np.array([2.0, 1.0, 0.0, 0.0]), "bias": np.array([0.0])}
    config = LocalTraining(MODEL, lr=0.3, steps=5, batch_size=8)
    rng = KeyedRng(3, (1, 2))
    upload, _ = semisupervised_update(global_params, site, config, None, rng, threshold=0.9, weight=0.5,
                                      weak=0.05, strong=0.5)
    weak = augment(site.X_unlabeled, 0.05, KeyedRng(3, (1, 2, WEAK_STREAM)).generator)
    confident = pseudo_labels(MODEL, global_params, weak, 0.9)
    assert 0 < confident.rows.size < len(site.X_unlabeled)  # the threshold selects: some, not all
    strong = augment(site.X_unlabeled[confident.rows], 0.5, KeyedRng(3, (1, 2, STRONG_STREAM)).generator,
                     translate=True)
    X, y = np.concatenate([site.X, strong]), np.concatenate([site.y, confident.labels])
    w = np.concatenate([np.ones(site.n), np.full(confident.rows.size, 0.5)])
    expected, _ = descend(MODEL, global_params, X, y, batch_indices(len(y), 8, 5, KeyedRng(3, (1, 2))), 0.3,
                          example_weights=w)
    assert all(np.array_equal(upload.payload[k], expected[k] - global_params[k]) for k in expected)
    assert upload.n_examples == site.n and upload.metrics["loss"] == MODEL.loss(global_params, site.X, site.y)
    # a global model confident about nothing (all probabilities 1/2): FedAvg's step on the labeled rows only
    zero = MODEL.init(4)
    none, _ = semisupervised_update(zero, site, config, None, KeyedRng(3, (1, 2)), **OPTS)
    plain, _ = descend(MODEL, zero, site.X, site.y, batch_indices(site.n, 8, 5, KeyedRng(3, (1, 2))), 0.3)
    assert all(np.array_equal(none.payload[k], plain[k] - zero[k]) for k in plain)


def test_augmentations_are_keyed_and_keep_shapes():
    gen = lambda: KeyedRng(1, (WEAK_STREAM,)).generator  # noqa: E731
    X = np.random.default_rng(0).normal(size=(200, 3))
    a, b = augment(X, 0.5, gen()), augment(X, 0.5, gen())
    assert np.array_equal(a, b) and abs(np.std(a - X) - 0.5) < 0.05
    images = np.random.default_rng(1).normal(size=(6, 1, 16, 16))
    weak, strong = augment(images, 0.1, gen()), augment(images, 0.3, gen(), translate=True)
    assert weak.shape == strong.shape == images.shape and np.array_equal(weak, augment(images, 0.1, gen()))
    # the weak view is a flip and a per-image affine intensity of each image: its rank order is one of two
    for x, v in zip(images, weak):
        ok = [abs(np.corrcoef(c.ravel(), v.ravel())[0, 1]) > 0.999 for c in (x, x[..., ::-1])]
        assert any(ok)
    assert not np.array_equal(strong, weak)


def test_same_numbers_inprocess_and_process():
    sites = _sites((20, 15, 10))
    assert all(np.array_equal(a, b) for a, b in zip(_run("semisupervised", sites, **OPTS).values(),
                                                    _run("semisupervised", sites, executor="process", **OPTS).values()))


def _table(tmp_path):
    rng = np.random.default_rng(0)
    n = 40
    x1 = rng.normal(size=3 * n)
    df = pd.DataFrame({"site": np.repeat(["A", "B", "C"], n), "x1": x1, "x2": rng.normal(size=3 * n),
                       "label": (x1 + 0.3 * rng.normal(size=3 * n) > 0).astype(int)})
    path = tmp_path / "t.csv"
    df.to_csv(path, index=False)
    return path


def _config(path, methods, **top):
    return build_config({"data": {"path": str(path), "site_column": "site", "label_column": "label",
                                  "labeled_fraction": 0.3}, "repeats": 1, "methods": list(methods),
                         "training": {"rounds": 6, "local_steps": 3},
                         "method_options": {"semisupervised": {"threshold": 0.6}}, **top})


def test_harness_gives_the_sites_their_unlabeled_rows_and_says_who_used_them(tmp_path):
    path = _table(tmp_path)
    fed = load_table(path, site_column="site", label_column="label")
    doc = results_document(run_experiment(_config(path, ("fedavg", "semisupervised")), fed))
    loss = {name: entry["train_loss"][0] for name, entry in doc["histories"].items()}
    assert loss["FedAvg"][:2] == loss["SemiSup"][:2] and loss["FedAvg"] != loss["SemiSup"]  # the unlabeled rows reached the sites and moved the model
    note = next(w for w in doc["warnings"] if "unlabeled training rows" in w)
    assert "not used by FedAvg" in note and note.endswith("used by SemiSup (semi-supervised)")
    alone = results_document(run_experiment(_config(path, ("semisupervised",)), fed))
    assert any("unlabeled training rows" in w and "not used by" not in w for w in alone["warnings"])


def test_refused_before_training_where_it_cannot_run(tmp_path):
    path = _table(tmp_path)
    for top, flag in (({"harmonize": {"method": "combat"}}, "harmonize"), ({"privacy": {"dp": "sample", "clip": 1.0, "noise": 1.0}}, "--dp")):
        cfg = _config(path, ("semisupervised",), **top)
        with pytest.raises(ConfigError, match=f"semisupervised.*{flag}|{flag}.*semisupervised"):
            check_unlabeled_study(cfg, [(METHODS["semisupervised"], {})])
    assert METHODS["semisupervised"].tasks == ("binary", "multiclass", "segmentation")
    with pytest.raises(ConfigError, match="threshold"):
        METHODS["semisupervised"].validate({"threshold": 1.5})


def test_multiclass_sites_train_on_their_argmax_pseudo_labels():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(60, 3))
    y = np.argmax(X @ rng.normal(size=(3, 3)), axis=1).astype(float)
    site = LocalData("s0", X[:20], y[:20], X[20:])
    soft = SoftmaxRegression(3)
    config = LocalTraining(soft, lr=0.5, steps=3)
    warm, _ = descend(soft, soft.init_params((3,)), site.X, site.y, [None] * 30, 0.5)  # a confident global model
    semi, _ = semisupervised_update(warm, site, config, None, KeyedRng(0), **{**OPTS, "threshold": 0.6})
    plain, _ = semisupervised_update(warm, LocalData("s0", site.X, site.y), config, None, KeyedRng(0), **OPTS)
    assert pseudo_labels(soft, warm, site.X_unlabeled, 0.6).rows.size > 0
    assert not np.array_equal(semi.payload["weight"], plain.payload["weight"])
