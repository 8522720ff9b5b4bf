"""The local optimizer in medfed.client over the models' sessions (issue 10 §1), and DP-SGD for
the torch models through it (§2): per-example gradients, clipping, noise, determinism, the
BatchNorm refusal."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from typer.testing import CliRunner

from medfed.cli.app import app
from medfed.client.dp_sgd import DpSgd, dp_sgd_descend, noised_clipped_mean
from medfed.client.optimizer import descend
from medfed.errors import ConfigError
from medfed.experiments.config import build_config
from medfed.experiments.harness import run_experiment
from medfed.experiments.results import results_document
from medfed.models import LogisticRegression
from medfed.models.registry import make_model
from medfed.rng import KeyedRng

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# tiny samples; every model without BatchNorm (DP-SGD refuses it)
CASES = {
    "torch_logistic": ((6,), {}),
    "mlp": ((1, 4, 4), {"norm": "group", "hidden": (8, 8)}),
    "cnn2d": ((1, 6, 6), {"norm": "group", "channels": (4, 4)}),
    "cnn3d": ((1, 4, 4, 4), {"norm": "none", "channels": (2, 4)}),
}


def _data(shape, n=12, seed=0):
    gen = np.random.default_rng(seed)
    X = gen.normal(size=(n, *shape))
    return X, (X.reshape(n, -1)[:, 0] + 0.3 * gen.normal(size=n) > 0).astype(float)


def _model(arch, **extra):
    shape, options = CASES[arch]
    return make_model(arch, shape, **{"dtype": "float64", "optimizer": "sgd", **options, **extra}), shape


def _jiggled(model, shape, seed=1):
    """Initial parameters moved off the zero head, so every layer has a nonzero gradient."""
    gen = np.random.default_rng(seed)
    return {k: v + 0.3 * gen.normal(size=v.shape) for k, v in model.init_params(shape, KeyedRng(0)).items()}


@pytest.mark.parametrize("arch", CASES)
def test_per_example_gradients_are_the_gradients_of_single_row_batches(arch):
    model, shape = _model(arch)
    X, y = _data(shape)
    params = _jiggled(model, shape)
    per = model.per_example_gradients(params, X, y)
    assert set(per) == set(model.param_shapes(shape))  # no BatchNorm: every parameter is trained
    for i in range(X.shape[0]):
        one, _ = model.gradient(params, X[i : i + 1], y[i : i + 1])
        for k, g in one.items():
            assert np.abs(g).max() > 0
            np.testing.assert_allclose(per[k][i], g, rtol=0, atol=1e-10)


def _numpy(value):
    return value.cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value, dtype=np.float64)


@pytest.mark.parametrize("arch", ["logistic", "cnn2d"])
def test_each_rows_clipped_gradient_is_within_the_clip_and_in_its_own_direction(arch):
    if arch == "logistic":
        model, shape = LogisticRegression(), (6,)
        X, y = _data(shape)
        X = 20 * X
        params = {"weight": np.linspace(-1, 1, 6), "bias": np.array([0.2])}
    else:
        model, shape = _model(arch)
        X, y = _data(shape)
        params = _jiggled(model, shape)
    per = model.per_example_gradients(params, X, y)
    norms = np.sqrt(sum((g.reshape(len(X), -1) ** 2).sum(axis=1) for g in per.values()))
    clip = float(np.median(norms))
    zero = {k: np.zeros((1, *np.shape(v))) for k, v in params.items()}
    with model.session(params, X, y) as session:
        for i in range(len(X)):  # one row, no noise, denominator 1: the row's clipped gradient
            clipped = noised_clipped_mean(session, np.array([i]), clip, {k: v[0] for k, v in zero.items()}, 1.0)
            clipped = {k: _numpy(v).reshape(np.shape(params[k])) for k, v in clipped.items()}
            norm = math.sqrt(sum(float(np.vdot(v, v)) for v in clipped.values()))
            assert norm <= clip * (1 + 1e-12)
            expected = min(1.0, clip / norms[i])
            for k in clipped:
                np.testing.assert_allclose(clipped[k], expected * per[k][i].reshape(np.shape(params[k])),
                                           rtol=1e-9, atol=1e-12)
    assert (norms > clip).any() and (norms < clip).any()  # both cases were seen


def test_torch_dp_sgd_noise_has_std_z_clip_over_the_expected_batch():
    """Rows that carry no signal (zero images): the weight moves by the noise alone, std lr z C / (q n)."""
    model, _ = _model("torch_logistic")
    X, y = np.zeros((200, 6)), (np.arange(200) % 2).astype(float)
    params = model.init_params((6,), KeyedRng(0))
    draws = [dp_sgd_descend(model, params, X, y, 1, 50, 1.0, 0.0, KeyedRng(3, (i,)), DpSgd(2.0, 1.5))[0]["head.weight"]
             for i in range(600)]
    assert np.std(draws) == pytest.approx(1.5 * 2.0 / 50, rel=0.05)


@pytest.mark.parametrize("arch,optimizer", [("torch_logistic", "sgd"), ("cnn2d", "sgd"), ("mlp", "adam")])
def test_dp_sgd_without_noise_or_clipping_on_every_row_is_the_plain_full_batch_step(arch, optimizer):
    model, shape = _model(arch, optimizer=optimizer)
    X, y = _data(shape, n=10)
    params = _jiggled(model, shape)
    center = _jiggled(model, shape, seed=2)
    plain, _ = descend(model, params, X, y, [None] * 4, 0.1, 0.01, prox_center=center, mu=0.5)
    private, loss = dp_sgd_descend(model, params, X, y, 4, 10**6, 0.1, 0.01, KeyedRng(1), DpSgd(math.inf, 0.0),
                                   prox_center=center, mu=0.5)
    assert math.isnan(loss)
    moved = sum(float(np.abs(plain[k] - params[k]).max()) for k in params)
    assert moved > 1e-3
    for k in plain:
        np.testing.assert_allclose(private[k], plain[k], rtol=0, atol=1e-12)


def test_an_empty_poisson_batch_moves_the_weights_by_the_noise_alone():
    model, shape = _model("cnn2d")
    X, y = _data(shape, n=20)
    params = _jiggled(model, shape)
    with model.session(params, X, y) as session:
        rows = session.example_gradients(np.array([], dtype=np.int64))
        assert rows.norms.shape == (0,)
        totals = rows.weighted_sum(np.zeros(0))
        assert all(float(t.abs().max()) == 0.0 and t.shape == session.values[k].shape for k, t in totals.items())
    # rate 1/20 over 10 steps: some steps draw no row at all, and none fails
    assert (KeyedRng(1).generator.random((10, 20)) < 0.05).sum(axis=1).min() == 0
    out, _ = dp_sgd_descend(model, params, X, y, 10, 1, 0.1, 0.0, KeyedRng(1), DpSgd(1.0, 1.0))
    assert all(np.isfinite(v).all() for v in out.values())


def test_a_torch_dp_sgd_run_is_deterministic_for_a_seed():
    def run(seed):
        model, shape = _model("cnn2d")  # a fresh model each time: nothing carried over
        X, y = _data(shape, n=20)
        return dp_sgd_descend(model, _jiggled(model, shape), X, y, 3, 8, 0.1, 0.01, KeyedRng(seed), DpSgd(1.0, 1.0))[0]

    first, again, other = run(4), run(4), run(5)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert any(not np.array_equal(first[k], other[k]) for k in first)


def _study(model="torch_logistic", **model_options):
    return build_config({
        "data": {"dataset": "adni-like"}, "model": model, "model_options": model_options, "methods": ["fedavg"],
        "repeats": 1, "training": {"rounds": 2, "local_steps": 2, "batch_size": 16, "lr": 0.1},
        "privacy": {"dp": "sample", "clip": 1.0, "noise": 1.0},
    })


def test_a_federated_torch_study_runs_dp_sgd_the_same_twice_with_its_ledger():
    from medfed.data.datasets import load_dataset

    fed = load_dataset("adni-like")
    docs = [results_document(run_experiment(_study(), fed)) for _ in range(2)]
    assert docs[0]["results"] == docs[1]["results"]
    ledger = docs[0]["privacy"]["ledger"]
    assert {e["site"] for e in ledger} == set(fed.site_names) and all(e["mode"] == "sample" for e in ledger)


def test_batch_norm_is_refused_naming_group_norm_before_any_training(monkeypatch, tmp_path):
    from medfed.data.datasets import load_dataset
    from medfed.experiments import harness

    model = make_model("mlp", (8,))  # norm = batch by default
    with pytest.raises(ConfigError, match=r"BatchNorm.*GroupNorm: --model-option norm=group"):
        model.per_example_gradients(model.init_params((8,), KeyedRng(0)), np.zeros((2, 8)), np.zeros(2))

    def trained(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(harness, "run_repeat", trained)
    with pytest.raises(ConfigError, match=r"BatchNorm.*GroupNorm, --model-option norm=group"):
        run_experiment(_study("mlp"), load_dataset("adni-like"))
    result = CliRunner().invoke(app, ["run", "--dataset", "adni-like", "--model", "mlp", "--methods", "fedavg",
                                      "--dp", "sample", "--clip", "1", "--noise", "1", "--batch-size", "16",
                                      "--rounds", "1", "--repeats", "1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "BatchNorm" in lines[0] and "--model-option norm=group" in lines[0]


def test_torch_logistic_follows_the_numpy_model_through_every_term():
    """One training path: proximal pull, correction, row weights and L2 on mini-batches give the
    numpy model's numbers on torch_logistic in float64 with SGD (its head starts at zero too)."""
    gen = np.random.default_rng(0)
    X = gen.normal(size=(40, 5))
    y = (X[:, 0] + gen.normal(size=40) > 0).astype(float)
    numpy_model, torch_model = LogisticRegression(), make_model("torch_logistic", (5,), dtype="float64")
    center = {"weight": gen.normal(size=5), "bias": np.array([0.3])}
    shift = {"weight": 0.1 * gen.normal(size=5), "bias": np.array([-0.05])}
    batches = [gen.permutation(40)[:16] for _ in range(6)]
    weights = lambda yb: np.where(yb > 0.5, 1.5, 0.7)  # noqa: E731
    terms = dict(prox_center=center, mu=0.4, correction=shift, row_weights=weights)
    ours, loss = descend(numpy_model, numpy_model.init(5), X, y, batches, 0.2, 0.05, **terms)
    names = {"weight": "head.weight", "bias": "head.bias"}
    as_torch = lambda p: {names[k]: v.reshape(1, -1) if k == "weight" else v for k, v in p.items()}  # noqa: E731
    theirs, torch_loss = descend(torch_model, as_torch(numpy_model.init(5)), X, y, batches, 0.2, 0.05,
                                 **{**terms, "prox_center": as_torch(center), "correction": as_torch(shift)})
    assert loss == pytest.approx(torch_loss, abs=1e-12)
    np.testing.assert_allclose(theirs["head.weight"].ravel(), ours["weight"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(theirs["head.bias"], ours["bias"], rtol=0, atol=1e-12)
    assert np.abs(ours["weight"]).max() > 0.05


def test_the_models_hold_no_optimizer_and_a_torch_session_keeps_its_tensors_between_steps():
    from medfed.models.torch_models import TorchModel

    assert not hasattr(LogisticRegression, "descend") and not hasattr(TorchModel, "descend")
    model, shape = _model("cnn2d")
    X, y = _data(shape)
    loads = []
    original = model._load
    model._load = lambda *a: (loads.append(1), original(*a))[1]
    with model.session(_jiggled(model, shape), X, y) as session:
        before = {k: id(v) for k, v in session.values.items()}
        for _ in range(3):
            grads, _ = session.gradient(None)
            for k, g in grads.items():
                session.axpy(-0.1, session.values[k], g)
        assert {k: id(v) for k, v in session.values.items()} == before
    assert len(loads) == 1  # the parameter view crossed into torch once for the whole training


def test_a_session_refused_on_entry_leaves_torchs_threads_and_autograd_as_they_were():
    model, shape = _model("cnn2d")
    X, y = _data(shape)
    params = _jiggled(model, shape)
    del params["head.bias"]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(ConfigError, match=r"missing \['head.bias'\]"):
            with model.session(params, X, y):
                pass
        assert torch.get_num_threads() == 2 and torch.is_grad_enabled()
    finally:
        torch.set_num_threads(before)
