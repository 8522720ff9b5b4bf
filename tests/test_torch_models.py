"""Torch models behind the parameter view: protocol conformance, the optimizer's terms,
agreement with the numpy model, and every federated method running on a CNN unchanged."""

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from medfed.client import LocalData, LocalTraining
from medfed.client.local import batch_indices
from medfed.client.optimizer import descend
from medfed.engine import run_federated
from medfed.errors import ConfigError
from medfed.experiments.config import TrainingSpec
from medfed.methods.registry import METHODS
from medfed.methods.method import context_for
from medfed.models import LogisticRegression
from medfed.models.registry import (
    MODEL_OPTIONS,
    MODELS,
    is_head,
    is_norm,
    is_norm_statistic,
    make_model,
)
from medfed.models.torch_models import TorchModel
from medfed.rng import KeyedRng

SHAPES = {"torch_logistic": (1, 16, 16), "mlp": (1, 16, 16), "cnn2d": (1, 16, 16), "cnn3d": (1, 8, 8, 8)}
NORMS = ("batch", "group", "none")
CASES = [(arch, norm) for arch in SHAPES for norm in NORMS]


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def toy(shape, n=48, seed=0, shift=1.0):
    """Separable images: the positive class is brighter in the first half of the first spatial axis."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.float64)
    X = rng.normal(size=(n, *shape)).astype(np.float32)
    X[y == 1, :, : shape[1] // 2] += shift
    return X, y


def _model(arch, norm="batch", **options):
    return make_model(arch, SHAPES[arch], norm=norm, **options)


@pytest.mark.parametrize(("arch", "norm"), CASES)
def test_parameter_view_round_trips_and_follows_the_naming_convention(arch, norm):
    shape = SHAPES[arch]
    model = _model(arch, norm)
    X, y = toy(shape, n=20)
    params = model.init_params(shape, KeyedRng(0))
    assert list(params) == list(model.param_shapes(shape))
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float64 for v in params.values())
    assert [k for k in params if is_head(k)] == ["head.weight", "head.bias"]
    norms = [k for k in params if is_norm(k)]
    stats = [k for k in params if is_norm_statistic(k)]
    if norm == "none":
        assert norms == []
    else:
        assert norms and all(".norm." in f".{k}" for k in norms)
        assert bool(stats) == (norm == "batch")  # GroupNorm has no running statistics
    assert not any(k.endswith("num_batches_tracked") for k in params)

    trained, _ = descend(model, params, X, y, batch_indices(20, 8, 3, KeyedRng(1)), 0.1)
    for p in (params, trained):
        proba = model.predict_proba(p, X)
        assert proba.shape == (20,) and proba.dtype == np.float64 and np.all((proba > 0) & (proba < 1))
        # into the network and back out (zero steps) changes no bit, nor any prediction
        back, start = descend(model, p, X, y, [], 0.1)
        for k in p:
            np.testing.assert_array_equal(back[k], p[k])
        np.testing.assert_array_equal(model.predict_proba(back, X), proba)
        assert start == model.loss(p, X, y)
    # eval mode: a sample's prediction does not depend on the rest of the batch
    np.testing.assert_allclose(model.predict_proba(trained, X[3:4]), model.predict_proba(trained, X)[3:4], rtol=1e-5)
    if norm == "batch":  # running statistics moved in train mode
        assert any(not np.array_equal(trained[k], params[k]) for k in stats)


@pytest.mark.parametrize(("arch", "norm"), CASES)
def test_descend_lowers_the_training_loss_on_a_separable_problem(arch, norm):
    shape = SHAPES[arch]
    model = _model(arch, norm)
    X, y = toy(shape)
    params = model.init_params(shape, KeyedRng(2))
    trained, start = descend(model, params, X, y, batch_indices(48, 16, 20, KeyedRng(3)), 0.3, 1e-3)
    assert start == model.loss(params, X, y, 1e-3)
    assert model.loss(params, X, y) == pytest.approx(np.log(2.0))  # the zero head starts at probability 1/2
    assert model.loss(trained, X, y, 1e-3) < 0.95 * start


@pytest.mark.parametrize("arch", list(SHAPES))
def test_same_seed_gives_the_same_numbers(arch):
    shape = SHAPES[arch]
    X, y = toy(shape, n=24)
    runs = []
    for _ in range(2):
        model = _model(arch)  # a fresh instance each time: nothing carried between them
        torch.manual_seed(len(runs))  # the global torch seed plays no part
        params = model.init_params(shape, KeyedRng(5, (1, 2)))
        runs.append((params, descend(model, params, X, y, batch_indices(24, 8, 4, KeyedRng(6)), 0.05, 0.01)[0]))
    for a, b in zip(runs[0], runs[1]):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    other = _model(arch).init_params(shape, KeyedRng(6, (1, 2)))
    if arch != "torch_logistic":  # its start is all zeros, whatever the seed
        assert any(not np.array_equal(other[k], runs[0][0][k]) for k in other)


def test_init_leaves_the_global_torch_random_state_alone():
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    model = make_model("cnn2d", (1, 8, 8))
    model.init_params((1, 8, 8), KeyedRng(0))
    np.testing.assert_array_equal(torch.rand(3).numpy(), expected.numpy())


@pytest.mark.parametrize(("arch", "norm"), [("torch_logistic", "none"), ("torch_logistic", "batch"), ("mlp", "group")])
def test_gradient_matches_finite_differences(arch, norm):
    shape = (1, 3, 3)
    model = make_model(arch, shape, norm=norm, dtype="float64", hidden=(5,)) if arch == "mlp" else make_model(
        arch, shape, norm=norm, dtype="float64")
    X, y = toy(shape, n=30, seed=4)
    params = model.init_params(shape, KeyedRng(1))
    params = {k: v + 0.3 * np.random.default_rng(2).normal(size=v.shape) * (not is_norm_statistic(k)) for k, v in params.items()}
    params = {k: np.abs(v) + 0.5 if k.endswith("running_var") else v for k, v in params.items()}
    l2, eps = 0.05, 1e-6
    grads, loss = model.gradient(params, X, y, l2, with_loss=True)
    assert loss == pytest.approx(model.loss(params, X, y, l2), rel=1e-12)
    for k, g in grads.items():
        if is_norm_statistic(k):  # statistics are not trained by gradients: zero by convention
            assert not g.any()
            continue
        numeric = np.zeros_like(g)
        for idx in np.ndindex(g.shape):
            up = {**params, k: params[k].copy()}
            down = {**params, k: params[k].copy()}
            up[k][idx] += eps
            down[k][idx] -= eps
            numeric[idx] = (model.loss(up, X, y, l2) - model.loss(down, X, y, l2)) / (2 * eps)
        np.testing.assert_allclose(g, numeric, rtol=1e-6, atol=1e-8, err_msg=k)


@pytest.mark.parametrize(("dtype", "atol"), [("float64", 1e-12), ("float32", 1e-6)])
def test_torch_logistic_agrees_with_the_numpy_model(dtype, atol):
    """Same zero start, full-batch gradient descent with L2 on the weights only. In float32
    each step rounds to about 1e-7 relative, so after 100 steps the two agree to ~1e-6, not exactly."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 6))
    y = (X[:, 0] - X[:, 1] + rng.normal(size=80) > 0).astype(np.float64)
    if dtype == "float32":
        X = X.astype(np.float32).astype(np.float64)  # the same inputs for both models
    ours = make_model("torch_logistic", (6,), dtype=dtype)
    numpy_model = LogisticRegression()
    p_torch, loss_torch = descend(ours, ours.init_params((6,), KeyedRng(0)), X, y, [None] * 100, 0.5, 0.01)
    p_np, loss_np = descend(numpy_model, numpy_model.init(6), X, y, [None] * 100, 0.5, 0.01)
    assert loss_torch == pytest.approx(loss_np, abs=1e-12)
    np.testing.assert_allclose(p_torch["head.weight"][0], p_np["weight"], rtol=0, atol=atol)
    np.testing.assert_allclose(p_torch["head.bias"], p_np["bias"], rtol=0, atol=atol)
    np.testing.assert_allclose(ours.predict_proba(p_torch, X), numpy_model.predict_proba(p_np, X), rtol=0, atol=atol)


