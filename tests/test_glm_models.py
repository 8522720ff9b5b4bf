"""The softmax and linear models (medfed.models.glm): their centralized fit (Mix's training) equals
scikit-learn's on the same data, their gradients are the objective's, per-example gradients are
consistent, and --model resolves by task.

Correspondence of the objectives (n rows):
- softmax: ours mean_i CE_i + (l2/2)||W||²  =  sklearn's (C sum_i CE_i + ||W||²/2) / (C n)  with C = 1/(n l2);
- linear:  ours mean_i r_i²/2 + (l2/2)||w||²  =  Ridge's (||r||² + alpha ||w||²) / (2 n)     with alpha = n l2.
"""

from __future__ import annotations

import numpy as np
import pytest

from medfed.client.local import LocalData
from medfed.data.federation import Federation, Site
from medfed.errors import ConfigError
from medfed.experiments.config import ExperimentConfig
from medfed.experiments.harness import TrainingPlan
from medfed.models.glm import LinearRegression, SoftmaxRegression
from medfed.models.registry import make_model
from medfed.rng import KeyedRng

L2 = 0.05


def data(task: str, n=150, d=4, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    if task == "multiclass":
        y = np.argmax(X @ rng.normal(size=(d, 3)) + rng.gumbel(size=(n, 3)), axis=1)
    else:
        y = X @ rng.normal(size=d) + 0.5 * rng.normal(size=n) + 3.0
    return X, y


def mix_fit(task: str, X, y):
    """What Mix trains: the harness's centralized plan (full-batch gradient descent) on the pooled rows."""
    sites = (Site("A", X[: len(y) // 2], y[: len(y) // 2], task=task), Site("B", X[len(y) // 2:], y[len(y) // 2:], task=task))
    fed = Federation("f", sites, tuple(f"x{j}" for j in range(X.shape[1])), task=task,
                     classes=("a", "b", "c") if task == "multiclass" else ())
    config = ExperimentConfig(data={"dataset": "heart-disease"}, training={"rounds": 400, "local_steps": 10,
                                                                            "lr": 1.0, "l2": L2})
    plan = TrainingPlan.of(config, fed)
    fit = plan.centralized(LocalData("pooled", X, y.astype(np.float64)), plan.initial(fed, 0), KeyedRng(0))
    return plan.model, fit.params


def test_softmax_mix_equals_sklearn_multinomial():
    from sklearn.linear_model import LogisticRegression

    X, y = data("multiclass")
    model, params = mix_fit("multiclass", X, y)
    assert isinstance(model, SoftmaxRegression)
    ref = LogisticRegression(C=1.0 / (len(y) * L2), tol=1e-12, max_iter=10_000).fit(X, y)
    np.testing.assert_allclose(model.predict(params, X), ref.predict_proba(X), atol=1e-6)
    np.testing.assert_allclose(params["weight"], ref.coef_.T, atol=1e-6)
    np.testing.assert_allclose(params["bias"], ref.intercept_ - ref.intercept_.mean(), atol=1e-6)


def test_linear_mix_equals_sklearn_ridge():
    from sklearn.linear_model import Ridge

    X, y = data("regression")
    model, params = mix_fit("regression", X, y)
    assert isinstance(model, LinearRegression)
    ref = Ridge(alpha=len(y) * L2).fit(X, y)
    np.testing.assert_allclose(params["weight"], ref.coef_, atol=1e-6)
    np.testing.assert_allclose(params["bias"], [ref.intercept_], atol=1e-6)


@pytest.mark.parametrize("task", ["multiclass", "regression"])
def test_gradient_is_the_objectives_and_example_gradients_agree(task):
    X, y = data(task, n=40, d=3, seed=1)
    model = SoftmaxRegression(3) if task == "multiclass" else LinearRegression()
    rng = np.random.default_rng(2)
    params = {k: rng.normal(size=v.shape) for k, v in model.init_params((3,)).items()}
    grads, loss = model.gradient(params, X, y, L2, with_loss=True)
    assert loss == pytest.approx(model.loss(params, X, y, L2), rel=1e-12)
    eps = 1e-6
    for k, v in params.items():
        for idx in np.ndindex(v.shape):
            up, down = ({**params, k: v.copy()} for _ in range(2))
            up[k][idx] += eps
            down[k][idx] -= eps
            numeric = (model.loss(up, X, y, L2) - model.loss(down, X, y, L2)) / (2 * eps)
            assert np.asarray(grads[k])[idx] == pytest.approx(numeric, abs=1e-7)
    per = model.per_example_gradients(params, X, y)
    with model.session(params, X, y) as s:
        rows = np.arange(0, 40, 3)
        factored = s.example_gradients(rows)
        norms = np.sqrt(sum(np.square(per[k][rows]).reshape(rows.size, -1).sum(axis=1) for k in per))
        np.testing.assert_allclose(factored.norms, norms, rtol=1e-12)
        f = np.linspace(0.1, 1.0, rows.size)
        total = factored.weighted_sum(f)
        for k in per:
            np.testing.assert_allclose(np.reshape(total[k], -1), np.tensordot(f, per[k][rows], axes=1).reshape(-1),
                                       rtol=1e-12, atol=1e-14)


def test_model_names_resolve_by_task():
    assert make_model("logistic", (3,), task="multiclass", n_classes=4).n_classes == 4
    assert make_model("linear", (3,), task="regression").name == "linear"
    assert make_model("logistic", (3,)).name == "logistic"  # binary: today's model
    assert make_model("mlp", (3,), task="multiclass", n_classes=3).param_shapes((3,))["head.bias"] == (3,)
    with pytest.raises(ConfigError, match="model 'linear' cannot train a multiclass task; choose one of softmax, torch_l"):
        make_model("linear", (3,), task="multiclass", n_classes=3)
    with pytest.raises(ConfigError, match="model 'softmax' cannot train a binary task; choose one of logistic, torch_l"):
        make_model("softmax", (3,))
    with pytest.raises(ConfigError, match="feature tables"):
        make_model("linear", task="regression").init_params((1, 4, 4))
