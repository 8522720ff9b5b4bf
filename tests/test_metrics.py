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


def test_auc_ranks_by_logit_where_the_sigmoid_saturates():
    # a model whose logits are large (e.g. after heavy DP noise) still ranks the rows; its
    # probabilities round to exactly 0 or 1 and would tie, scoring AUC 0.5 whatever it ranks
    from medfed.experiments.metrics import model_scores
    from medfed.models import LogisticRegression

    gen = np.random.default_rng(3)
    X = gen.normal(size=(60, 4))
    y = (X[:, 0] + 0.5 * gen.normal(size=60) > 0).astype(float)
    model = LogisticRegression()
    modest = {"weight": np.array([1.0, 0.0, 0.0, 0.0]), "bias": np.zeros(1)}
    huge = {k: 1e4 * v for k, v in modest.items()}
    probabilities, logits = model_scores(model, huge, X)
    assert (probabilities == 1.0).mean() > 0.4  # every positive logit above ~37 rounds to 1: they tie
    expected = binary_metrics(y, *model_scores(model, modest, X)[:1])["auc"].value
    assert expected > 0.8
    assert binary_metrics(y, probabilities, ranking=logits)["auc"].value == pytest.approx(expected)
    assert binary_metrics(y, probabilities)["auc"].value < expected - 0.05  # what ranking by probability gave


def test_a_diverged_model_has_no_scores():
    from medfed.experiments.metrics import model_scores
    from medfed.models import LogisticRegression

    params = {"weight": np.array([np.nan, 0.0]), "bias": np.zeros(1)}
    assert model_scores(LogisticRegression(), params, np.ones((3, 2))) is None


def test_torch_models_logits_are_the_logits_of_their_probabilities():
    pytest.importorskip("torch")
    from medfed.models.registry import make_model
    from medfed.rng import KeyedRng

    model = make_model("mlp", hidden=[3])
    X = np.random.default_rng(0).normal(size=(10, 5))
    params = model.init_params((5,), KeyedRng(1))
    params = {k: v + 0.3 for k, v in params.items()}  # off the zero head, so the logits vary
    logits = model.decision(params, X)
    assert np.ptp(logits) > 0
    np.testing.assert_allclose(1 / (1 + np.exp(-logits)), model.predict_proba(params, X), rtol=1e-12)