def _logistic64():
    model = make_model("torch_logistic", (1, 4, 4), dtype="float64")
    X, y = toy((1, 4, 4), n=30, seed=7)
    params = {k: np.random.default_rng(8).normal(size=v.shape) * 0.1 for k, v in model.init_params((1, 4, 4), KeyedRng(0)).items()}
    return model, X, y, params


def test_row_weights_scale_each_rows_loss():
    model, X, y, params = _logistic64()
    doubled, _ = descend(model, params, X, y, [None] * 3, 0.1, row_weights=lambda yb: np.full(yb.shape, 2.0))
    faster, _ = descend(model, params, X, y, [None] * 3, 0.2)  # without L2, weight 2 == twice the rate
    for k in params:
        np.testing.assert_allclose(doubled[k], faster[k], rtol=0, atol=1e-13)
    skewed, _ = descend(model, params, X, y, [None] * 3, 0.1, row_weights=lambda yb: np.where(yb > 0.5, 3.0, 0.5))
    assert not np.allclose(skewed["head.weight"], faster["head.weight"])


def test_correction_is_added_to_every_step_and_the_proximal_term_pulls_to_its_center():
    model, X, y, params = _logistic64()
    shift = {k: np.random.default_rng(9).normal(size=v.shape) for k, v in params.items()}
    plain, _ = descend(model, params, X, y, [None], 0.1, 0.01)
    corrected, _ = descend(model, params, X, y, [None], 0.1, 0.01, correction=shift)
    for k in params:
        np.testing.assert_allclose(corrected[k], plain[k] - 0.1 * shift[k], rtol=0, atol=1e-13)
    center = {k: v + 1.0 for k, v in params.items()}
    distance = []
    for mu in (0.0, 1.0, 5.0):
        out, _ = descend(model, params, X, y, [None] * 10, 0.1, prox_center=center, mu=mu)
        distance.append(sum(float(np.sum((out[k] - center[k]) ** 2)) for k in out))
    assert distance[0] > distance[1] > distance[2]


