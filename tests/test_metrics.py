import numpy as np
import pytest
from sklearn.metrics import accuracy_score, recall_score, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from medfed.experiments.metrics import binary_metrics, roc_auc, roc_curve


@pytest.mark.parametrize("seed", range(6))
def test_metrics_agree_with_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(80) < 0.4).astype(int)
    scores = np.round(rng.random(80), 1 + seed % 2)  # rounding creates ties
    m = binary_metrics(y, scores)
    pred = (scores >= 0.5).astype(int)
    assert m["acc"].value == pytest.approx(accuracy_score(y, pred), abs=1e-15)
    assert m["sen"].value == pytest.approx(recall_score(y, pred), abs=1e-15)
    assert m["spe"].value == pytest.approx(recall_score(1 - y, 1 - pred), abs=1e-15)
    assert m["auc"].value == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    fpr, tpr = roc_curve(y, scores)
    sk_fpr, sk_tpr, _ = sk_roc_curve(y, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)


def test_undefined_metrics_are_null_with_a_reason():
    y = np.ones(10, dtype=int)
    m = binary_metrics(y, np.linspace(0, 1, 10))
    assert m["auc"].value is None and "one class" in m["auc"].reason
    assert m["spe"].value is None and "negative" in m["spe"].reason
    assert m["sen"].value == pytest.approx(0.5)
    m = binary_metrics(np.zeros(10, dtype=int), np.linspace(0, 1, 10))
    assert m["sen"].value is None and "positive" in m["sen"].reason


def test_auc_of_perfect_and_reversed_scores():
    y = np.array([0, 0, 1, 1])
    assert roc_auc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert roc_auc(y, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert roc_auc(y, np.full(4, 0.5)) == 0.5
