"""Server optimizers and server-end weighting (survey §3.3): the defining properties of
shared/METHODS.md, step-by-step numpy references, and hypothesis property tests."""

import numpy as np
import pytest
from conftest import shifted_sites
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.fft import dctn

from medfed.client import LocalTraining, local_sgd_update
from medfed.client.upload import Upload
from medfed.engine import run_federated
from medfed.engine.loop import FederatedAlgorithm
from medfed.errors import ConfigError, DataError
from medfed.methods.registry import METHODS
from medfed.methods.steps import REDUCING_STEPS, build_pipeline
from medfed.models import LogisticRegression
from medfed.rng import KeyedRng
from medfed.server import apply_delta, chain, stack_uploads, weighted_mean
from medfed.server.optimizers import (
    server_adagrad,
    server_adam,
    server_momentum,
    server_yogi,
)
from medfed.server.fourier import fourier
from medfed.server.weighting import fair, guided, loss_weighted

SHAPES = {"weight": (3, 4), "bias": (2,)}


def _stack(rng, counts=(40, 25, 10, 7), losses=None, kind="delta", scale=1.0):
    uploads = []
    for i, n in enumerate(counts):
        metrics = {} if losses is None else {"loss": float(losses[i])}
        payload = {k: scale * rng.normal(size=s) for k, s in SHAPES.items()}
        uploads.append(Upload(f"s{i}", payload, n, kind, metrics))
    return stack_uploads(uploads)


def _global(rng):
    return {k: rng.normal(size=s) for k, s in SHAPES.items()}


def _mean(stack):
    return weighted_mean().apply(stack, None, None, 0)[0]


def _run_steps(step, deltas, g):
    """Feed a sequence of aggregated deltas through an update→update step; return its steps."""
    state = step.init(g)
    out = []
    for r, d in enumerate(deltas):
        s, state, _ = step.apply(d, state, g, r)
        out.append(s)
    return out


def _deltas(rng, rounds=4, scale=1.0):
    return [{k: scale * rng.normal(size=s) for k, s in SHAPES.items()} for _ in range(rounds)]


# ---------------------------------------------------------------- server optimizers


def test_server_momentum_with_lr_one_and_no_momentum_is_fedavg_exactly():
    rng = np.random.default_rng(0)
    g = _global(rng)
    fedavg = chain(weighted_mean(), apply_delta())
    fedavgm = chain(weighted_mean(), server_momentum(lr=1.0, momentum=0.0), apply_delta())
    sa, sb = fedavg.init(g), fedavgm.init(g)
    ga, gb = g, g
    for r in range(4):
        stack = _stack(rng)
        ga, sa, _ = fedavg.apply(stack, sa, ga, r)
        gb, sb, _ = fedavgm.apply(stack, sb, gb, r)
        for k in ga:
            np.testing.assert_array_equal(ga[k], gb[k])


def test_server_momentum_matches_heavy_ball_step_by_step():
    rng = np.random.default_rng(1)
    g, deltas = _global(rng), _deltas(rng, rounds=5)
    lr, beta = 0.7, 0.9
    steps = _run_steps(server_momentum(lr=lr, momentum=beta), deltas, g)
    for k, shape in SHAPES.items():
        v = np.zeros(shape)  # Hsu et al.: v <- beta v + Δ, w <- w + lr v (Δ = -pseudo-gradient)
        for d, s in zip(deltas, steps):
            v = beta * v + d[k]
            np.testing.assert_allclose(s[k], lr * v, rtol=0, atol=1e-14)
    # round 1 steps lr·Δ_1 (buffer starts at the first update, Flower's/PyTorch's rule)
    np.testing.assert_array_equal(steps[0]["bias"], lr * deltas[0]["bias"])


def _adam_reference(deltas, lr, b1, b2, tau, exponent_shift, v0=0.0):
    """Adam written out elementwise, one round at a time (Kingma & Ba's α_t at t + shift)."""
    out = []
    m = {k: np.zeros(s) for k, s in SHAPES.items()}
    v = {k: np.full(s, v0) for k, s in SHAPES.items()}
    for t, d in enumerate(deltas, start=1):
        step = {}
        for k in SHAPES:
            m[k] = b1 * m[k] + (1 - b1) * d[k]
            v[k] = b2 * v[k] + (1 - b2) * d[k] ** 2
            if exponent_shift is None:
                eta = lr
            else:
                e = t + exponent_shift
                eta = lr * np.sqrt(1 - b2**e) / (1 - b1**e)
            step[k] = eta * m[k] / (np.sqrt(v[k]) + tau)
        out.append(step)
    return out