def test_the_optimizer_starts_fresh_at_every_call():
    model, X, y, params = _logistic64()
    adam = make_model("torch_logistic", (1, 4, 4), dtype="float64", optimizer="adam")
    for m, same in ((model, True), (adam, False)):
        once, _ = descend(m, params, X, y, [None] * 2, 0.05)
        half, _ = descend(m, params, X, y, [None], 0.05)
        twice, _ = descend(m, half, X, y, [None], 0.05)
        equal = all(np.array_equal(once[k], twice[k]) for k in params)
        assert equal == same  # Adam's second step inside one call uses its moments; a new call has none


def test_gradient_of_batch_norm_statistics_is_zero_and_a_gradient_step_keeps_them():
    model = _model("cnn2d", "batch")
    X, y = toy(SHAPES["cnn2d"], n=10)
    grads, _ = model.gradient(model.init_params(SHAPES["cnn2d"], KeyedRng(0)), X, y)
    assert all(not grads[k].any() for k in grads if is_norm_statistic(k))
    assert grads["head.weight"].any()


def _in_forked_worker(ctx, target):
    """Run ``target(conn)`` in a forked process (killed after 60 s) and return what it sent."""
    parent, child = ctx.Pipe()
    worker = ctx.Process(target=target, args=(child,))
    worker.start()
    worker.join(timeout=60)
    if worker.is_alive():
        worker.kill()
        worker.join()
    assert worker.exitcode == 0
    return parent.recv()


def _train_in_child(conn):
    model = make_model("cnn2d", (1, 8, 8), channels=(4,))
    X, y = toy((1, 8, 8), n=16)
    descend(model, model.init_params((1, 8, 8), KeyedRng(0)), X, y, [None] * 2, 0.1)
    conn.send(torch.get_num_threads())


