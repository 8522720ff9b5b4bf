"""Defining properties of the robust aggregators (shared/METHODS.md, survey §3.3).

Data are drawn from a seeded normal generator (hypothesis picks the seed and the sizes), so
values are continuous and ties, where order-based rules may legitimately differ, do not occur.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import trim_mean

from medfed.client import LocalData, LocalTraining, local_sgd_update
from medfed.engine import run_federated
from medfed.engine.loop import FederatedAlgorithm
from medfed.errors import ConfigError, DataError
from medfed.methods.registry import METHODS
from medfed.methods.steps import build_pipeline
from medfed.models import LogisticRegression
from medfed.rng import KeyedRng
from medfed.server.aggregate import StackedUploads, apply_delta, chain, weighted_mean
from medfed.server.robust import (
    ROBUST_AGGREGATORS,
    assumption_violations,
    bulyan,
    copod_scores,
    dos,
    krum,
    median,
    multikrum,
    pairwise_distances,
    trimmed_mean,
)

SHAPES = {"w": (2, 3), "b": (1,)}
P = 7
FAST = settings(max_examples=40, deadline=None)


def _stack(X, n_examples=None, sites=None):
    """A stack from a (K, 7) matrix of flattened updates, split into two arrays of other shapes."""
    K = X.shape[0]
    payload = {"w": X[:, :6].reshape(K, 2, 3), "b": X[:, 6:]}
    n = np.arange(1.0, K + 1) if n_examples is None else n_examples
    return StackedUploads(tuple(sites or (f"s{i}" for i in range(K))), payload, n, "delta", {})


def _flat(update):
    return np.concatenate([update["w"].ravel(), update["b"].ravel()])


def _run(aggregator, X, **kw):
    value, _, report = aggregator.apply(_stack(X, **kw), None, None, 0)
    assert value["w"].shape == SHAPES["w"] and value["b"].shape == SHAPES["b"]
    return _flat(value), report


def _honest_and_corrupt(seed, K, c, scale=1e6):
    """K rows: K - c honest around a common update, c corrupted ones far away (random sign)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=P) + 0.3 * rng.normal(size=(K, P))
    bad = rng.choice(K, size=c, replace=False)
    X[bad] = scale * (1 + rng.random((c, P))) * rng.choice([-1.0, 1.0], size=(c, P))
    honest = np.setdiff1d(np.arange(K), bad)
    return X, honest, bad


def _in_range(out, X, rows):
    lo, hi = X[rows].min(axis=0), X[rows].max(axis=0)
    return np.all(out >= lo - 1e-12) and np.all(out <= hi + 1e-12)


# --------------------------------------------------------------------------- permutation invariance

CASES = {
    "median": median(),
    "trimmed_mean": trimmed_mean(beta=0.2),
    "krum": krum(f=1),
    "multikrum": multikrum(f=1, m=0),
    "bulyan": bulyan(f=1),
    "dos": dos(),
}


@FAST
@given(seed=st.integers(0, 2**32 - 1), K=st.integers(7, 14), name=st.sampled_from(sorted(CASES)))
def test_permuting_the_sites_permutes_nothing(seed, K, name):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(K, P)) * rng.uniform(0.1, 3.0, size=(K, 1))
    n = rng.integers(1, 100, size=K).astype(float)
    sites = [f"s{i}" for i in range(K)]
    perm = rng.permutation(K)
    out, report = _run(CASES[name], X, n_examples=n, sites=sites)
    out_p, report_p = _run(CASES[name], X[perm], n_examples=n[perm], sites=[sites[i] for i in perm])
    np.testing.assert_allclose(out_p, out, rtol=0, atol=1e-12)
    for key, value in report.items():
        if isinstance(value, dict):
            for site in sites:
                assert report_p[key][site] == pytest.approx(value[site], abs=1e-9)
        else:
            assert set(report_p[key]) == set(value)


# --------------------------------------------------------------------------- bounded by the honest sites


