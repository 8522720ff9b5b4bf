"""Defining properties of the survey's federated methods (shared/METHODS.md, §2.3 and §6)."""


import numpy as np
import pytest
from conftest import shifted_sites
from sklearn.linear_model import LogisticRegression as SkLogisticRegression

from medfed.client import LocalData, LocalTraining, fedprox_update, sgd_steps
from medfed.client.upload import Upload
from medfed.comm import UploadBoundary
from medfed.engine import run_federated, select_sites
from medfed.errors import ConfigError
from medfed.experiments.config import TrainingSpec
from medfed.methods.registry import METHODS, resolve_methods
from medfed.methods.method import BuildContext
from medfed.models import LogisticRegression
from medfed.rng import KeyedRng
from medfed.server import stack_uploads, weighted_mean

MODEL = LogisticRegression()
CONTEXT = BuildContext(("a", "b"))


_sites = shifted_sites


def _fedavg():
    return METHODS["fedavg"].build({}, TrainingSpec(), CONTEXT)


def _fedprox(mu):
    return METHODS["fedprox"].build(METHODS["fedprox"].validate({"mu": mu}), TrainingSpec(), CONTEXT)


def test_fedavg_with_one_site_equals_local_training():
    site = _sites(sizes=(60,))
    training = LocalTraining(MODEL, 0.2, 10, None, 0.01)
    run = run_federated(_fedavg(), MODEL.init(4), site, training, 7, KeyedRng(0))
    local, _ = sgd_steps(MODEL.init(4), site[0], training, KeyedRng(0), steps=70)
    for k in local:
        np.testing.assert_allclose(run.params[k], local[k], rtol=0, atol=1e-13)


def test_full_batch_fedsgd_equals_centralized_gradient_descent_on_the_union():
    sites = _sites()
    t = TrainingSpec(rounds=6, local_steps=10, lr=0.3, l2=0.02)
    spec = METHODS["fedsgd"]
    training = LocalTraining(MODEL, t.lr, t.local_steps, None, t.l2)
    run = run_federated(spec.build({"server_lr": 0.0}, t, CONTEXT), MODEL.init(4), sites, training, spec.rounds(t), KeyedRng(0))
    assert len(run.history) == 60  # local_steps gradient exchanges per round
    union = LocalData("union", np.vstack([s.X for s in sites]), np.concatenate([s.y for s in sites]))
    central, _ = sgd_steps(MODEL.init(4), union, LocalTraining(MODEL, t.lr, 60, None, t.l2), KeyedRng(0))
    for k in central:
        np.testing.assert_allclose(run.params[k], central[k], rtol=0, atol=1e-10)
    # the recorded training loss is the loss of the global model on the union
    assert run.history[0].train_loss == pytest.approx(MODEL.loss(MODEL.init(4), union.X, union.y, t.l2))


def test_fedprox_with_mu_zero_equals_fedavg_and_mu_pulls_toward_global():
    sites = _sites()
    training = LocalTraining(MODEL, 0.3, 10, None, 0.0)
    avg = run_federated(_fedavg(), MODEL.init(4), sites, training, 5, KeyedRng(1))
    prox0 = run_federated(_fedprox(0.0), MODEL.init(4), sites, training, 5, KeyedRng(1))
    for k in avg.params:
        np.testing.assert_array_equal(avg.params[k], prox0.params[k])
    # the proximal term shrinks each site's drift from the global model
    g = {"weight": np.full(4, 0.2), "bias": np.zeros(1)}
    drift = []
    for mu in (0.0, 0.5, 2.0):
        up, _ = fedprox_update(g, sites[2], training, None, KeyedRng(0), mu=mu)
        drift.append(np.sqrt(sum(float(np.sum(v**2)) for v in up.payload.values())))
    assert drift[0] > drift[1] > drift[2]


def test_fedavg_iid_sites_close_to_pooled_training():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(400, 4))
    y = (X @ np.array([1.0, -1.0, 0.5, 0.0]) + rng.logistic(size=400) > 0).astype(float)
    sites = [LocalData(f"s{k}", X[k::4], y[k::4]) for k in range(4)]
    training = LocalTraining(MODEL, 0.5, 5, None, 0.01)
    run = run_federated(_fedavg(), MODEL.init(4), sites, training, 200, KeyedRng(0))
    pooled, _ = sgd_steps(MODEL.init(4), LocalData("p", X, y), training, KeyedRng(0), steps=1000)
    np.testing.assert_allclose(run.params["weight"], pooled["weight"], atol=2e-2)


def test_mix_setting_converges_to_scikit_learn_solution_with_same_l2():
    """Mix = gradient descent on the pooled rows; the optimum is sklearn's with C = 1 / (n * l2)."""
    sites = _sites(sizes=(80, 60, 40))
    X = np.vstack([s.X for s in sites])
    y = np.concatenate([s.y for s in sites])
    X = (X - X.mean(0)) / X.std(0)
    l2 = 0.05
    ours, _ = sgd_steps(MODEL.init(4), LocalData("pooled", X, y), LocalTraining(MODEL, 1.0, 3000, None, l2), KeyedRng(0))
    sk = SkLogisticRegression(C=1.0 / (len(y) * l2), tol=1e-12, max_iter=10000).fit(X, y)
    # stated tolerance: 1e-6 on every coefficient
    np.testing.assert_allclose(ours["weight"], sk.coef_[0], atol=1e-6)
    np.testing.assert_allclose(ours["bias"], sk.intercept_, atol=1e-6)