@pytest.mark.parametrize("correction, shift", [("flower", 1), ("kingma", 0), ("none", None)])
def test_server_adam_matches_step_by_step_reference(correction, shift):
    rng = np.random.default_rng(2)
    g, deltas = _global(rng), _deltas(rng)
    lr, b1, b2, tau = 0.05, 0.8, 0.95, 1e-3
    got = _run_steps(server_adam(lr=lr, beta1=b1, beta2=b2, tau=tau, bias_correction=correction), deltas, g)
    want = _adam_reference(deltas, lr, b1, b2, tau, shift)
    for a, b in zip(got, want):
        for k in SHAPES:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-13, atol=0)


def test_server_adam_initial_v_follows_the_paper_when_asked():
    rng = np.random.default_rng(3)
    g, deltas = _global(rng), _deltas(rng, rounds=3)
    tau = 1e-2
    got = _run_steps(server_adam(tau=tau, initial_v=tau**2, bias_correction="none"), deltas, g)
    want = _adam_reference(deltas, 0.1, 0.9, 0.99, tau, None, v0=tau**2)
    for a, b in zip(got, want):
        for k in SHAPES:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-13, atol=0)


def test_server_yogi_matches_step_by_step_reference():
    rng = np.random.default_rng(4)
    g, deltas = _global(rng), _deltas(rng, rounds=5)
    lr, b1, b2, tau = 0.02, 0.9, 0.99, 1e-3
    got = _run_steps(server_yogi(lr=lr, beta1=b1, beta2=b2, tau=tau), deltas, g)
    for k, shape in SHAPES.items():
        m, v = np.zeros(shape), np.zeros(shape)
        for d, s in zip(deltas, got):
            for idx in np.ndindex(shape):  # Reddi et al., Algorithm 2, one coordinate at a time
                d2 = d[k][idx] ** 2
                m[idx] = b1 * m[idx] + (1 - b1) * d[k][idx]
                v[idx] = v[idx] - (1 - b2) * d2 * (1.0 if v[idx] > d2 else -1.0 if v[idx] < d2 else 0.0)
            np.testing.assert_allclose(s[k], lr * m / (np.sqrt(v) + tau), rtol=1e-13, atol=0)


@pytest.mark.parametrize("beta1", [0.0, 0.5])
def test_server_adagrad_matches_step_by_step_reference(beta1):
    rng = np.random.default_rng(5)
    g, deltas = _global(rng), _deltas(rng, rounds=5)
    lr, tau = 0.3, 1e-4
    got = _run_steps(server_adagrad(lr=lr, tau=tau, beta1=beta1), deltas, g)
    for k, shape in SHAPES.items():
        m, total = np.zeros(shape), np.zeros(shape)
        for d, s in zip(deltas, got):
            m = beta1 * m + (1 - beta1) * d[k]
            total = total + d[k] ** 2
            np.testing.assert_allclose(s[k], lr * m / (np.sqrt(total) + tau), rtol=1e-13, atol=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: server_adam(lr=0.1, tau=1e-12, bias_correction="kingma"),
        lambda: server_yogi(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-12),
        lambda: server_adagrad(lr=0.1, tau=1e-12),
    ],
    ids=["adam", "yogi", "adagrad"],
)
def test_adaptive_first_step_is_lr_times_sign_and_steps_are_scale_free(make):
    """Reddi et al.'s adaptive servers normalize by √v: from zero state the first step is
    lr · sign(Δ) (Adam with Kingma's correction; Yogi since (1 − β1)/√(1 − β2) = 1; Adagrad
    since √(Δ²) = |Δ|), and multiplying every update by c > 0 leaves every step unchanged
    (τ → 0). FedAvg has neither property: its step is Δ itself."""
    rng = np.random.default_rng(6)
    g, deltas = _global(rng), _deltas(rng)
    first = _run_steps(make(), deltas, g)[0]
    for k in SHAPES:
        np.testing.assert_allclose(first[k], 0.1 * np.sign(deltas[0][k]), rtol=1e-9, atol=0)
    scaled = [{k: 1e3 * v for k, v in d.items()} for d in deltas]
    a, b = _run_steps(make(), deltas, g), _run_steps(make(), scaled, g)
    for x, y in zip(a, b):
        for k in SHAPES:
            np.testing.assert_allclose(x[k], y[k], rtol=1e-9, atol=0)