def test_a_forked_child_trains_after_its_parent_did():
    """Torch's OpenMP pool does not survive fork: without one thread per forked child, the
    harness's repeat workers would hang once the parent process had trained a model."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    torch.set_num_threads(2)
    try:
        model = make_model("cnn2d", (1, 8, 8), channels=(4,))
        X, y = toy((1, 8, 8), n=16)
        descend(model, model.init_params((1, 8, 8), KeyedRng(0)), X, y, [None] * 2, 0.1)
        assert _in_forked_worker(ctx, _train_in_child) == 1
    finally:
        torch.set_num_threads(1)


# --- threads: the numbers do not depend on torch's thread count ---------------------------

THREAD_CASES = [("cnn2d", (1, 16, 16), {"channels": (4, 8)}), ("cnn3d", (1, 8, 8, 8), {"channels": (4, 8)}),
                ("mlp", (1, 16, 16), {})]


def _train_twice(arch, shape, options):
    """Two rounds of four Adam steps (the second from a trained, non-zero head), then the
    eval-mode gradient and predictions: every kind of call a site makes."""
    X, y = toy(shape, n=64)
    model = make_model(arch, shape, optimizer="adam", **options)
    params = model.init_params(shape, KeyedRng(0))
    for r in range(2):
        params, _ = descend(model, params, X, y, batch_indices(64, 32, 4, KeyedRng(1, (r,))), 0.01, 1e-4)
    grads, loss = model.gradient(params, X, y, 1e-4, with_loss=True)
    return params, grads, model.predict_proba(params, X), loss


@pytest.mark.parametrize(("arch", "shape", "options"), THREAD_CASES, ids=[c[0] for c in THREAD_CASES])
def test_a_seed_gives_the_same_bits_whatever_torchs_thread_count(arch, shape, options):
    """oneDNN's conv weight gradient, MKL's products and BatchNorm1d split their sums by
    thread count (1-1000 ulp), which Adam's steps then amplify; the model computes with its
    own ``threads`` option instead, and leaves the caller's setting as it found it."""
    runs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        runs.append(_train_twice(arch, shape, options))
        assert torch.get_num_threads() == threads
    (p1, g1, proba1, loss1), (p2, g2, proba2, loss2) = runs
    for k in p1:
        np.testing.assert_array_equal(p1[k], p2[k], err_msg=k)
        np.testing.assert_array_equal(g1[k], g2[k], err_msg=k)
    np.testing.assert_array_equal(proba1, proba2)
    assert loss1 == loss2


def test_the_threads_option_sets_torchs_thread_count_inside_the_calls_only():
    X, y = toy((1, 8, 8), n=16)
    seen = []

    def weights(yb):  # descend calls it inside each step
        seen.append(torch.get_num_threads())
        return np.ones_like(yb)

    for threads, outside in ((1, 2), (2, 1)):
        model = make_model("cnn2d", (1, 8, 8), channels=(4,), threads=threads)
        torch.set_num_threads(outside)
        seen.clear()
        descend(model, model.init_params((1, 8, 8), KeyedRng(0)), X, y, [None] * 2, 0.1, row_weights=weights)
        assert seen == [threads, threads] and torch.get_num_threads() == outside
    assert make_model("cnn2d", (1, 8, 8)).options["threads"] == 1


def _threads_in_child(conn):
    model = make_model("cnn2d", (1, 8, 8), channels=(4,), threads=2)
    X, y = toy((1, 8, 8), n=16)
    try:
        descend(model, model.init_params((1, 8, 8), KeyedRng(0)), X, y, [None], 0.1)
        conn.send("trained")
    except ConfigError as exc:
        conn.send(str(exc))


def test_more_than_one_thread_in_a_forked_worker_is_refused_not_a_hang():
    import multiprocessing

    message = _in_forked_worker(multiprocessing.get_context("fork"), _threads_in_child)
    assert "option 'threads' is 2" in message and "forked worker" in message and "--workers 1" in message


