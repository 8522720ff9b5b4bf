"""Defining properties of the survey's client-end methods (shared/METHODS.md, §3.2)."""

import numpy as np
import pytest
from conftest import synthetic_federation

from medfed.client import LocalData, LocalTraining, sgd_steps
from medfed.client.distill import Teacher
from medfed.client.drift import batch_label_weights, semisync_steps
from medfed.client.optimizer import descend
from medfed.client.personal import ApflSiteState, apfl_update
from medfed.comm import UploadBoundary
from medfed.engine import run_federated
from medfed.errors import ConfigError
from medfed.methods.client_end import CLIENT_METHODS
from medfed.experiments.config import TrainingSpec
from medfed.methods.registry import METHODS
from medfed.methods.method import BuildContext
from medfed.models import LogisticRegression
from medfed.rng import KeyedRng
from medfed.server.control import federation_label_prior

MODEL = LogisticRegression()
SPECS = {m.name: m for m in CLIENT_METHODS}


def _build(name, training=None, sites=None, **opts):
    """``name`` built as the harness builds it: options checked by the method's schema, the
    sites' example counts known at setup."""
    names = tuple(s.name for s in sites) if sites is not None else ("s0", "s1", "s2")
    sizes = {s.name: float(s.n) for s in sites} if sites is not None else None
    spec = SPECS[name]
    return spec.build(spec.validate(opts), training or TrainingSpec(), BuildContext(names, site_sizes=sizes))


def _fedavg():
    return METHODS["fedavg"].build({}, TrainingSpec(), BuildContext(("s0",)))


def _sites(sizes=(50, 35, 20), d=4, seed=0, shift=0.7):
    """Non-IID sites: shifted features and a site-specific label rule."""
    rng = np.random.default_rng(seed)
    out = []
    for k, n in enumerate(sizes):
        X = rng.normal(size=(n, d)) + shift * k
        y = (X[:, 0] - shift * k + 0.8 * k * X[:, 1] + rng.normal(size=n) > 0).astype(float)
        out.append(LocalData(f"s{k}", X, y))
    return out


def _iid_sites(k=4, n=40, d=4, seed=3):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(k * n, d))
    y = (X @ np.linspace(1.0, -0.5, d) + rng.logistic(size=k * n) > 0).astype(float)
    return [LocalData(f"s{i}", X[i::k], y[i::k]) for i in range(k)]


def _run(algorithm, sites, training, rounds, seed=0, **kw):
    return run_federated(algorithm, MODEL.init(sites[0].X.shape[1]), sites, training, rounds, KeyedRng(seed), **kw)


