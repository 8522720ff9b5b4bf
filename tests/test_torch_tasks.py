"""Torch heads for every task: a torch_logistic equals the numpy model of its task (objective,
gradient, per-example gradients, predictions) in float64; torch models train multiclass,
regression and multilabel tasks end to end through `medfed run`."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from medfed.cli.app import app
from medfed.models.registry import make_model

runner = CliRunner()
TOL = 1e-10


def _data(task: str, n: int = 40, d: int = 5, k: int = 3):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(n, d))
    if task == "multiclass":
        y = rng.integers(0, k, n).astype(np.float64)  # the harness hands labels over as floats
    elif task == "regression":
        y = X @ rng.normal(size=d) + rng.normal(size=n)
    else:
        y = (rng.random((n, k)) < 0.4).astype(np.float64)
    return X, y


def _pair(task: str, d: int, k: int):
    """The numpy model of ``task`` and a float64 torch_logistic with the task's head, with the same
    nonzero parameters (torch's head.weight is the numpy weight transposed)."""
    rng = np.random.default_rng(4)
    numpy_model = make_model("logistic", (d,), task=task, n_classes=k)
    torch_model = make_model("torch_logistic", (d,), task=task, n_classes=k, dtype="float64", device="cpu")
    width = 1 if task == "regression" else k
    W, b = rng.normal(size=(d, width)), rng.normal(size=width)
    numpy_params = {"weight": W[:, 0], "bias": b} if task == "regression" else {"weight": W, "bias": b}
    return numpy_model, torch_model, numpy_params, {"head.weight": W.T.copy(), "head.bias": b.copy()}


def _as_torch_view(task: str, grads: dict) -> dict:
    w = grads["weight"]
    return {"head.weight": (w[None, :] if task == "regression" else w.T), "head.bias": np.reshape(grads["bias"], -1)}


@pytest.mark.parametrize("task", ["multiclass", "regression", "multilabel"])
def test_torch_logistic_equals_the_numpy_model_of_its_task(task):
    X, y = _data(task)
    numpy_model, torch_model, p_np, p_t = _pair(task, X.shape[1], 3)
    l2 = 0.3
    assert torch_model.loss(p_t, X, y, l2) == pytest.approx(numpy_model.loss(p_np, X, y, l2), abs=TOL)
    g_np, loss_np = numpy_model.gradient(p_np, X, y, l2, with_loss=True)
    g_t, loss_t = torch_model.gradient(p_t, X, y, l2, with_loss=True)
    assert loss_t == pytest.approx(loss_np, abs=TOL)
    for name, value in _as_torch_view(task, g_np).items():
        np.testing.assert_allclose(g_t[name], value, atol=TOL, rtol=0)
    # a session's batch gradient (what local SGD and FedProx/SCAFFOLD step on) and its loss
    rows = np.arange(0, X.shape[0], 3)
    with numpy_model.session(p_np, X, y) as s_np, torch_model.session(p_t, X, y) as s_t:
        (b_np, _), (b_t, _) = s_np.gradient(rows), s_t.gradient(rows)
        assert s_t.loss() == pytest.approx(s_np.loss(), abs=TOL)
        for name, value in _as_torch_view(task, b_np).items():
            np.testing.assert_allclose(b_t[name].numpy(), value, atol=TOL, rtol=0)
    # DP-SGD's per-example gradients through torch.func follow the head
    per_np, per_t = numpy_model.per_example_gradients(p_np, X, y), torch_model.per_example_gradients(p_t, X, y)
    w = per_np["weight"]
    np.testing.assert_allclose(per_t["head.weight"], w[:, None, :] if task == "regression" else w.transpose(0, 2, 1),
                               atol=TOL, rtol=0)
    np.testing.assert_allclose(per_t["head.bias"], per_np["bias"].reshape(X.shape[0], -1), atol=TOL, rtol=0)
    np.testing.assert_allclose(torch_model.predict(p_t, X), numpy_model.predict(p_np, X), atol=TOL, rtol=0)


def test_heads_are_named_and_sized_by_task_and_refuse_what_they_cannot_train():
    from medfed.errors import ConfigError

    shapes = {task: make_model("cnn2d", (1, 8, 8), task=task, n_classes=4, channels=[4]).param_shapes((1, 8, 8))
              for task in ("binary", "multiclass", "regression", "multilabel")}
    assert shapes["binary"]["head.weight"] == shapes["regression"]["head.weight"] == (1, 4)
    assert shapes["multiclass"]["head.weight"] == shapes["multilabel"]["head.weight"] == (4, 4)
    assert all(set(s) == set(shapes["binary"]) for s in shapes.values())  # FedBN/FedPer key on the same names
    with pytest.raises(ConfigError, match="a multiclass head needs at least 2 classes, got None"):
        make_model("mlp", (3,), task="multiclass")
    from medfed.models.torch_models import TorchModel

    with pytest.raises(ConfigError, match="model 'mlp' has no head for a segmentation task"):
        TorchModel("mlp", task="segmentation")


def _table(path) -> str:
    rng = np.random.default_rng(0)
    n = 30
    X = rng.normal(size=(3 * n, 3))
    dx = np.array(["ad", "mci", "nc"])[np.argmax(X @ rng.normal(size=(3, 3)) + rng.gumbel(size=(3 * n, 3)), 1)]
    age = np.round(60 + 5 * X @ np.array([1.0, -0.5, 0.3]) + rng.normal(size=3 * n), 2)
    pd.DataFrame({"site": np.repeat(["A", "B", "C"], n), "a": X[:, 0], "b": X[:, 1], "c": X[:, 2], "dx": dx,
                  "age": age}).to_csv(path, index=False)
    return str(path)


def _run(tmp_path, label, *extra):
    out = tmp_path / f"out-{label}"
    result = runner.invoke(app, ["run", "--data", _table(tmp_path / "t.csv"), "--site-column", "site",
                                 "--label-column", label, "--exclude", "age" if label == "dx" else "dx",
                                 "--model", "mlp", "--model-option", "hidden=8", "--repeats", "1", "--rounds", "4",
                                 "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    return json.loads((out / "results.json").read_text())


def test_mlp_multiclass_run_end_to_end(tmp_path):
    doc = _run(tmp_path, "dx", "--methods", "single,mix,fedavg,fedbn,fedper", "--lr", "0.3")
    assert doc["task"] == "multiclass" and doc["model"]["fitted"] == "mlp"
    rows = [r for r in doc["results"] if r["computable"]]
    assert {r["setting"] for r in rows} == {"Single", "Mix", "FedAvg", "FedBN", "FedPer"}
    for r in rows:
        assert set(r["per_class"]["sen"]) == {"ad", "mci", "nc"} and 0.0 <= r["metrics"]["macro_auc"]["mean"] <= 1.0
    mix = [r["metrics"]["acc"]["mean"] for r in rows if r["setting"] == "Mix"]
    assert np.mean(mix) > 0.5  # three classes: chance is about a third; the MLP learns them


def test_mlp_regression_run_with_dp_sgd(tmp_path):
    doc = _run(tmp_path, "age", "--methods", "mix,fedavg", "--lr", "0.05", "--model-option", "norm=group",
               "--model-option", "optimizer=sgd", "--dp", "sample", "--batch-size", "8", "--clip", "5", "--noise", "0.3")
    assert doc["task"] == "regression" and doc["model"]["fitted"] == "mlp"
    for r in doc["results"]:
        assert r["computable"] and np.isfinite(r["metrics"]["rmse"]["mean"])