@pytest.mark.parametrize(
    "step",
    [server_momentum(lr=0.5, momentum=0.9), server_adam(), server_yogi(), server_adagrad(beta1=0.3)],
    ids=lambda s: s.name,
)
def test_optimizer_state_is_explicit_and_inputs_are_not_mutated(step):
    rng = np.random.default_rng(7)
    g, (d1, d2) = _global(rng), _deltas(rng, rounds=2)
    s0 = step.init(g)
    _, s1, _ = step.apply(d1, s0, g, 0)
    snapshot = {k: v.copy() for k, v in d2.items()}
    flat = [np.copy(x) for part in vars(s1).values() if isinstance(part, dict) for x in part.values()]
    a, _, _ = step.apply(d2, s1, g, 1)
    b, _, _ = step.apply(d2, s1, g, 1)  # same state in, same step out: nothing hidden
    for k in SHAPES:
        np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_array_equal(d2[k], snapshot[k])
    again = [x for part in vars(s1).values() if isinstance(part, dict) for x in part.values()]
    for x, y in zip(flat, again):
        np.testing.assert_array_equal(x, y)
    # a different history gives a different step: the state matters
    c, _, _ = step.apply(d2, s0, g, 1)
    assert any(not np.allclose(a[k], c[k]) for k in SHAPES)


@pytest.mark.parametrize(
    "step, options, message",
    [
        ("server_momentum", {"lr": 0.0}, "'lr' must be a number > 0, got 0.0"),
        ("server_momentum", {"momentum": 1.0}, r"'momentum' must be a number in \[0, 1\), got 1.0"),
        ("server_momentum", {"momentum": -0.1}, "'momentum' must be"),
        ("server_adam", {"beta1": 1.0}, r"'beta1' must be a number in \[0, 1\)"),
        ("server_adam", {"beta2": -0.5}, "'beta2' must be"),
        ("server_adam", {"tau": 0.0}, "'tau' must be a number > 0"),
        ("server_adam", {"bias_correction": "adamw"}, "'bias_correction' must be one of flower, kingma, none"),
        ("server_adam", {"initial_v": -1.0}, "'initial_v' must be a number >= 0"),
        ("server_yogi", {"lr": float("nan")}, "'lr' must be a number > 0, got nan"),
        ("server_adagrad", {"tau": -1e-9}, "'tau' must be"),
        ("loss_weighted", {"temperature": 0.0}, "'temperature' must be a number > 0"),
        ("fair", {"q": -1.0}, "'q' must be a number >= 0"),
        ("fair", {"lr": 0.0}, "'lr' must be a number > 0"),
        ("fair", {"weighting": "sqrt"}, "'weighting' must be one of examples, uniform, got 'sqrt'"),
        ("fair", {"loss_offset": -1.0}, "'loss_offset' must be a number >= 0"),
        ("fourier", {"start": 0.0}, r"'start' must be a number in \(0, 1\]"),
        ("fourier", {"end": 1.5}, "'end' must be"),
    ],
)
def test_bad_hyperparameters_raise_config_error_naming_them(step, options, message):
    # the steps' option schemas check them, before any factory runs
    entries = [{"step": step, **options}] if step in REDUCING_STEPS else ["weighted_mean", {"step": step, **options}]
    with pytest.raises(ConfigError, match=rf"pipelines.p: step '{step}' option {message}"):
        build_pipeline(entries, "pipelines.p")