def test_weighted_mean_is_permutation_invariant_and_weights_sum_to_one():
    rng = np.random.default_rng(0)
    uploads = [
        Upload(f"s{k}", {"weight": rng.normal(size=3), "bias": rng.normal(size=1)}, int(n), "delta", {"loss": 1.0})
        for k, n in enumerate([10, 30, 60])
    ]
    agg = weighted_mean()
    mean, _, _ = agg.apply(stack_uploads(uploads), None, None, 0)
    perm, _, _ = agg.apply(stack_uploads(uploads[::-1]), None, None, 0)
    np.testing.assert_allclose(mean["weight"], perm["weight"], atol=1e-15)
    # identical uploads average to themselves: the weights sum to one
    same = [Upload(u.site, uploads[0].payload, u.n_examples, "delta") for u in uploads]
    m2, _, _ = agg.apply(stack_uploads(same), None, None, 0)
    np.testing.assert_allclose(m2["weight"], uploads[0].payload["weight"], atol=1e-15)
    expected = sum(n * u.payload["weight"] for n, u in zip([10, 30, 60], uploads)) / 100
    np.testing.assert_allclose(mean["weight"], expected, atol=1e-15)


def test_every_upload_passes_the_boundary_and_is_counted():
    sites = _sites()
    seen = []

    def spy(upload):
        seen.append(upload.site)
        return upload

    boundary = UploadBoundary([spy])
    run = run_federated(_fedavg(), MODEL.init(4), sites, LocalTraining(MODEL, 0.1, 2), 3, KeyedRng(0), boundary=boundary)
    assert seen == ["s0", "s1", "s2"] * 3
    assert boundary.bytes_sent == 3 * 3 * (4 + 1) * 8
    assert [r.bytes_up for r in run.history] == [3 * 5 * 8] * 3


def test_site_selection_fraction_minimum_and_seed():
    all_sites = select_sites(5, 1.0, 1, KeyedRng(0))
    np.testing.assert_array_equal(all_sites, np.arange(5))
    picks = [tuple(select_sites(10, 0.3, 1, KeyedRng(0, (r,)))) for r in range(20)]
    assert all(len(p) == 3 and len(set(p)) == 3 for p in picks)
    assert len(set(picks)) > 1  # rounds differ
    assert picks == [tuple(select_sites(10, 0.3, 1, KeyedRng(0, (r,)))) for r in range(20)]
    assert len(select_sites(10, 0.1, 4, KeyedRng(0))) == 4
    with pytest.raises(ConfigError, match="min_sites"):
        select_sites(3, 1.0, 4, KeyedRng(0))


def test_partial_participation_uses_only_selected_sites():
    sites = _sites(sizes=(30, 30, 30, 30))
    run = run_federated(_fedavg(), MODEL.init(4), sites, LocalTraining(MODEL, 0.1, 2), 6, KeyedRng(2), fraction=0.5)
    assert all(len(r.sites) == 2 for r in run.history)
    assert len({r.sites for r in run.history}) > 1


def test_results_do_not_depend_on_the_order_sites_are_visited():
    """Mini-batch draws are keyed by site name, and the weighted mean is order-free."""
    sites = _sites(sizes=(30, 25, 40))
    training = LocalTraining(MODEL, 0.1, 4, batch_size=7)
    a = run_federated(_fedavg(), MODEL.init(4), sites, training, 4, KeyedRng(9))
    b = run_federated(_fedavg(), MODEL.init(4), sites[::-1], training, 4, KeyedRng(9))
    np.testing.assert_allclose(a.params["weight"], b.params["weight"], rtol=0, atol=1e-13)
    c = run_federated(_fedavg(), MODEL.init(4), sites, training, 4, KeyedRng(10))
    assert not np.allclose(a.params["weight"], c.params["weight"])


def test_method_names_display_names_and_options():
    assert [METHODS[n].display for n in ["cross", "single", "mix", "fedavg", "fedsgd", "fedprox"]] == [
        "Cross", "Single", "Mix", "FedAvg", "FedSGD", "FedProx"
    ]
    (spec, opts), = resolve_methods(["FedProx"], {"fedprox": {"mu": 0.5}})
    assert spec.name == "fedprox" and opts == {"mu": 0.5}
    with pytest.raises(ConfigError, match="unknown method 'fedfoo'"):
        resolve_methods(["fedfoo"], {})
    with pytest.raises(ConfigError, match="no option 'nu'"):
        resolve_methods(["fedprox"], {"fedprox": {"nu": 1.0}})
    for spec in METHODS.values():
        assert spec.reference and spec.summary


from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, 6),
    d=st.integers(1, 5),
    data=st.data(),
)
def test_weighted_mean_properties_hypothesis(k, d, data):
    values = data.draw(arrays(np.float64, (k, d), elements=st.floats(-1e6, 1e6)))
    counts = data.draw(st.lists(st.integers(1, 10_000), min_size=k, max_size=k))
    uploads = [Upload(f"s{i}", {"w": values[i]}, counts[i], "delta") for i in range(k)]
    agg = weighted_mean()
    mean, _, _ = agg.apply(stack_uploads(uploads), None, None, 0)
    perm = data.draw(st.permutations(range(k)))
    shuffled, _, _ = agg.apply(stack_uploads([uploads[i] for i in perm]), None, None, 0)
    scale = 1e-9 * (1 + np.abs(values).max())
    np.testing.assert_allclose(mean["w"], shuffled["w"], atol=scale)
    # a convex combination: inside the coordinate-wise range of the uploads
    assert np.all(mean["w"] >= values.min(axis=0) - scale)
    assert np.all(mean["w"] <= values.max(axis=0) + scale)


def test_listing_commands():
    from typer.testing import CliRunner

    from medfed.cli.app import app

    r = CliRunner().invoke(app, ["methods"])
    assert r.exit_code == 0 and "FedProx" in r.output and "McMahan" in r.output
    r = CliRunner().invoke(app, ["datasets"])
    assert r.exit_code == 0 and "adni-like" in r.output and "heart-disease" in r.output