@FAST
@given(seed=st.integers(0, 2**32 - 1), K=st.integers(3, 15), scale=st.sampled_from([1.0, 1e6]))
def test_median_stays_in_honest_range_with_a_corrupted_minority(seed, K, scale):
    c = (K - 1) // 2  # the most a median tolerates
    X, honest, _ = _honest_and_corrupt(seed, K, c, scale)
    out, _ = _run(median(), X)
    assert _in_range(out, X, honest)
    np.testing.assert_allclose(out, np.median(X, axis=0), rtol=0, atol=1e-12)


@FAST
@given(
    seed=st.integers(0, 2**32 - 1),
    K=st.integers(3, 20),
    beta=st.floats(0.05, 0.49),
    scale=st.sampled_from([1.0, 1e6]),
)
def test_trimmed_mean_stays_in_honest_range_with_at_most_beta_k_corrupted(seed, K, beta, scale):
    c = int(beta * K)
    X, honest, _ = _honest_and_corrupt(seed, K, c, scale)
    out, report = _run(trimmed_mean(beta=beta), X)
    assert _in_range(out, X, honest)
    # the same cut as scipy's trim_mean (and hence Flower's _trim_mean)
    np.testing.assert_allclose(out, trim_mean(X, beta, axis=0), rtol=0, atol=1e-12)
    cut = report["cut_fraction"]
    assert sum(cut.values()) == pytest.approx(2 * c)  # 2c values cut per coordinate, no ties
    if scale == 1e6:
        assert all(cut[f"s{i}"] == 1.0 for i in np.setdiff1d(np.arange(K), honest))


@FAST
@given(
    seed=st.integers(0, 2**32 - 1),
    f=st.integers(0, 3),
    extra=st.integers(0, 4),
    collude=st.booleans(),
)
def test_krum_returns_an_honest_update_when_f_corrupted_are_far_away(seed, f, extra, collude):
    K = 2 * f + 3 + extra
    X, honest, bad = _honest_and_corrupt(seed, K, f, 1e3)
    if collude and f:
        X[bad] = X[bad[0]]  # identical corrupted updates: zero distance among themselves
    out, report = _run(krum(f=f), X)
    assert any(np.array_equal(out, X[i]) for i in honest)
    assert report["selected"] in ([f"s{i}"] for i in honest)


@FAST
@given(seed=st.integers(0, 2**32 - 1), f=st.integers(1, 3), extra=st.integers(0, 4))
def test_multikrum_keeps_only_honest_updates_and_weights_them_by_examples(seed, f, extra):
    K = 2 * f + 3 + extra
    X, honest, _ = _honest_and_corrupt(seed, K, f, 1e3)
    n = np.random.default_rng(seed).integers(1, 50, size=K).astype(float)
    out, report = _run(multikrum(f=f), X, n_examples=n)
    assert sorted(report["selected"]) == sorted(f"s{i}" for i in honest)  # m = 0 keeps K - f
    np.testing.assert_allclose(out, n[honest] @ X[honest] / n[honest].sum(), rtol=0, atol=1e-12)


@FAST
@given(seed=st.integers(0, 2**32 - 1), f=st.integers(0, 3), extra=st.integers(0, 4))
def test_bulyan_stays_in_honest_range_when_f_corrupted_are_far_away(seed, f, extra):
    # The coordinate-wise bound holds once Krum's stage keeps the corrupted updates out; an
    # attacker placed inside the honest cloud can shift a coordinate slightly past the range
    # of the honest updates (El Mhamdi et al. bound the deviation, not the range).
    K = 4 * f + 3 + extra
    X, honest, bad = _honest_and_corrupt(seed, K, f, 1e6)
    out, report = _run(bulyan(f=f), X)
    assert _in_range(out, X, honest)
    assert len(report["selected"]) == K - 2 * f
    assert not {f"s{i}" for i in bad} & set(report["selected"])


@pytest.mark.parametrize("seed", range(5))
def test_huge_corruption_moves_the_weighted_mean_but_not_the_robust_rules(seed):
    K, f = 11, 2
    X, honest, _ = _honest_and_corrupt(seed, K, f, 1e6)
    mean, _ = _run(weighted_mean(), X)
    assert not _in_range(mean, X, honest)
    for aggregator in (median(), trimmed_mean(beta=0.2), krum(f=f), multikrum(f=f), bulyan(f=f)):
        out, _ = _run(aggregator, X)
        assert _in_range(out, X, honest), aggregator.name


