"""The `vat` method (issue 14 §2; Miyato et al., 2018, in FL Zhu & Luo, 2022): its defining property
(eps = 0: FedAvg, bit for bit), the models' input gradients against finite differences, the
neighbours' distance and direction, the update's composition, determinism across executors."""

from __future__ import annotations

import numpy as np
import pytest

from medfed.client import LocalData, LocalTraining
from medfed.client.local import batch_indices
from medfed.client.optimizer import descend
from medfed.client.vat import (
    DIRECTION_STREAM,
    adversarial_direction,
    prediction,
    vat_update,
    virtual_neighbours,
)
from medfed.engine import run_federated
from medfed.errors import ConfigError
from medfed.experiments.config import TrainingSpec
from medfed.methods.method import BuildContext
from medfed.methods.registry import METHODS
from medfed.models import LogisticRegression
from medfed.models.glm import LinearRegression, SoftmaxRegression
from medfed.rng import KeyedRng

MODEL = LogisticRegression()
OPTS = dict(eps=0.5, xi=1e-3, weight=1.0)


def _build(name, **opts):
    spec = METHODS[name]
    return spec.build(spec.validate(opts), TrainingSpec(), BuildContext(("s0", "s1", "s2")))


def _sites(d=4, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for k, n in enumerate((30, 24, 18)):
        X = rng.normal(size=(n, d)) + 0.3 * k
        out.append(LocalData(f"s{k}", X, (X[:, 0] + 0.5 * X[:, 1] > 0.3 * k).astype(float)))
    return out


def _run(name, sites, executor="inprocess", batch_size=8, **opts):
    training = LocalTraining(MODEL, lr=0.3, steps=4, batch_size=batch_size)
    return run_federated(_build(name, **opts), MODEL.init(sites[0].X.shape[1]), sites, training, 4, KeyedRng(7),
                         executor=executor).params


@pytest.mark.parametrize("batch_size", [None, 8])
def test_eps_zero_is_fedavg_bit_for_bit(batch_size):
    sites = _sites()
    fedavg = _run("fedavg", sites, batch_size=batch_size)
    assert all(np.array_equal(_run("vat", sites, batch_size=batch_size, **{**OPTS, "eps": 0.0})[k], fedavg[k])
               for k in fedavg)
    moved = _run("vat", sites, batch_size=batch_size, **OPTS)
    assert not np.array_equal(moved["weight"], fedavg["weight"])


def _finite_differences(model, params, X, targets, loss, h=1e-6):
    """Central differences of each row's ``loss(prediction at x', target)`` in x'."""
    out = np.zeros_like(X)
    for idx in np.ndindex(X.shape):
        up, down = X.copy(), X.copy()
        up[idx] += h
        down[idx] -= h
        i = idx[0]
        out[idx] = (loss(model, params, up, targets)[i] - loss(model, params, down, targets)[i]) / (2 * h)
    return out


def _cross_entropy(model, params, X, T):
    p = prediction(model, params, X)
    if p.ndim == 1:
        return -(T * np.log(p) + (1 - T) * np.log(1 - p))
    return -(T * np.log(p)).sum(axis=1)


def _half_square(model, params, X, t):
    return 0.5 * (prediction(model, params, X) - t) ** 2


def test_numpy_input_gradients_equal_finite_differences():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(5, 3))
    cases = [
        (MODEL, {"weight": rng.normal(size=3), "bias": np.array([0.2])}, rng.uniform(size=5), _cross_entropy),
        (SoftmaxRegression(4), {"weight": rng.normal(size=(3, 4)), "bias": rng.normal(size=4)},
         rng.dirichlet(np.ones(4), size=5), _cross_entropy),
        (LinearRegression(), {"weight": rng.normal(size=3), "bias": np.array([0.1])}, rng.normal(size=5), _half_square),
    ]
    for model, params, targets, loss in cases:
        got = model.input_gradients(params, X, targets)
        assert got.shape == X.shape
        np.testing.assert_allclose(got, _finite_differences(model, params, X, targets, loss), atol=1e-6)


def test_torch_mlp_input_gradients_equal_finite_differences():
    pytest.importorskip("torch")
    from medfed.models.registry import make_model

    rng = np.random.default_rng(2)
    X = rng.normal(size=(4, 1, 3, 3))
    for task, n_classes, targets, loss in (
        ("binary", None, rng.uniform(size=4), _cross_entropy),
        ("multiclass", 3, rng.dirichlet(np.ones(3), size=4), _cross_entropy),
        ("regression", None, rng.normal(size=4), _half_square),
    ):
        model = make_model("mlp", (1, 3, 3), task=task, n_classes=n_classes, dtype="float64", hidden=(6,))
        params = {k: v + 0.3 * rng.normal(size=v.shape) for k, v in model.init_params((1, 3, 3), KeyedRng(0)).items()}
        got = model.input_gradients(params, X, targets)
        assert got.shape == X.shape
        np.testing.assert_allclose(got, _finite_differences(model, params, X, targets, loss), atol=1e-6)