def test_defaults_are_flowers():
    import inspect

    def defaults(f):
        return {k: p.default for k, p in inspect.signature(f).parameters.items()}

    assert defaults(server_momentum) == {"lr": 1.0, "momentum": 0.0}
    assert defaults(server_adam) == {
        "lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-9, "bias_correction": "flower", "initial_v": 0.0,
    }
    assert defaults(server_yogi) == {"lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3, "initial_v": 0.0}
    assert defaults(server_adagrad) == {"lr": 0.1, "tau": 1e-9, "beta1": 0.0, "initial_v": 0.0}


# ---------------------------------------------------------------- end to end


_sites = shifted_sites


def test_run_federated_fedavgm_with_lr_one_no_momentum_equals_fedavg():
    model = LogisticRegression()
    sites, training = _sites(), LocalTraining(model, 0.3, 5, 16, 0.01)
    fedavg = FederatedAlgorithm("fedavg", local_sgd_update, chain(weighted_mean(), apply_delta()))
    fedavgm = FederatedAlgorithm(
        "fedavgm", local_sgd_update, chain(weighted_mean(), server_momentum(lr=1.0, momentum=0.0), apply_delta())
    )
    a = run_federated(fedavg, model.init(4), sites, training, 6, KeyedRng(3))
    b = run_federated(fedavgm, model.init(4), sites, training, 6, KeyedRng(3))
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])
    # and momentum does change the trajectory (the comparison above is not vacuous)
    heavy = FederatedAlgorithm(
        "fedavgm", local_sgd_update, chain(weighted_mean(), server_momentum(lr=1.0, momentum=0.9), apply_delta())
    )
    c = run_federated(heavy, model.init(4), sites, training, 6, KeyedRng(3))
    assert not np.allclose(a.params["weight"], c.params["weight"])


def test_run_federated_with_each_new_aggregator_runs_and_stays_finite():
    model = LogisticRegression()
    sites, training = _sites(), LocalTraining(model, 0.3, 5, None, 0.01)
    for agg in [
        chain(weighted_mean(), server_adam(), apply_delta()),
        chain(weighted_mean(), server_yogi(), apply_delta()),
        chain(weighted_mean(), server_adagrad(), apply_delta()),
        chain(loss_weighted(), apply_delta()),
        chain(fair(q=1.0), apply_delta()),
        chain(fourier(), apply_delta()),
        chain(guided(), apply_delta()),
    ]:
        run = run_federated(FederatedAlgorithm("m", local_sgd_update, agg), model.init(4), sites, training, 3, KeyedRng(0))
        assert all(np.isfinite(v).all() for v in run.params.values()), agg.name


# ---------------------------------------------------------------- loss_weighted


def test_loss_weighted_with_equal_losses_is_weighted_mean_exactly():
    rng = np.random.default_rng(8)
    stack = _stack(rng, losses=[0.7] * 4)
    got, _, report = loss_weighted(temperature=0.3).apply(stack, None, None, 0)
    want = _mean(stack)
    for k in SHAPES:
        np.testing.assert_array_equal(got[k], want[k])
    np.testing.assert_array_equal(list(report.values()), stack.weights / stack.weights.sum())


def test_loss_weighted_gives_worse_sites_smaller_weight():
    rng = np.random.default_rng(9)
    counts, losses, T = (30, 30, 30, 60), np.array([0.2, 0.5, 1.5, 0.5]), 0.5
    stack = _stack(rng, counts=counts, losses=losses)
    got, _, report = loss_weighted(temperature=T).apply(stack, None, None, 0)
    w = np.array([report[s] for s in stack.sites])
    expected = np.array(counts) * np.exp(-losses / T)
    np.testing.assert_allclose(w, expected / expected.sum(), rtol=1e-14)
    assert w[0] > w[1] > w[2]  # same n, rising loss
    np.testing.assert_allclose(w[3], 2 * w[1], rtol=1e-14)  # same loss, twice the data
    for k in SHAPES:
        np.testing.assert_allclose(got[k], np.tensordot(w, stack.payload[k], axes=1), rtol=1e-12, atol=1e-15)


def test_loss_weighted_huge_losses_do_not_overflow_and_missing_loss_is_named():
    rng = np.random.default_rng(10)
    stack = _stack(rng, losses=[1e4, 1e4 + 1, 2e4, 5e3])
    _, _, report = loss_weighted(temperature=1.0).apply(stack, None, None, 0)
    assert report["s3"] == 1.0 and report["s2"] == 0.0
    with pytest.raises(DataError, match="loss"):
        loss_weighted().apply(_stack(rng), None, None, 0)
    with pytest.raises(DataError, match="s1"):
        loss_weighted().apply(_stack(rng, losses=[0.1, np.nan, 0.2, 0.3]), None, None, 0)


# ---------------------------------------------------------------- fair (q-FFL)