# --------------------------------------------------------------------------- DOS and COPOD


def test_copod_scores_on_a_hand_made_example():
    # n = 4 rows, 2 features. Feature 0 (0, 1, 2, 9) is right-skewed: its skew-corrected tail is
    # the right one; feature 1 (5, 5, 4, 0) is left-skewed: the left one. Tails by hand:
    #   left  F0 = 1/4, 2/4, 3/4, 1     left  F1 = 1, 1, 2/4, 1/4   (ties share #{<= x})
    #   right R0 = 1, 3/4, 2/4, 1/4     right R1 = 2/4, 2/4, 3/4, 1
    # p_l = -log F0 - log F1, p_r = -log R0 - log R1, p_s = -log R0 - log F1, score = max:
    #   row 0: p_l = log 4                     -> log 4
    #   row 1: p_r = log(4/3) + log 2          -> log(8/3)
    #   row 2: p_s = log 2 + log 2             -> log 4     (only the skew-corrected tail)
    #   row 3: p_s = log 4 + log 4             -> 2 log 4   (only the skew-corrected tail)
    X = np.array([[0.0, 5.0], [1.0, 5.0], [2.0, 4.0], [9.0, 0.0]])
    expected = [math.log(4), math.log(8 / 3), math.log(4), 2 * math.log(4)]
    np.testing.assert_allclose(copod_scores(X), expected, rtol=1e-14)


@pytest.mark.parametrize("seed", range(5))
def test_copod_scores_the_obvious_outlier_highest(seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(30, 4))
    X[17] = 8.0
    scores = copod_scores(X)
    assert np.argmax(scores) == 17
    assert scores[17] > np.max(np.delete(scores, 17)) + 1.0


def test_copod_rejects_bad_input():
    with pytest.raises(ValueError, match="finite"):
        copod_scores(np.array([[0.0], [np.nan]]))
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        copod_scores(np.zeros(3))


@pytest.mark.parametrize("attack", ["scale20", "sign_flip"])
@pytest.mark.parametrize("seed", range(6))
def test_dos_gives_an_injected_outlier_near_zero_weight(attack, seed):
    # 9 honest sites around a common update, one poisoned site. Uniform weights would give it
    # 1/K = 0.1; "near zero" here is below 0.01, ten times less. Its Euclidean-distance row is
    # in the right tail of every other site's column, so its COPOD score exceeds the honest
    # ones by several units and softmax(-score) shrinks its weight by e^-(that gap).
    rng = np.random.default_rng(seed)
    K = 10
    X = rng.normal(size=P) + 0.1 * rng.normal(size=(K, P))
    poisoned = int(rng.integers(K))
    X[poisoned] = 20.0 * X[poisoned] if attack == "scale20" else -X[poisoned]
    out, report = _run(dos(), X)
    weights = report["weights"]
    assert sum(weights.values()) == pytest.approx(1.0)
    assert weights[f"s{poisoned}"] < 0.01
    assert min(weights, key=weights.get) == f"s{poisoned}"
    assert report["scores"][f"s{poisoned}"] == max(report["scores"].values())
    w = np.array([weights[f"s{i}"] for i in range(K)])
    np.testing.assert_allclose(out, w @ X, rtol=0, atol=1e-12)  # the weighted sum of the updates


def test_dos_temperature_flattens_the_weights():
    rng = np.random.default_rng(0)
    X = rng.normal(size=P) + 0.1 * rng.normal(size=(10, P))
    X[0] *= 20.0
    sharp = _run(dos(temperature=1.0), X)[1]["weights"]["s0"]
    flat = _run(dos(temperature=1e6), X)[1]["weights"]["s0"]
    assert sharp < 0.01 and flat == pytest.approx(0.1, rel=1e-4)


