"""Noise-robust losses (medfed.models.losses, robust): GCE (Zhang & Sabuncu, 2018) and SCE (Wang et
al., 2019) for the numpy classifiers and the torch heads. Their gradients are the loss's (finite
differences), GCE's q -> 0 limit is cross-entropy and q = 1 is MAE, the training reports the
chosen loss, DP-SGD runs on them, and bad options or tasks fail in one line before training."""

from __future__ import annotations

import numpy as np
import pytest

from medfed.client import LocalTraining
from medfed.client.optimizer import descend
from medfed.errors import ConfigError
from medfed.experiments.config import ExperimentConfig
from medfed.models.losses import make_loss
from medfed.models.registry import make_model

TASKS = {"binary": "logistic", "multiclass": "softmax", "multilabel": "multilabel_logistic"}
LOSSES = [make_loss("gce", {"q": 0.7}), make_loss("gce", {"q": 0.3}), make_loss("sce", {"alpha": 0.5, "beta": 2.0})]


def data(task: str, n=40, d=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    if task == "binary":
        y = (X[:, 0] + 0.8 * rng.normal(size=n) > 0).astype(np.float64)
    elif task == "multiclass":
        y = np.argmax(X @ rng.normal(size=(d, 3)) + rng.gumbel(size=(n, 3)), axis=1).astype(np.float64)
    else:
        y = (X @ rng.normal(size=(d, 2)) + rng.normal(size=(n, 2)) > 0).astype(np.float64)
    return X, y


def model_and_params(task: str, loss, seed=1, d=3):
    model = make_model("logistic", (d,), task=task, n_classes=None if task == "binary" else 3 if task == "multiclass" else 2,
                       loss=loss)
    rng = np.random.default_rng(seed)
    params = {k: 0.7 * rng.normal(size=v.shape) for k, v in model.init_params((d,)).items()}
    return model, params


def p_label(task: str, model, params, X, y) -> np.ndarray:
    """The probability the model gives each row's (each label's) label, straight from predict."""
    if task == "binary":
        p = model.predict_proba(params, X)
        return np.where(y == 1, p, 1 - p)
    if task == "multiclass":
        return model.predict(params, X)[np.arange(len(y)), y.astype(int)]
    p = model.predict(params, X)
    return np.where(y == 1, p, 1 - p)


def numeric_gradient(model, params, X, y, l2, h=1e-6):
    out = {}
    for name, value in params.items():
        g = np.zeros_like(value)
        for i in np.ndindex(value.shape):
            up = {k: v.copy() for k, v in params.items()}
            down = {k: v.copy() for k, v in params.items()}
            up[name][i] += h
            down[name][i] -= h
            g[i] = (model.loss(up, X, y, l2) - model.loss(down, X, y, l2)) / (2 * h)
        out[name] = g
    return out


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("loss", LOSSES, ids=["gce0.7", "gce0.3", "sce"])
def test_gradient_is_the_losss_by_finite_differences(task, loss):
    X, y = data(task)
    model, params = model_and_params(task, loss)
    grads, value = model.gradient(params, X, y, 0.1, with_loss=True)
    assert value == pytest.approx(model.loss(params, X, y, 0.1), abs=1e-12)
    for name, g in numeric_gradient(model, params, X, y, 0.1).items():
        np.testing.assert_allclose(grads[name], g, atol=1e-6)
    per = model.per_example_gradients(params, X, y)  # each row's gradient of its own loss, L2 left out
    for i in (0, 7):
        row = model.gradient(params, X[i:i + 1], y[i:i + 1], 0.0)[0]
        for name in params:
            np.testing.assert_allclose(per[name][i], row[name], atol=1e-12)


@pytest.mark.parametrize("task", TASKS)
def test_loss_values_are_the_papers_formulas(task):
    X, y = data(task)
    ce_model, params = model_and_params(task, None)
    py = p_label(task, ce_model, params, X, y)
    n = X.shape[0]
    q = 0.4
    gce, _ = model_and_params(task, make_loss("gce", {"q": q}))
    assert gce.loss(params, X, y) == pytest.approx(((1 - py**q) / q).sum() / n, rel=1e-12)
    mae, _ = model_and_params(task, make_loss("gce", {"q": 1.0}))  # q = 1: the mean absolute error 1 - p_y
    assert mae.loss(params, X, y) == pytest.approx((1 - py).sum() / n, rel=1e-12)
    sce, _ = model_and_params(task, make_loss("sce", {"alpha": 0.3, "beta": 1.5}))
    expected = (0.3 * -np.log(py) + 1.5 * -(-4.0) * (1 - py)).sum() / n  # RCE with log 0 = A = -4
    assert sce.loss(params, X, y) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("task", TASKS)
def test_gce_q_to_zero_is_cross_entropy(task):
    X, y = data(task)
    ce, params = model_and_params(task, None)
    gce, _ = model_and_params(task, make_loss("gce", {"q": 1e-6}))
    assert gce.loss(params, X, y, 0.1) == pytest.approx(ce.loss(params, X, y, 0.1), abs=1e-5)
    g_ce, g_gce = ce.gradient(params, X, y, 0.1)[0], gce.gradient(params, X, y, 0.1)[0]
    for name in params:
        np.testing.assert_allclose(g_gce[name], g_ce[name], atol=1e-5)


def test_training_reports_the_chosen_loss_and_dp_sgd_rows_follow_it():
    X, y = data("binary")
    loss = make_loss("gce", {"q": 0.7})
    model, params = model_and_params("binary", loss)
    ce_model = make_model("logistic", (3,))
    _, start = descend(model, params, X, y, [None, None], lr=0.1, l2=0.1)
    py = p_label("binary", ce_model, params, X, y)
    penalty = 0.05 * float(params["weight"] @ params["weight"])
    assert start == pytest.approx(((1 - py**0.7) / 0.7).mean() + penalty, rel=1e-12)
    _, start_batches = descend(model, params, X, y, [np.arange(5)], lr=0.1, l2=0.1)  # mini-batch: all rows' loss
    assert start_batches == pytest.approx(start, rel=1e-12)
    # DP-SGD's factored rows: their norms and sums are those of the per-example gradients
    per = model.per_example_gradients(params, X, y)
    with model.session(params, X, y) as s:
        rows = s.example_gradients(np.arange(len(y)))
        norms = np.sqrt((per["weight"] ** 2).sum(axis=1) + per["bias"][:, 0] ** 2)
        np.testing.assert_allclose(rows.norms, norms, rtol=1e-12)
        f = np.linspace(0.1, 1.0, len(y))
        np.testing.assert_allclose(rows.weighted_sum(f.copy())["weight"], f @ per["weight"], rtol=1e-12)


def test_torch_heads_train_the_same_loss():
    pytest.importorskip("torch")
    for task, loss in (("binary", LOSSES[0]), ("multiclass", LOSSES[2]), ("multilabel", LOSSES[1])):
        X, y = data(task)
        numpy_model, params = model_and_params(task, loss)
        k = None if task == "binary" else 3 if task == "multiclass" else 2
        net = make_model("torch_logistic", (3,), task=task, n_classes=k, loss=loss, dtype="float64")
        assert net.head.objective == loss
        tparams = {"head.weight": np.asarray(params["weight"]).reshape(3, -1).T.copy(),
                   "head.bias": np.atleast_1d(params["bias"]).copy()}
        assert set(tparams) == set(net.init_params((3,), np.random.default_rng(0)))
        assert net.loss(tparams, X, y) == pytest.approx(numpy_model.loss(params, X, y), rel=1e-10)
        g_torch, _ = net.gradient(tparams, X, y)
        g_numpy, _ = numpy_model.gradient(params, X, y)
        np.testing.assert_allclose(g_torch["head.weight"], np.asarray(g_numpy["weight"]).reshape(3, -1).T, atol=1e-10)
        np.testing.assert_allclose(g_torch["head.bias"], np.atleast_1d(g_numpy["bias"]), atol=1e-10)
        per_torch, per_numpy = net.per_example_gradients(tparams, X, y), numpy_model.per_example_gradients(params, X, y)
        np.testing.assert_allclose(per_torch["head.weight"], per_numpy["weight"].reshape(len(y), 3, -1).transpose(0, 2, 1),
                                   atol=1e-10)  # DP-SGD's rows (vmap over the head's loss)


@pytest.mark.parametrize("values, words", [
    ({"loss": "huber"}, "is not a loss; use one of ce, gce, sce"),
    ({"loss": "gce", "loss_options": {"q": 0}}, "q=0: loss 'gce' needs 0 < q <= 1"),
    ({"loss": "gce", "loss_options": {"q": 1.5}}, "q=1.5: loss 'gce' needs 0 < q <= 1"),
    ({"loss": "gce", "loss_options": {"alpha": 1}}, "--loss-option alpha: loss 'gce' takes q (default 0.7)"),
    ({"loss": "sce", "loss_options": {"beta": -1}}, "beta=-1: loss 'sce' needs beta >= 0"),
    ({"loss": "ce", "loss_options": {"q": 0.5}}, "loss 'ce' takes no options"),
])
def test_bad_loss_settings_are_one_clear_error(values, words):
    from medfed.experiments.config import build_config

    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        build_config({"data": {"dataset": "heart-disease"}, "training": values})


@pytest.mark.parametrize("task, model", [("regression", "logistic"), ("regression", "mlp"), ("segmentation", "unet2d")])
def test_regression_and_segmentation_are_refused_at_build_time(task, model):
    with pytest.raises(ConfigError, match=f"--loss gce is for classification tasks .* a {task} task keeps its own loss"):
        make_model(model, (1, 8, 8) if task == "segmentation" else (3,), task=task, loss=make_loss("gce"))


def test_vectorized_executor_refuses_robust_numpy_models():
    from medfed.engine.executors.vectorized import STACKED_GLMS, refusal
    from medfed.methods.method import context_for
    from medfed.methods.registry import resolve

    spec, opts = resolve("fedavg", {})
    for task in TASKS:  # its batched path is cross-entropy's: a robust model must not land there
        model, _ = model_and_params(task, make_loss("sce"))
        assert type(model) not in STACKED_GLMS
        algorithm = spec.build(opts, None, context_for(["a", "b"]))
        why = refusal(algorithm, LocalTraining(model, 0.1, 2))
        assert why == "its --loss 'sce' is not batched (cross-entropy only)", why


def test_run_with_loss_ce_is_todays_run_and_gce_changes_it():
    from medfed.experiments.harness import load_federation, run_experiment
    from medfed.experiments.results import results_document

    def results(training):
        config = ExperimentConfig(data={"dataset": "heart-disease"}, methods=["fedavg", "mix"], repeats=1,
                                  training={"rounds": 3, "local_steps": 2, **training})
        doc = results_document(run_experiment(config, load_federation(config.data)))
        return [{k: v for k, v in r.items() if k not in ("seconds", "time")} for r in doc["results"]]

    default, ce, gce = results({}), results({"loss": "ce"}), results({"loss": "gce", "loss_options": {"q": 0.7}})
    assert ce == default
    assert gce != default


def test_cli_loss_flags_reach_the_config_and_errors_exit_2(tmp_path):
    from typer.testing import CliRunner

    from medfed.cli.app import app

    result = CliRunner().invoke(app, ["run", "--dataset", "heart-disease", "--loss", "gce", "--loss-option", "q=2",
                                      "--methods", "fedavg", "--repeats", "1", "--rounds", "1"])
    assert result.exit_code == 2
    assert "q=2: loss 'gce' needs 0 < q <= 1" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(app, ["audit", "robustness", "--dataset", "heart-disease", "--loss", "sce",
                                      "--loss-option", "gamma=1", "--attack", "noisy_labels",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "--loss-option gamma: loss 'sce' takes alpha (default 0.1), beta (default 1.0)" in result.output


def test_dp_sgd_trains_with_a_robust_loss():
    from medfed.experiments.harness import load_federation, run_experiment
    from medfed.experiments.results import results_document

    def auc(loss):
        config = ExperimentConfig(data={"dataset": "heart-disease"}, methods=["fedavg"], repeats=1,
                                  privacy={"dp": "sample", "clip": 1.0, "noise": 1.0},
                                  training={"rounds": 2, "local_steps": 2, "batch_size": 16, "loss": loss})
        doc = results_document(run_experiment(config, load_federation(config.data)))
        return [r["metrics"]["auc"]["mean"] for r in doc["results"]]

    ce, gce = auc("ce"), auc("gce")
    assert all(np.isfinite(gce)) and gce != ce