def test_serial_and_forked_repeat_workers_give_the_same_numbers_for_a_torch_model():
    """The parent computes with torch's default threads, forked workers with one: the
    numbers must not care (on main they did, for any cnn2d run with --workers)."""
    from medfed.data.federation import Federation, Site
    from medfed.experiments.config import build_config
    from medfed.experiments.harness import run_experiment

    sites = [Site(s.name, s.X, s.y) for s in _image_sites(sizes=(20, 20))]
    federation = Federation("tiny-images", tuple(sites), ("intensity",))
    torch.set_num_threads(2)
    runs = []
    for workers in (1, 2):
        config = build_config({
            "data": {"dataset": "mni-phantom"}, "model": "cnn2d", "model_options": {"channels": [4, 8]},
            "methods": ["single", "fedavg"], "repeats": 2, "workers": workers,
            "training": {"rounds": 3, "local_steps": 3, "batch_size": 8},
        })
        runs.append(run_experiment(config, federation))
    serial, forked = runs
    assert forked.workers == 2
    # every test score and training loss to the bit (the metrics of 4 test rows per site would hide it)
    assert [(c.setting, c.test_site) for c in serial.cells] == [(c.setting, c.test_site) for c in forked.cells]
    for a, b in zip(serial.cells, forked.cells):
        assert len(a.scores) == 2
        for (ya, sa), (yb, sb) in zip(a.scores, b.scores):
            np.testing.assert_array_equal(ya, yb)
            np.testing.assert_array_equal(sa, sb, err_msg=f"{a.setting} {a.test_site}")
    for a, b in zip(serial.histories, forked.histories):
        np.testing.assert_array_equal(a.train_loss, b.train_loss)


# --- the registry -----------------------------------------------------------------------


def test_registry_builds_models_by_name_and_rejects_bad_names_and_options():
    assert isinstance(make_model("logistic", (5,)), LogisticRegression)
    assert set(MODELS) == set(MODEL_OPTIONS) == {"logistic", "softmax", "linear", "multilabel_logistic", "torch_logistic", "mlp", "cnn2d", "cnn3d", "unet2d", "unet3d"}
    m = make_model("CNN2D", (1, 8, 8), norm="group", channels=[4, 8], optimizer="adam")
    assert isinstance(m, TorchModel) and m.name == "cnn2d" and m.options["channels"] == (4, 8)
    assert make_model("mlp", (3,), hidden="16,8").options["hidden"] == (16, 8)
    bad = [
        (("resnet", (1, 8, 8)), {}, "available: logistic, softmax, linear, multilabel_logistic, torch_logistic, mlp, cnn2d, cnn3d"),
        (("cnn2d", (1, 8, 8)), {"depth": 3}, "its options: norm, channels"),
        (("cnn2d", (1, 8, 8)), {"norm": "layer"}, "one of batch, group, none"),
        (("mlp", (4,)), {"hidden": [8, 0]}, "positive whole numbers"),
        (("mlp", (4,)), {"optimizer": "lbfgs"}, "one of sgd, adam"),
        (("cnn2d", (1, 8, 8)), {"threads": 0}, "option 'threads' must be a positive whole number"),
        (("cnn2d", (1, 8, 8)), {"threads": "2"}, "option 'threads' must be a positive whole number"),
        (("cnn2d", (12,)), {}, "takes 2D images (C, H, W)"),
        (("cnn3d", (1, 8, 8)), {}, "3D images"),
        (("logistic", (1, 8, 8)), {}, "feature vectors"),
        (("logistic", (4,)), {"norm": "batch"}, "has no option 'norm'"),
    ]
    for args, options, message in bad:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            make_model(*args, **options)
    with pytest.raises(ConfigError, match="parameters do not match"):
        m.predict_proba({"weight": np.zeros(3)}, np.zeros((2, 1, 8, 8), np.float32))