def test_dos_sums_the_two_copod_scores_as_the_authors_code_does():
    # SPAFD main.py: scores = COPOD(D_cos) + COPOD(D_eu), weights = softmax(-scores); the mean of
    # the two (the rule before issue 8) would be this at temperature 2 and flatter weights
    rng = np.random.default_rng(3)
    X = rng.normal(size=P) + 0.2 * rng.normal(size=(8, P))
    X[5] *= -3.0
    summed = copod_scores(pairwise_distances(X, "euclidean")) + copod_scores(pairwise_distances(X, "cosine"))
    want = np.exp(-(summed - summed.min()))
    want /= want.sum()
    _, report = _run(dos(), X)
    np.testing.assert_allclose([report["weights"][f"s{i}"] for i in range(8)], want, rtol=1e-12, atol=0)
    np.testing.assert_allclose([report["scores"][f"s{i}"] for i in range(8)], summed, rtol=1e-12, atol=0)
    halved = _run(dos(temperature=2.0), X)[1]["weights"]["s5"]
    assert report["weights"]["s5"] < halved  # the sum suppresses the outlier more than the mean did


def test_dos_with_one_or_two_sites_does_not_break():
    for K in (1, 2):
        _, report = _run(dos(), np.random.default_rng(K).normal(size=(K, P)))
        assert list(report["weights"].values()) == pytest.approx([1.0 / K] * K)


# --------------------------------------------------------------------------- assumptions and bad input


@pytest.mark.parametrize(
    ("aggregator", "K", "words"),
    [
        (krum(f=1), 4, ["krum", "K=4", "f=1", "K > 2f + 2"]),
        (multikrum(f=2), 6, ["multikrum", "K=6", "f=2", "K > 2f + 2"]),
        (multikrum(f=1, m=9), 8, ["multikrum", "K=8", "m=9"]),
        (bulyan(f=1), 6, ["bulyan", "K=6", "f=1", "K >= 4f + 3"]),
        (bulyan(f=2), 10, ["bulyan", "K=10", "f=2", "K >= 4f + 3"]),
    ],
)
def test_a_round_with_too_few_sites_raises_config_error(aggregator, K, words):
    X = np.random.default_rng(0).normal(size=(K, P))
    with pytest.raises(ConfigError) as err:
        _run(aggregator, X)
    assert all(w in str(err.value) for w in words)
    name = aggregator.name
    options = {"f": 2 if "f=2" in words else 1} | ({"m": 9} if "m=9" in words else {})
    notes = assumption_violations(name, K, **options)
    assert notes and notes[0].startswith(name) and "required" in notes[0]
    # one more site (or a smaller m) and the requirement holds
    fixed = assumption_violations(name, K + 1, **options) if "m=9" not in words else assumption_violations(name, K)
    assert not any("required" in n for n in fixed)


def test_assumption_violations_at_the_boundaries():
    assert assumption_violations("krum", 5, f=1) == []
    assert assumption_violations("krum", 4, f=1) != []
    assert assumption_violations("multikrum", 5, f=1) == []
    assert assumption_violations("bulyan", 7, f=1) == []
    assert assumption_violations("bulyan", 11, f=2) == []
    assert assumption_violations("bulyan", 10, f=2) != []
    assert assumption_violations("median", 5, f=2) == []
    assert "fewer than half" in assumption_violations("median", 4, f=2)[0]
    assert assumption_violations("trimmed_mean", 10, beta=0.2, f=2) == []
    assert "fewer than f=3" in assumption_violations("trimmed_mean", 10, beta=0.2, f=3)[0]
    assert "trims nothing" in assumption_violations("trimmed_mean", 5, beta=0.1)[0]
    assert "may be averaged in" in assumption_violations("multikrum", 8, f=1, m=8)[0]
    assert assumption_violations("dos", 10, f=2) == []
    assert "cannot single out" in assumption_violations("dos", 2)[0]
    # what the audit reports is what a round does: every required note is a ConfigError there
    for K in range(1, 12):
        for f in range(3):
            for name in ("krum", "multikrum", "bulyan"):
                required = any("required" in n for n in assumption_violations(name, K, f=f))
                X = np.random.default_rng(K).normal(size=(K, P))
                if required:
                    with pytest.raises(ConfigError):
                        _run(ROBUST_AGGREGATORS[name](f=f), X)
                else:
                    _run(ROBUST_AGGREGATORS[name](f=f), X)


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("krum", {"f": -1}, "'f' must be a whole number >= 0, got -1"),
        ("krum", {"f": 1.5}, "'f' must be a whole number >= 0, got 1.5"),
        ("krum", {"f": True}, "'f' must be a whole number >= 0, got True"),
        ("multikrum", {"m": -2}, "'m' must be a whole number >= 0"),
        ("bulyan", {"f": "1"}, "'f' must be a whole number >= 0, got '1'"),
        ("trimmed_mean", {"beta": 0.5}, r"'beta' must be a number in \[0, 0.5\), got 0.5"),
        ("trimmed_mean", {"beta": -0.1}, "'beta' must be"),
        ("trimmed_mean", {"beta": float("nan")}, "'beta' must be"),
        ("dos", {"temperature": 0.0}, "'temperature' must be a number > 0"),
        ("dos", {"temperature": float("inf")}, "'temperature' must be a number > 0, got inf"),
    ],
)
def test_bad_hyperparameters_raise_config_error_naming_them(method, options, message):
    # the option schema refuses them, as a method's options and as a pipeline step's
    with pytest.raises(ConfigError, match=rf"method '{method}' option {message}"):
        METHODS[method].validate(options)
    with pytest.raises(ConfigError, match=rf"step '{method}' option {message}"):
        build_pipeline([{"step": method, **options}])