def _qffl_reference(stack, q, lr, p, global_params):
    """Li et al. (2020) q-FedAvg written in the paper's symbols: new w, then w_new − w."""
    L = 1.0 / lr
    F = stack.metrics["loss"]
    K = len(stack.sites)
    num = {k: np.zeros_like(global_params[k]) for k in global_params}
    den = 0.0
    for i in range(K):
        local = {k: global_params[k] + stack.payload[k][i] for k in global_params}
        dw = {k: L * (global_params[k] - local[k]) for k in global_params}
        norm2 = sum(float(np.sum(v**2)) for v in dw.values())
        for k in num:
            num[k] += p[i] * F[i] ** q * dw[k]
        den += p[i] * (q * F[i] ** (q - 1) * norm2 + L * F[i] ** q)
    return {k: (global_params[k] - num[k] / den) - global_params[k] for k in global_params}


@pytest.mark.parametrize("q", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("weighting", ["examples", "uniform"])
def test_fair_matches_qffl_formula(q, weighting):
    rng = np.random.default_rng(11)
    losses = rng.uniform(0.2, 2.0, size=4)
    stack, g = _stack(rng, losses=losses, scale=0.1), _global(rng)
    got, _, report = fair(q=q, lr=0.1, weighting=weighting).apply(stack, None, g, 0)
    n = stack.weights
    p = n / n.sum() if weighting == "examples" else np.full(4, 0.25)
    want = _qffl_reference(stack, q, 0.1, p, g)
    for k in SHAPES:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-12)
    # the reported coefficients rebuild the step
    c = np.array([report[s] for s in stack.sites])
    for k in SHAPES:
        np.testing.assert_allclose(got[k], np.tensordot(c, stack.payload[k], axes=1), rtol=0, atol=1e-14)


def test_fair_with_q_zero_is_weighted_mean_and_q_favours_worse_sites():
    rng = np.random.default_rng(12)
    losses = np.array([0.3, 0.6, 1.2, 2.4])
    stack = _stack(rng, counts=(20, 20, 20, 20), losses=losses, scale=0.05)
    got, _, _ = fair(q=0.0).apply(stack, None, None, 0)
    want = _mean(stack)
    for k in SHAPES:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-16)
    _, _, report = fair(q=2.0).apply(stack, None, None, 0)
    c = [report[s] for s in stack.sites]
    assert c[0] < c[1] < c[2] < c[3]  # equal data, rising loss ⇒ rising weight


def test_fair_refuses_wrong_kind_and_zero_loss_with_small_q():
    rng = np.random.default_rng(13)
    with pytest.raises(ConfigError, match="delta"):
        fair().apply(_stack(rng, losses=[1, 1, 1, 1], kind="params"), None, None, 0)
    with pytest.raises(DataError, match="loss_offset"):
        fair(q=0.5).apply(_stack(rng, losses=[0, 1, 1, 1]), None, None, 0)
    got, _, _ = fair(q=0.5, loss_offset=1e-10).apply(_stack(rng, losses=[0, 1, 1, 1]), None, None, 0)
    assert all(np.isfinite(v).all() for v in got.values())
    zero, _, _ = fair(q=2.0).apply(_stack(rng, losses=[0, 0, 0, 0]), None, None, 0)
    assert all(not v.any() for v in zero.values())


# ---------------------------------------------------------------- fourier (PFA's server step)

KERNEL = {"conv": (2, 3, 4, 4), "bias": (2,)}


def _kernel_stack(rng, counts=(40, 25, 10)):
    uploads = [Upload(f"s{i}", {k: rng.normal(size=s) for k, s in KERNEL.items()}, n, "delta", {})
               for i, n in enumerate(counts)]
    return stack_uploads(uploads)


def test_fourier_full_share_is_weighted_mean_exactly():
    stack = _kernel_stack(np.random.default_rng(14))
    step = fourier(start=1.0, end=1.0)
    got, _, _ = step.apply(stack, step.init({}), None, 0)
    want = _mean(stack)
    for k in KERNEL:
        np.testing.assert_array_equal(got[k], want[k])