def _kl(model, params, X, Xn):
    p, q = prediction(model, params, X), prediction(model, params, Xn)
    if p.ndim == 1:
        p, q = np.stack([p, 1 - p], axis=1), np.stack([q, 1 - q], axis=1)
    return (p * (np.log(p) - np.log(q))).sum(axis=1)


def test_neighbours_lie_at_eps_along_a_direction_that_raises_the_kl_more_than_a_random_one():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(200, 5))
    model = SoftmaxRegression(3)
    params = {"weight": rng.normal(size=(5, 3)), "bias": rng.normal(size=3)}
    neighbours = virtual_neighbours(model, params, X, eps=0.3, xi=1e-3, gen=KeyedRng(0).generator)
    np.testing.assert_allclose(np.linalg.norm(neighbours - X, axis=1), 0.3, rtol=1e-12)
    random = rng.normal(size=X.shape)
    random *= 0.3 / np.linalg.norm(random, axis=1, keepdims=True)
    adversarial, baseline = _kl(model, params, X, neighbours), _kl(model, params, X, X + random)
    assert np.mean(adversarial > baseline) > 0.95 and adversarial.mean() > 3 * baseline.mean()
    # a zero model has no gradient: each row keeps its random unit direction (still at distance eps)
    zero = MODEL.init(5)
    direction = adversarial_direction(MODEL, zero, X, 1e-3, KeyedRng(0).generator)
    np.testing.assert_allclose(np.linalg.norm(direction, axis=1), 1.0)


def test_the_update_trains_on_the_rows_plus_their_neighbours_labeled_as_their_rows():
    site = _sites()[0]
    global_params = {"weight": np.array([2.0, 1.0, 0.0, -0.5]), "bias": np.array([0.1])}
    config = LocalTraining(MODEL, lr=0.3, steps=5, batch_size=8)
    upload, _ = vat_update(global_params, site, config, None, KeyedRng(3, (1, 2)), eps=0.5, xi=1e-3, weight=0.4)
    neighbours = virtual_neighbours(MODEL, global_params, site.X, eps=0.5, xi=1e-3,
                                    gen=KeyedRng(3, (1, 2, DIRECTION_STREAM)).generator)
    X, y = np.concatenate([site.X, neighbours]), np.concatenate([site.y, site.y])
    w = np.concatenate([np.ones(site.n), np.full(site.n, 0.4)])
    expected, _ = descend(MODEL, global_params, X, y, batch_indices(len(y), 8, 5, KeyedRng(3, (1, 2))), 0.3,
                          example_weights=w)
    assert all(np.array_equal(upload.payload[k], expected[k] - global_params[k]) for k in expected)
    assert upload.n_examples == site.n and upload.metrics["loss"] == MODEL.loss(global_params, site.X, site.y)


def test_same_numbers_inprocess_and_process():
    sites = _sites()
    a, b = _run("vat", sites, **OPTS), _run("vat", sites, executor="process", **OPTS)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_options_and_tasks_are_checked_at_build():
    spec = METHODS["vat"]
    assert spec.display == "VAT" and spec.tasks == ("binary", "multiclass", "regression")
    for bad in ({"eps": -1.0}, {"xi": 0.0}, {"weight": -0.5}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            spec.validate(bad)




def test_a_deployed_vat_study_equals_its_simulation(tmp_path):
    """VAT reads only a site's labeled rows, so a deployed site runs it as simulation does (loopback link)."""
    import json

    from deploy_support import heart_study, site_tables
    from typer.testing import CliRunner

    from medfed.cli.app import app
    from medfed.deploy.coordinator import drive
    from medfed.deploy.loopback import LoopbackLink

    names = site_tables(tmp_path)
    (tmp_path / "study.toml").write_text(heart_study(["fedavg", "vat"], options={"vat": "eps = 0.5"}))
    nodes = {s: {"site": s, "data": str(tmp_path / f"{s}.csv"), "folder": str(tmp_path / f"site-{s}")}
             for s in names}
    deployed = drive(LoopbackLink(nodes), tmp_path / "study.toml", tmp_path / "out", log=lambda m: None)
    result = CliRunner().invoke(app, ["run", str(tmp_path / "study.toml"), "--data", str(tmp_path / "all.csv"),
                                      "--out", str(tmp_path / "sim")])
    assert result.exit_code == 0, result.output
    simulated = json.loads((tmp_path / "sim" / "results.json").read_text())
    assert deployed["histories"]["VAT"]["train_loss"] == simulated["histories"]["VAT"]["train_loss"]
    assert deployed["histories"]["VAT"]["train_loss"] != deployed["histories"]["FedAvg"]["train_loss"]
    rows = lambda doc: {(r["setting"], r["test_site"], r["model"]): r["metrics"] for r in doc["results"]}  # noqa: E731
    assert rows(deployed) == rows(simulated)


def test_dp_sgd_is_refused_with_the_fix():
    from medfed.client.dp_sgd import DpSgd

    site = _sites()[0]
    config = LocalTraining(MODEL, lr=0.3, steps=2, dp_sgd=DpSgd(clip=1.0, noise_multiplier=1.0))
    with pytest.raises(ConfigError, match="vat.*DP-SGD.*fedavg"):
        vat_update(MODEL.init(4), site, config, None, KeyedRng(0), **OPTS)