def test_assumption_violations_refuses_unknown_names_and_options():
    with pytest.raises(ConfigError, match="beta"):
        assumption_violations("krum", 5, beta=0.1)
    with pytest.raises(ConfigError, match="geomed"):
        assumption_violations("geomed", 5)


def test_integral_floats_from_a_config_file_are_accepted():
    assert krum(f=1.0).name == "krum" and multikrum(f=2.0, m=3.0).name == "multikrum"


def test_non_finite_updates_are_named_not_propagated():
    X = np.random.default_rng(0).normal(size=(7, P))
    X[4, 2] = np.nan
    for aggregator in CASES.values():
        with pytest.raises(DataError, match="s4"):
            _run(aggregator, X)


# --------------------------------------------------------------------------- end to end


def test_median_aggregation_trains_the_synthetic_federation(federation):
    model = LogisticRegression()
    sites = [LocalData(s.name, s.X, s.y) for s in federation.sites]
    training = LocalTraining(model, 0.1, 5, None, 0.01)
    d = federation.sites[0].X.shape[1]

    def train(reduce):
        algorithm = FederatedAlgorithm(reduce.name, local_sgd_update, chain(reduce, apply_delta()))
        return run_federated(algorithm, model.init(d), sites, training, 30, KeyedRng(0))

    robust, fedavg = train(median()), train(weighted_mean())
    loss = robust.train_loss
    assert np.all(np.diff(loss) < 0)  # every round improves the global model
    assert loss[-1] < loss[0] - 0.1
    # with honest sites it ends close to FedAvg (the sites differ, so not equal)
    assert abs(loss[-1] - fedavg.train_loss[-1]) < 0.02
    assert set(robust.history[-1].report["median"]["cut_fraction"]) == set(federation.site_names)


def test_dos_scores_ignore_the_scale_of_the_updates_and_survive_huge_finite_ones():
    """A boosted attack (x1e200) used to overflow the distances into inf and crash COPOD."""
    from medfed.client.upload import Upload
    from medfed.server.aggregate import stack_uploads
    from medfed.server.robust import dos

    rng = np.random.default_rng(0)
    honest = [rng.normal(size=6) for _ in range(5)]

    def round_of(factor, attacker):
        ups = [Upload(f"s{i}", {"w": factor * v}, 10, "delta") for i, v in enumerate(honest)]
        ups.append(Upload("bad", {"w": factor * attacker}, 10, "delta"))
        return stack_uploads(ups)

    attacker = 50 * rng.normal(size=6)
    agg = dos()
    _, _, plain = agg.apply(round_of(1.0, attacker), None, {"w": np.zeros(6)}, 0)
    _, _, scaled = agg.apply(round_of(1e200, attacker), None, {"w": np.zeros(6)}, 0)
    for site in plain["weights"]:
        assert scaled["weights"][site] == pytest.approx(plain["weights"][site], rel=1e-9)
    assert scaled["weights"]["bad"] < 0.01