def test_fourier_averages_each_kernels_low_spatial_frequencies_and_drops_the_rest():
    stack = _kernel_stack(np.random.default_rng(15))
    step = fourier(start=0.5, end=0.5)
    got, state, report = step.apply(stack, step.init({}), None, 0)
    w = stack.weights / stack.weights.sum()
    # per-site transforms over the spatial axes, then the example-weighted mean
    site_coefs = np.stack([dctn(stack.payload["conv"][i], axes=(2, 3), norm="ortho") for i in range(len(w))])
    want = np.tensordot(w, site_coefs, axes=1)
    out = dctn(got["conv"], axes=(2, 3), norm="ortho")
    # share 0.5 of each axis: floor(0.25 * 16) = 4 coefficients, the 2x2 block of every (out, in) kernel
    np.testing.assert_allclose(out[..., :2, :2], want[..., :2, :2], rtol=0, atol=1e-12)
    rest = out.copy()
    rest[..., :2, :2] = 0.0
    np.testing.assert_allclose(rest, 0.0, rtol=0, atol=1e-12)
    assert np.abs(want).sum() > np.abs(want[..., :2, :2]).sum() + 1e-3  # what was dropped was not zero
    np.testing.assert_array_equal(got["bias"], _mean(stack)["bias"])  # no kernel: averaged whole
    assert report == {"share": 0.5, "kernel_share": 0.25}
    assert (state.aggregations, state.shared) == (1, 0.5)


def test_fourier_refuses_params_uploads():
    step = fourier()
    with pytest.raises(ConfigError, match="params"):
        step.apply(_stack(np.random.default_rng(0), kind="params"), step.init({}), None, 0)


# ---------------------------------------------------------------- guided


def test_guided_positive_rule_keeps_positive_components_and_zeroes_negative_ones():
    rng = np.random.default_rng(16)
    stack = _stack(rng)
    mean = _mean(stack)
    g = _global(rng)
    out, _, report = guided(rule="positive").apply(stack, None, g, 0)
    for k in SHAPES:
        np.testing.assert_array_equal(out[k][mean[k] > 0], mean[k][mean[k] > 0])
        np.testing.assert_array_equal(out[k][mean[k] <= 0], 0.0)
    total = sum(v.size for v in mean.values())
    assert report["kept_fraction"] == sum(int((v > 0).sum()) for v in mean.values()) / total
    # in a chain on deltas, no parameter ever moves down: the literal reading's flaw
    agg = chain(guided(rule="positive"), apply_delta())
    new, _, _ = agg.apply(_stack(rng), agg.init(g), g, 0)
    for k in SHAPES:
        assert np.all(new[k] >= g[k])


def test_guided_agreement_applies_only_components_no_site_opposes():
    rng = np.random.default_rng(17)
    stack = _stack(rng)
    mean = _mean(stack)
    out, _, report = guided().apply(stack, None, None, 0)
    kept = 0
    for k in SHAPES:
        opposed = (stack.payload[k] * mean[k] < 0).any(axis=0)
        np.testing.assert_array_equal(out[k], np.where(opposed, 0.0, mean[k]))
        kept += int((~opposed).sum())
    total = sum(v.size for v in mean.values())
    assert 0 < kept < total  # the case is not trivial: some components kept, some dropped
    assert report["kept_fraction"] == kept / total
    # a weighted share: with agreement 0.6, a component opposed by a site holding 10/82 of the
    # examples survives, one opposed by the 40-example site does not
    w = stack.weights / stack.weights.sum()
    share = {k: np.tensordot(w, stack.payload[k] * mean[k] < 0, axes=1) for k in SHAPES}
    loose, _, _ = guided(agreement=0.6).apply(stack, None, None, 0)
    for k in SHAPES:
        np.testing.assert_array_equal(loose[k], np.where(share[k] <= 0.4, mean[k], 0.0))


def test_guided_agreement_zero_is_weighted_mean_exactly_and_bad_options_are_named():
    stack = _stack(np.random.default_rng(18))
    got, _, _ = guided(agreement=0.0).apply(stack, None, None, 0)
    want = _mean(stack)
    for k in SHAPES:
        np.testing.assert_array_equal(got[k], want[k])
    with pytest.raises(ConfigError, match="method 'guided' option 'rule' must be one of agreement, positive"):
        METHODS["guided"].validate({"rule": "relu"})
    with pytest.raises(ConfigError, match=r"method 'guided' option 'agreement' must be a number in \[0, 1\]"):
        METHODS["guided"].validate({"agreement": 1.5})
    with pytest.raises(ConfigError, match="params"):
        guided().apply(_stack(np.random.default_rng(0), kind="params"), None, None, 0)


# ---------------------------------------------------------------- hypothesis