def test_the_table_path_and_the_method_registry_do_not_load_torch():
    code = (
        "import sys; from medfed.models.registry import make_model, MODELS; import medfed.methods.images; "
        "make_model('logistic', (4,)); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# --- every federated method on a CNN, unchanged -------------------------------------------


def _image_sites(shape=(1, 8, 8), sizes=(16, 12, 10)):
    sites = []
    for k, n in enumerate(sizes):
        X, y = toy(shape, n=n, seed=10 + k)
        sites.append(LocalData(f"site-{k}", X * (1.0 + 0.3 * k) + 0.2 * k, y))  # per-site scanner effects
    return sites


def _run(method, options=None, rounds=3, model=None, sites=None):
    sites = sites or _image_sites()
    model = model or make_model("cnn2d", (1, 8, 8), channels=(4, 8))
    spec = METHODS[method]
    t = TrainingSpec(rounds=rounds, local_steps=3, lr=0.1, batch_size=8, l2=1e-3)
    training = LocalTraining(model, t.lr, t.local_steps, t.batch_size, t.l2)
    context = context_for([s.name for s in sites], 0, {s.name: (float((s.y < 0.5).sum()), float(s.y.sum())) for s in sites})
    algorithm = spec.build(spec.validate(options or {}), t, context)
    return run_federated(algorithm, model.init_params((1, 8, 8), KeyedRng(0)), sites, training, spec.rounds(t), KeyedRng(1))


def test_fedavg_on_a_cnn_trains_and_fedprox_with_mu_zero_is_fedavg_bit_for_bit():
    fedavg = _run("fedavg", rounds=6)
    assert fedavg.train_loss[-1] < fedavg.train_loss[0]
    prox = _run("fedprox", {"mu": 0.0}, rounds=6)
    for k in fedavg.params:
        np.testing.assert_array_equal(fedavg.params[k], prox.params[k])
    pulled = _run("fedprox", {"mu": 1.0}, rounds=6)
    assert any(not np.array_equal(fedavg.params[k], pulled.params[k]) for k in fedavg.params)


# distill trains numpy students only (a torch model is refused before training: test_distill.py)
FEDERATED = [name for name, spec in METHODS.items() if spec.kind == "federated" and name != "distill"]
FEW_SITES = {"krum": {"f": 0}, "multikrum": {"f": 0}, "bulyan": {"f": 0}}  # with f = 1 they need 5 or 7 sites


@pytest.mark.parametrize("method", FEDERATED)
def test_every_registered_federated_method_runs_on_a_cnn_unchanged(method):
    run = _run(method, FEW_SITES.get(method), rounds=2)
    assert all(np.isfinite(v).all() for v in run.params.values())
    assert not any(r.rejected for r in run.history), run.history
    assert np.isfinite(run.train_loss).all()
    if METHODS[method].personal:
        assert set(run.personal) == {"site-0", "site-1", "site-2"}


def test_batch_norm_statistics_are_those_of_the_site_data_under_the_final_weights():
    """After descend, BN's running mean/var are recomputed from all rows with the final
    weights (not an average lagging behind the steps), so eval mode matches the data."""
    import torch.nn.functional as F

    X, y = toy(SHAPES["cnn2d"], n=48)
    for recalibrate in (True, False):
        model = make_model("cnn2d", SHAPES["cnn2d"], norm="batch", optimizer="adam", recalibrate=recalibrate)
        params = model.init_params(SHAPES["cnn2d"], KeyedRng(0))
        trained, _ = descend(model, params, X, y, batch_indices(48, 8, 12, KeyedRng(1)), 0.05)
        out = F.conv2d(torch.as_tensor(X), torch.as_tensor(trained["body.0.conv.weight"]).float(), padding=1)
        mean = out.mean(dim=(0, 2, 3)).double().numpy()
        var = out.var(dim=(0, 2, 3), unbiased=True).double().numpy()
        close = np.allclose(trained["body.0.norm.running_mean"], mean, rtol=1e-4, atol=1e-5) and np.allclose(
            trained["body.0.norm.running_var"], var, rtol=1e-3, atol=1e-5)
        assert close == recalibrate  # without recalibration they lag behind the weights


def test_local_training_sets_train_mode_once_not_every_step(monkeypatch):
    # walking every module to set train mode again on each step cost 2-3% of a U-Net's local
    # training; the steps, and the eval-mode start loss before them, must still see the right modes
    shape = SHAPES["cnn2d"]
    X, y = toy(shape)
    model = _model("cnn2d")
    params = model.init_params(shape, KeyedRng(0))
    net = model._slot(shape).net
    calls, modes = [], []
    train, forward = torch.nn.Module.train, type(net).forward

    def counted_train(self, mode=True):
        if self is net:
            calls.append(mode)
        return train(self, mode)

    def recorded_forward(self, x):
        modes.append(self.training)
        return forward(self, x)

    monkeypatch.setattr(torch.nn.Module, "train", counted_train)
    monkeypatch.setattr(type(net), "forward", recorded_forward)
    descend(model, params, X, y, list(batch_indices(len(y), 8, 5, KeyedRng(1))), 0.1)
    assert calls.count(True) == 1  # eval() is train(False): the start loss's
    assert modes[:6] == [False] + [True] * 5  # the start loss in eval mode, then the 5 steps in train mode