def _assert_params(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if atol:
            np.testing.assert_allclose(a[k], b[k], rtol=0, atol=atol)
        else:
            np.testing.assert_array_equal(a[k], b[k])


def _dist(a, b):
    return float(np.sqrt(sum(np.sum((a[k] - b[k]) ** 2) for k in a)))


# --- SCAFFOLD ---------------------------------------------------------------------------


WEIGHTINGS = ("examples", "uniform")


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("batch_size", [None, 8])
def test_scaffold_iid_one_local_step_equals_fedavg(batch_size, weighting):
    """With one local step the corrections -c_i + c average to zero over the sites."""
    sites = _iid_sites()
    training = LocalTraining(MODEL, 0.3, 1, batch_size, 0.01)
    t = TrainingSpec(local_steps=1, lr=0.3)
    scaffold = _run(_build("scaffold", t, sites, weighting=weighting), sites, training, 8)
    fedavg = _run(_fedavg(), sites, training, 8)
    _assert_params(scaffold.params, fedavg.params, atol=1e-13)
    # the control variates did move (the equality is not because nothing happened)
    assert all(np.abs(c.control["weight"]).max() > 1e-3 for c in scaffold.client_states.values())


def test_scaffold_one_local_step_on_unequal_sites_is_fedavg_only_when_weighting_by_examples():
    """One step: the server's average of ``-c_i + c`` vanishes when it weighs the sites as ``c`` does."""
    sites = _sites(sizes=(60, 25, 10))
    training = LocalTraining(MODEL, 0.3, 1, None, 0.01)
    t = TrainingSpec(local_steps=1, lr=0.3)
    fedavg = _run(_fedavg(), sites, training, 8)
    examples = _run(_build("scaffold", t, sites), sites, training, 8)  # the default weighting
    _assert_params(examples.params, fedavg.params, atol=1e-13)
    uniform = _run(_build("scaffold", t, sites, weighting="uniform"), sites, training, 8)
    assert _dist(uniform.params, fedavg.params) > 1e-3


def _vector(params):
    return np.concatenate([params["weight"], params["bias"]])


def _centralized_optimum(sites, l2, weighting="examples"):
    """The optimum of ``sum_i p_i f_i`` (``f_i``: site i's mean loss plus ``(l2/2)||w||^2``) from a
    centralized solver on the pooled rows: scikit-learn's logistic regression (Newton steps, to
    machine precision) minimizes ``C sum_r s_r loss_r + ||w||^2 / 2``, intercept unpenalized; with
    row weights ``s_r = p_i / n_i`` (summing to 1) and ``C = 1 / l2`` that is the same objective.
    ``p_i = n_i / n`` (examples: the pooled rows' mean) or ``1 / N`` (uniform)."""
    from sklearn.linear_model import LogisticRegression as Reference

    n = sum(s.n for s in sites)
    share = [s.n / n if weighting == "examples" else 1.0 / len(sites) for s in sites]
    rows = np.concatenate([np.full(s.n, p / s.n) for s, p in zip(sites, share)])
    X = np.vstack([s.X for s in sites])
    y = np.concatenate([s.y for s in sites])
    fit = Reference(C=1.0 / l2, solver="newton-cholesky", tol=1e-15, max_iter=100).fit(X, y, sample_weight=rows)
    return np.concatenate([fit.coef_[0], fit.intercept_])


def test_scaffold_reaches_the_example_weighted_optimum_that_fedavg_misses():
    """Drift correction: on non-IID sites of unequal size with 10 local steps FedAvg settles off
    the federation's optimum (the pooled rows' objective); SCAFFOLD weighting by examples
    reaches it, also when half the sites take part each round; the paper's uniform weighting
    reaches the optimum of the sites' plain mean instead."""
    sites = _sites(sizes=(80, 40, 25, 15), shift=1.0)
    l2 = 0.05
    training = LocalTraining(MODEL, 0.2, 10, None, l2)
    pooled, uniform_best = _centralized_optimum(sites, l2), _centralized_optimum(sites, l2, "uniform")
    assert np.abs(pooled - uniform_best).max() > 1e-2  # the two objectives differ here
    err = lambda p, best=pooled: np.abs(_vector(p) - best).max()
    scaffold = _run(_build("scaffold", sites=sites), sites, training, 200)
    assert err(scaffold.params) < 1e-8
    assert err(_run(_fedavg(), sites, training, 200).params) > 1e-3
    partial = _run(_build("scaffold", sites=sites), sites, training, 200, fraction=0.5)
    assert {len(r.sites) for r in partial.history} == {2}
    assert err(partial.params) < 1e-8
    uniform = _run(_build("scaffold", sites=sites, weighting="uniform"), sites, training, 200)
    assert err(uniform.params, uniform_best) < 1e-8 and err(uniform.params) > 1e-2
    # there each c_i is the site's own gradient, and the server's c, their example-weighted mean, is zero
    for s in sites:
        g, _ = MODEL.gradient(scaffold.params, s.X, s.y, l2)
        _assert_params(scaffold.client_states[s.name].control, g, atol=1e-8)
        assert np.abs(g["weight"]).max() > 1e-2  # the sites disagree: drift to correct
    _assert_params(scaffold.server_state["scaffold_control"].control, {"weight": np.zeros(4), "bias": np.zeros(1)}, atol=1e-8)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_scaffold_control_variates_stay_on_the_site_and_only_deltas_go_up(weighting):
    sites = _sites(sizes=(40, 30, 20, 10))
    sent = []

    def spy(upload):
        sent.append(upload)
        return upload

    training = LocalTraining(MODEL, 0.2, 5)
    algorithm = _build("scaffold", sites=sites, weighting=weighting)
    run = _run(algorithm, sites, training, 6, fraction=0.5, boundary=UploadBoundary([spy]))
    assert len(sent) == 12  # two sites a round
    for u in sent:
        assert set(u.payload) == {"weight", "bias"} and u.kind == "delta"
        assert set(u.extras) == {"control_delta"}
    # each site's control variate is client state: the sum of the deltas it sent (it starts at
    # zero); after two or more rounds it differs from every single message the site sent
    for s in sites:
        state = run.client_states[s.name]
        own = None if state is None else state.control
        mine = [u.extras["control_delta"] for u in sent if u.site == s.name]
        assert (own is None) == (not mine)
        if own is None:
            continue
        _assert_params(own, {k: sum(m[k] for m in mine) for k in own}, atol=1e-12)
        if len(mine) > 1:
            assert all(_dist(own, m) > 1e-6 for m in mine)
    # the server's c is the weighted mean over all N sites (one that never took part has c_i = 0)
    assert scaffold_c_gap(run, sites, weighting) < 1e-12


def scaffold_c_gap(run, sites, weighting):
    """Distance of SCAFFOLD's server ``c`` from the (example-)weighted mean of the sites' ``c_i``."""
    server_c = run.server_state["scaffold_control"].control
    w = np.array([s.n if weighting == "examples" else 1.0 for s in sites], dtype=float)
    zero = {k: np.zeros_like(v) for k, v in server_c.items()}
    states = [zero if run.client_states[s.name] is None else run.client_states[s.name].control for s in sites]
    mean = {k: sum(wi * st[k] for wi, st in zip(w, states)) / w.sum() for k in server_c}
    return _dist(server_c, mean)


def test_scaffold_learns_example_counts_it_was_not_told_at_setup():
    """Built without the setup's example counts, the server weighs each site by the counts its
    uploads carry: with every site in each round, the same numbers as when told them."""
    sites = _sites(sizes=(60, 25, 10))
    training = LocalTraining(MODEL, 0.2, 5, None, 0.01)
    told = _run(_build("scaffold", sites=sites), sites, training, 5)
    untold = SPECS["scaffold"].build(SPECS["scaffold"].defaults, TrainingSpec(), BuildContext(tuple(s.name for s in sites)))
    _assert_params(_run(untold, sites, training, 5).params, told.params, atol=1e-15)


def test_scaffold_refuses_an_unknown_weighting():
    with pytest.raises(ConfigError, match="'weighting' must be one of examples, uniform, got 'sqrt'"):
        _build("scaffold", weighting="sqrt")


# --- FedSLD -----------------------------------------------------------------------------


def _balanced_sites(sizes=(60, 30, 90), d=4, seed=1, positive_fraction=1 / 3):
    """Every site holds the same label proportion, so every full batch matches the federation's."""
    rng = np.random.default_rng(seed)
    out = []
    for k, n in enumerate(sizes):
        y = np.zeros(n)
        y[: round(n * positive_fraction)] = 1.0
        X = rng.normal(size=(n, d)) + 0.5 * k + y[:, None]
        out.append(LocalData(f"s{k}", X, y))
    return out


def test_fedsld_uniform_labels_is_plain_cross_entropy_fedavg():
    sites = _balanced_sites()
    training = LocalTraining(MODEL, 0.3, 5, None, 0.01)
    fedsld = _run(_build("fedsld", sites=sites), sites, training, 6)
    fedavg = _run(_fedavg(), sites, training, 6)
    _assert_params(fedsld.params, fedavg.params)  # bit for bit: every weight is exactly 1
    np.testing.assert_array_equal(fedsld.train_loss, fedavg.train_loss)


def test_fedsld_reweights_skewed_labels_to_the_federation_distribution():
    sites = _sites(sizes=(60, 40, 30))
    pooled = np.concatenate([s.y for s in sites]).mean()
    sent = []

    def spy(upload):
        sent.append(upload)
        return upload

    training = LocalTraining(MODEL, 0.3, 5, None, 0.01)
    run = _run(_build("fedsld", sites=sites), sites, training, 4, boundary=UploadBoundary([spy]))
    # label counts (and nothing else extra) leave the site; the server's prior is the pooled distribution
    assert all(set(u.extras) == {"label_counts"} for u in sent)
    np.testing.assert_allclose(federation_label_prior(run.server_state["label_distribution"].counts), [1 - pooled, pooled], atol=1e-15)
    # with skewed sites the weighted loss changes the result
    fedavg = _run(_fedavg(), sites, training, 4)
    assert _dist(run.params, fedavg.params) > 1e-3
    # the weighted batch loss counts each class in the federation's proportion
    prior = np.array([0.75, 0.25])
    yb = np.array([1.0, 1.0, 1.0, 0.0])  # batch: 3/4 positive
    w = batch_label_weights(prior)(yb)
    np.testing.assert_allclose(w, [1 / 3, 1 / 3, 1 / 3, 3.0])
    np.testing.assert_allclose([w[yb == 0].sum() / len(yb), w[yb == 1].sum() / len(yb)], prior)
    # one weighted step equals the explicit weighted-gradient step
    X = np.random.default_rng(0).normal(size=(4, 3))
    p0 = {"weight": np.array([0.1, -0.2, 0.3]), "bias": np.array([0.05])}
    ours, _ = descend(MODEL, p0, X, yb, [None], 0.5, 0.0, row_weights=batch_label_weights(prior))
    r = w * (MODEL.predict_proba(p0, X) - yb)
    np.testing.assert_allclose(ours["weight"], p0["weight"] - 0.5 * X.T @ r / 4, atol=1e-15)
    np.testing.assert_allclose(ours["bias"], p0["bias"] - 0.5 * r.mean(), atol=1e-15)


# --- semi-synchronous -------------------------------------------------------------------


def test_semisync_equal_speeds_equals_synchronous_fedavg():
    sites = _sites(sizes=(50, 35, 20))
    t = TrainingSpec(local_steps=6, lr=0.2)
    # mini-batches: every site processes the same rows per step, so equal speeds give equal steps
    training = LocalTraining(MODEL, 0.2, 6, 10, 0.01)
    equal = {s.name: 3.0 for s in sites}
    for opts in ({}, {"speeds": equal}, {"speeds": equal, "budget": 20.0}):  # 20 s = 6 steps of 10 rows at 3/s
        semi = _run(_build("semisync", t, sites, **opts), sites, training, 5)
        _assert_params(semi.params, _run(_fedavg(), sites, training, 5).params)
        assert all(r.report["time_budget"] == {s.name: 6.0 for s in sites} for r in semi.history[1:])
    # full batch with equal site sizes: the same
    iid = _iid_sites()
    full = LocalTraining(MODEL, 0.2, 6, None, 0.01)
    semi = _run(_build("semisync", t, iid), iid, full, 5)
    _assert_params(semi.params, _run(_fedavg(), iid, full, 5).params)


def test_semisync_faster_sites_and_smaller_batches_run_more_steps():
    sites = _sites(sizes=(50, 35, 20))
    t = TrainingSpec(local_steps=4)
    training = LocalTraining(MODEL, 0.1, 4, None, 0.0)  # full batch: rows per step = site size
    speeds = {"s0": 100.0, "s1": 35.0, "s2": 40.0}
    run = _run(_build("semisync", t, sites, speeds=speeds), sites, training, 3)
    # slowest: s1 needs 35/35 = 1 s a step, so the budget is 4 s
    assert run.history[0].report["time_budget"] == {"s0": 4.0, "s1": 4.0, "s2": 4.0}  # first round: synchronous
    assert run.history[1].report["time_budget"] == {"s0": 8.0, "s1": 4.0, "s2": 8.0}
    assert semisync_steps(4.0, 40.0, 20) == 8 and semisync_steps(0.01, 1.0, 50) == 1
    # budgets made of whole steps are not lost to rounding
    assert all(semisync_steps(k * (7 / 3.0), 3.0, 7) == k for k in range(1, 200))


def test_semisync_rejects_unknown_sites_and_bad_speeds():
    sites = _sites()
    with pytest.raises(ConfigError, match="unknown site 'nowhere'.*s0, s1, s2"):
        _build("semisync", sites=sites, speeds={"nowhere": 1.0})
    with pytest.raises(ConfigError, match="option 'speeds' must be a table of site name = number > 0; site 's1' has 0.0"):
        _build("semisync", sites=sites, speeds={"s1": 0.0})
    with pytest.raises(ConfigError, match="'budget' must be a number >= 0"):
        _build("semisync", sites=sites, budget=-1.0)


# --- personalization --------------------------------------------------------------------


def _smoothness(X, l2):
    """Lipschitz constant of the logistic loss's gradient: lambda_max([X 1]'[X 1]) / (4 n) + l2."""
    A = np.hstack([X, np.ones((X.shape[0], 1))])
    return np.linalg.eigvalsh(A.T @ A / X.shape[0]).max() / 4 + l2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_finetune_is_never_worse_on_the_sites_training_loss(seed):
    sites = _sites(sizes=(40, 30, 25, 20), seed=seed, shift=1.0)
    l2 = 0.01
    lr = 1.0 / max(_smoothness(s.X, l2) for s in sites)  # monotone descent on every site
    training = LocalTraining(MODEL, 0.3, 5, None, l2)
    spec_t = TrainingSpec(local_steps=5, lr=0.3)
    run = _run(_build("finetune", spec_t, sites, finetune_lr=lr, finetune_steps=30), sites, training, 5, seed=seed)
    for s in sites:
        personal, global_ = run.personal[s.name], run.params
        assert MODEL.loss(personal, s.X, s.y, l2) <= MODEL.loss(global_, s.X, s.y, l2)
        assert MODEL.loss(personal, s.X, s.y, l2) < MODEL.loss(global_, s.X, s.y, l2) - 1e-4  # it did tune
    # the global model is FedAvg's
    _assert_params(run.params, _run(_fedavg(), sites, training, 5, seed=seed).params)


def test_apfl_alpha_zero_is_fedavg_and_alpha_one_is_local_training():
    sites = _sites()
    training = LocalTraining(MODEL, 0.2, 5, None, 0.01)
    fedavg = _run(_fedavg(), sites, training, 6)
    zero = _run(_build("apfl", sites=sites, alpha=0.0), sites, training, 6)
    _assert_params(zero.params, fedavg.params)
    for s in sites:
        _assert_params(zero.personal[s.name], fedavg.params)
    one = _run(_build("apfl", sites=sites, alpha=1.0), sites, training, 6)
    _assert_params(one.params, fedavg.params)  # the shared copy is FedAvg's whatever alpha
    for s in sites:
        alone, _ = sgd_steps(MODEL.init(4), s, training, KeyedRng(0), steps=30)
        _assert_params(one.personal[s.name], alone, atol=1e-12)
    # v's step is the chain rule through the mixture: lr * alpha * grad f(alpha v + (1 - alpha) w)
    g0 = {"weight": np.array([0.2, -0.1, 0.0, 0.3]), "bias": np.array([0.1])}
    v0 = {"weight": np.array([-0.4, 0.5, 0.1, 0.0]), "bias": np.array([-0.2])}
    one_step = LocalTraining(MODEL, 0.2, 1, None, 0.01)
    _, v1 = apfl_update(g0, sites[1], one_step, ApflSiteState(v0), KeyedRng(0), alpha=0.3)
    mixed = {k: 0.3 * v0[k] + 0.7 * g0[k] for k in g0}
    grad, _ = MODEL.gradient(mixed, sites[1].X, sites[1].y, 0.01)
    _assert_params(v1.local, {k: v0[k] - 0.2 * 0.3 * grad[k] for k in v0}, atol=1e-15)
    # in between: a real mixture, different from both
    half = _run(_build("apfl", sites=sites, alpha=0.5), sites, training, 6)
    for s in sites:
        assert _dist(half.personal[s.name], half.params) > 1e-2
        assert _dist(half.personal[s.name], one.personal[s.name]) > 1e-2


def test_ditto_huge_lambda_gives_the_global_model_and_is_stable():
    sites = _sites()
    training = LocalTraining(MODEL, 0.5, 5, 8, 0.01)
    fedavg = _run(_fedavg(), sites, training, 5)
    for lam in (1e8, 1e16):
        run = _run(_build("ditto", sites=sites, lam=lam), sites, training, 5)
        _assert_params(run.params, fedavg.params)  # the global model is FedAvg's, bit for bit
        for s in sites:
            assert _dist(run.personal[s.name], run.params) < 1e-7
    # small lam: personal models leave the global one, more so as lam shrinks
    gaps = [np.mean([_dist(r.personal[s.name], r.params) for s in sites])
            for r in (_run(_build("ditto", sites=sites, lam=lam), sites, training, 5) for lam in (10.0, 0.1, 0.0))]
    assert 1e-3 < gaps[0] < gaps[1] < gaps[2]


def test_personal_models_differ_from_the_global_on_non_iid_sites_and_beat_it_there():
    sites = _sites(sizes=(60, 60, 60), shift=1.5)
    training = LocalTraining(MODEL, 0.3, 5, None, 0.01)
    for name, opts in [("finetune", {}), ("apfl", {"alpha": 0.5}), ("ditto", {"lam": 0.1})]:
        run = _run(_build(name, sites=sites, **opts), sites, training, 10)
        assert set(run.personal) == {s.name for s in sites}
        for s in sites:
            assert _dist(run.personal[s.name], run.params) > 1e-2, name
        mean_personal = np.mean([MODEL.loss(run.personal[s.name], s.X, s.y) for s in sites])
        mean_global = np.mean([MODEL.loss(run.params, s.X, s.y) for s in sites])
        assert mean_personal < mean_global, name


# --- specs through the engine -----------------------------------------------------------


def _federation_sites(fed):
    return [LocalData(s.name, s.X, s.y.astype(float)) for s in fed.sites]


@pytest.mark.parametrize("name", [m.name for m in CLIENT_METHODS])
def test_each_spec_runs_through_the_engine_deterministically(name):
    fed = synthetic_federation()
    sites = _federation_sites(fed)
    spec = SPECS[name]
    assert spec.reference and spec.summary and spec.family == "survey §3.2" and spec.uploads == "delta"
    t = TrainingSpec(rounds=4, local_steps=3, lr=0.1, batch_size=16)
    training = LocalTraining(MODEL, t.lr, t.local_steps, t.batch_size, t.l2)
    teacher = Teacher(MODEL, {"weight": np.linspace(-1, 1, 5), "bias": np.zeros(1)}, "t") if name == "distill" else None
    context = BuildContext(fed.site_names, 0, teacher=teacher)

    def go(order, seed=4):
        algorithm = spec.build(spec.defaults, t, context)
        return run_federated(algorithm, MODEL.init(5), order, training, spec.rounds(t), KeyedRng(seed))

    a, b = go(sites), go(sites)
    _assert_params(a.params, b.params)
    assert np.isfinite(a.train_loss).all() and len(a.history) == 4
    assert bool(a.personal) == spec.personal
    for site in a.personal:
        _assert_params(a.personal[site], b.personal[site])
    # the order the sites are visited in does not matter
    rev = go(sites[::-1])
    _assert_params(a.params, rev.params, atol=1e-13)
    for site in a.personal:
        _assert_params(a.personal[site], rev.personal[site], atol=1e-13)
    assert _dist(go(sites, seed=5).params, a.params) > 1e-8  # mini-batches follow the seed


@pytest.mark.parametrize(
    "name, opts, message",
    [
        ("scaffold", {"server_lr": 0.0}, "'server_lr' must be a number > 0"),
        ("scaffold", {"server_lr": "fast"}, "'server_lr' must be a number"),
        ("apfl", {"alpha": 1.5}, r"'alpha' must be a number in \[0, 1\], got 1.5"),
        ("apfl", {"alpha": -0.1}, "'alpha' must be"),
        ("ditto", {"lam": -1.0}, "'lam' must be a number >= 0"),
        ("ditto", {"lam": float("inf")}, "'lam' must be"),
        ("ditto", {"personal_steps": 2.5}, "'personal_steps' must be a whole number"),
        ("finetune", {"finetune_steps": -3}, "'finetune_steps' must be a whole number >= 0"),
        ("finetune", {"finetune_lr": -0.1}, "'finetune_lr' must be a number >= 0"),
        ("semisync", {"budget": float("nan")}, "'budget' must be"),
        ("fedsld", {"mu": 1.0}, "has no option 'mu'"),
    ],
)
def test_bad_options_are_config_errors(name, opts, message):
    with pytest.raises(ConfigError, match=message):
        _build(name, **opts)