def _draw_stack(data, k, d, kind="delta"):
    values = data.draw(arrays(np.float64, (k, 2, d), elements=st.floats(-1e3, 1e3)))
    counts = data.draw(st.lists(st.integers(1, 10_000), min_size=k, max_size=k))
    losses = data.draw(st.lists(st.floats(0.0, 50.0), min_size=k, max_size=k))
    uploads = [Upload(f"s{i}", {"w": values[i]}, counts[i], kind, {"loss": losses[i]}) for i in range(k)]
    return uploads, values


REDUCERS = {
    "loss_weighted": lambda: loss_weighted(temperature=0.7),
    "fair": lambda: fair(q=1.5, lr=0.1, loss_offset=1e-3),
    "fair_uniform": lambda: fair(q=0.5, weighting="uniform", loss_offset=1e-3),
    "fourier": lambda: fourier(start=0.5, end=0.5),
    "guided": lambda: guided(agreement=0.7),
}


@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 6), d=st.integers(1, 5), name=st.sampled_from(sorted(REDUCERS)), data=st.data())
def test_reducing_steps_are_permutation_invariant_hypothesis(k, d, name, data):
    uploads, values = _draw_stack(data, k, d)
    agg = REDUCERS[name]()
    a, _, ra = agg.apply(stack_uploads(uploads), agg.init({}), None, 0)
    perm = data.draw(st.permutations(range(k)))
    b, _, rb = agg.apply(stack_uploads([uploads[i] for i in perm]), agg.init({}), None, 0)
    scale = 1e-9 * (1 + np.abs(values).max())
    np.testing.assert_allclose(a["w"], b["w"], rtol=0, atol=scale)
    if ra is not None:
        assert ra.keys() == rb.keys()
        np.testing.assert_allclose([ra[s] for s in ra], [rb[s] for s in ra], rtol=1e-12, atol=1e-300)


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 6), d=st.integers(1, 5), t=st.floats(0.01, 100.0), data=st.data())
def test_loss_weighted_weights_form_a_distribution_hypothesis(k, d, t, data):
    uploads, values = _draw_stack(data, k, d)
    stack = stack_uploads(uploads)
    out, _, report = loss_weighted(temperature=t).apply(stack, None, None, 0)
    w = np.array([report[s] for s in stack.sites])
    assert np.all(w >= 0) and abs(w.sum() - 1.0) < 1e-12
    scale = 1e-9 * (1 + np.abs(values).max())  # a convex combination of the uploads
    assert np.all(out["w"] >= values.min(axis=0) - scale) and np.all(out["w"] <= values.max(axis=0) + scale)


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 6), d=st.integers(1, 5), data=st.data())
def test_keep_all_and_q_zero_are_weighted_mean_hypothesis(k, d, data):
    uploads, values = _draw_stack(data, k, d)
    stack = stack_uploads(uploads)
    want = _mean(stack)["w"]
    scale = 1e-12 * (1 + np.abs(values).max())
    full = fourier(start=1.0, end=1.0)
    np.testing.assert_allclose(full.apply(stack, full.init({}), None, 0)[0]["w"], want, rtol=0, atol=scale)
    np.testing.assert_allclose(fair(q=0.0).apply(stack, None, None, 0)[0]["w"], want, rtol=0, atol=scale)


@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, 5), d=st.integers(1, 4), data=st.data())
def test_guided_positive_never_applies_a_negative_component_hypothesis(k, d, data):
    uploads, _ = _draw_stack(data, k, d)
    stack = stack_uploads(uploads)
    out, _, _ = guided(rule="positive").apply(stack, None, None, 0)
    mean = _mean(stack)["w"]
    assert np.all(out["w"] >= 0)
    np.testing.assert_array_equal(out["w"], np.where(mean > 0, mean, 0.0))


@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, 5), d=st.integers(1, 4), data=st.data())
def test_guided_agreement_applies_the_mean_or_nothing_and_one_site_is_fedavg_hypothesis(k, d, data):
    uploads, _ = _draw_stack(data, k, d)
    stack = stack_uploads(uploads)
    out, _, _ = guided().apply(stack, None, None, 0)
    mean = _mean(stack)["w"]
    assert np.all((out["w"] == mean) | (out["w"] == 0.0))
    one, _, _ = guided().apply(stack_uploads(uploads[:1]), None, None, 0)
    np.testing.assert_array_equal(one["w"], _mean(stack_uploads(uploads[:1]))["w"])
