import numpy as np
import pytest

from medfed.client import LocalData, LocalTraining, sgd_steps
from medfed.models import LogisticRegression
from medfed.rng import KeyedRng


def _data(n=50, d=4, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = (X[:, 0] + rng.normal(size=n) > 0).astype(float)
    return X, y


def test_gradient_matches_finite_differences():
    m = LogisticRegression()
    X, y = _data()
    rng = np.random.default_rng(1)
    params = {"weight": rng.normal(size=4), "bias": np.array([0.3])}
    grads, loss = m.gradient(params, X, y, l2=0.1, with_loss=True)
    assert loss == pytest.approx(m.loss(params, X, y, 0.1), abs=1e-14)
    eps = 1e-6
    for key in params:
        for i in range(params[key].size):
            up = {k: v.copy() for k, v in params.items()}
            down = {k: v.copy() for k, v in params.items()}
            up[key][i] += eps
            down[key][i] -= eps
            fd = (m.loss(up, X, y, 0.1) - m.loss(down, X, y, 0.1)) / (2 * eps)
            assert grads[key][i] == pytest.approx(fd, abs=1e-7)


def test_stable_for_extreme_logits():
    m = LogisticRegression()
    X = np.array([[1000.0], [-1000.0]])
    y = np.array([0.0, 1.0])
    params = {"weight": np.array([1.0]), "bias": np.zeros(1)}
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        p = m.predict_proba(params, X)
        loss = m.loss(params, X, y)
        grads, _ = m.gradient(params, X, y)
    assert p[0] == 1.0 and 0.0 <= p[1] < 1e-300
    assert loss == pytest.approx(1000.0)
    assert np.isfinite(grads["weight"]).all()


def test_descend_equals_explicit_gradient_steps_with_prox():
    m = LogisticRegression()
    X, y = _data()
    start = {"weight": np.full(4, 0.1), "bias": np.array([0.2])}
    center = {"weight": np.zeros(4), "bias": np.zeros(1)}
    ours, start_loss = sgd_steps(
        start, LocalData("a", X, y), LocalTraining(m, 0.3, 7, None, 0.05), KeyedRng(0), prox_center=center, mu=0.4
    )
    p = {k: v.copy() for k, v in start.items()}
    for _ in range(7):
        g, _ = m.gradient(p, X, y, 0.05)
        p = {k: p[k] - 0.3 * (g[k] + 0.4 * (p[k] - center[k])) for k in p}
    for k in p:
        np.testing.assert_allclose(ours[k], p[k], atol=1e-13)
    assert start_loss == pytest.approx(m.loss(start, X, y, 0.05))


def test_minibatches_are_seeded_and_cover_epochs():
    m = LogisticRegression()
    X, y = _data(n=40)
    cfg = LocalTraining(m, 0.1, 9, 8, 0.0)
    a, _ = sgd_steps(m.init(4), LocalData("a", X, y), cfg, KeyedRng(3, (1,)))
    b, _ = sgd_steps(m.init(4), LocalData("a", X, y), cfg, KeyedRng(3, (1,)))
    c, _ = sgd_steps(m.init(4), LocalData("a", X, y), cfg, KeyedRng(4, (1,)))
    np.testing.assert_array_equal(a["weight"], b["weight"])
    assert not np.allclose(a["weight"], c["weight"])
