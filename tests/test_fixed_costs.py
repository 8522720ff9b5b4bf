"""Fixed costs a run pays (issue 13 §3): DOS, Krum and Fourier aggregate without importing
scipy.stats, scipy.spatial or scipy.fft (0.2-0.5 s each), with scipy's numbers: ranks and
distances bit for bit, the DCT to rounding."""

import json
import subprocess
import sys

import numpy as np
import pytest
from scipy.fft import dctn, idctn
from scipy.spatial.distance import pdist, squareform
from scipy.stats import rankdata

import medfed.server.robust as robust
from medfed.client.fourier import spatial_dct
from medfed.server.robust import max_ranks, pairwise_distances, squared_distances


@pytest.mark.parametrize("shape", [(1, 3), (2, 1), (7, 4), (40, 9)])
def test_max_ranks_are_scipys_with_and_without_ties(shape):
    rng = np.random.default_rng(shape[0])
    for X in (rng.normal(size=shape), rng.integers(0, 3, size=shape).astype(float), -np.zeros(shape)):
        want = rankdata(X, method="max", axis=0)
        got = max_ranks(X)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("K,P", [(1, 4), (2, 5), (3, 37), (12, 1000), (9, 60_000)])
def test_distances_are_pdists_to_the_bit_on_both_paths(K, P, monkeypatch):
    X = np.random.default_rng(P).normal(size=(K, P)) * np.geomspace(0.01, 100, P)
    want = squareform(pdist(X, "sqeuclidean")) if K > 1 else np.zeros((1, 1))
    for threshold in (10**12, 0):  # numpy's loop, then scipy's pdist above the size switch
        monkeypatch.setattr(robust, "_PDIST_FROM", threshold)
        np.testing.assert_array_equal(squared_distances(X), want)
        np.testing.assert_array_equal(pairwise_distances(X, "euclidean"), np.sqrt(want))


@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (2, 2, 5, 5, 5), (8, 16, 7, 1)])
def test_the_spatial_dct_is_scipys_orthonormal_dctn_to_rounding(shape):
    x = np.random.default_rng(1).normal(size=shape)
    axes = tuple(range(2, len(shape)))
    spectrum = dctn(x, axes=axes, norm="ortho")
    np.testing.assert_allclose(spatial_dct(x), spectrum, rtol=0, atol=1e-14)
    np.testing.assert_allclose(spatial_dct(spectrum, inverse=True), idctn(spectrum, axes=axes, norm="ortho"),
                               rtol=0, atol=1e-14)


def test_dos_krum_and_fourier_aggregate_without_scipys_slow_modules():
    code = """
import sys
import numpy as np
from medfed.server.aggregate import StackedUploads
from medfed.server.fourier import fourier
from medfed.server.robust import dos, krum
rng = np.random.default_rng(0)
flat = StackedUploads(tuple(f"s{i}" for i in range(6)), {"w": rng.normal(size=(6, 5))}, np.ones(6), "delta", {})
for step in (dos(), krum(f=1)):
    step.apply(flat, step.init({}), None, 0)
kernels = StackedUploads(("a", "b"), {"conv": rng.normal(size=(2, 4, 3, 3, 3))}, np.ones(2), "delta", {})
step = fourier(start=0.5, end=0.5)
step.apply(kernels, step.init({}), None, 0)
print(sorted(m for m in ("scipy.stats", "scipy.spatial", "scipy.fft") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- the start loss of a torch site's training (issue 13 §3: an eval pass per site per round) -----

NETS = [  # (model, model options, sample shape): each a network without BatchNorm or dropout
    ("torch_logistic", {"norm": "none"}, (6,)),
    ("mlp", {"norm": "none", "hidden": [8]}, (6,)),
    ("mlp", {"norm": "group", "hidden": [8]}, (6,)),
    ("cnn2d", {"norm": "none", "channels": [3, 4]}, (1, 8, 8)),
    ("cnn2d", {"norm": "group", "channels": [4, 4]}, (2, 7, 7)),
]


def _site(model_name, options, shape, n, dtype="float32", task="binary"):
    pytest.importorskip("torch")
    from medfed.models.torch_models import TorchModel

    model = TorchModel(model_name, task=task, n_outputs=3 if task == "multiclass" else None, dtype=dtype, **options)
    rng = np.random.default_rng(n)
    params = {k: v + 0.1 * rng.normal(size=v.shape) for k, v in model.init_params(shape, rng).items()}
    X = rng.normal(size=(n, *shape))
    y = rng.integers(0, 3, size=n).astype(float) if task == "multiclass" else (rng.random(n) > 0.5).astype(float)
    return model, params, X, y


def _eval_passes(model, shape, train) -> tuple[float, int]:
    """``train()``'s result and how many forward passes the network ran in eval mode meanwhile."""
    net = model._slot(shape).net
    seen = []
    hook = net.register_forward_hook(lambda module, args, out: seen.append(module.training))
    try:
        result = train()
    finally:
        hook.remove()
    return result, seen.count(False)


@pytest.mark.usefixtures("torch_one_thread")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("model_name,options,shape", NETS)
def test_a_full_batch_step_of_a_modeless_net_gives_the_start_loss_bit_for_bit_without_an_eval_pass(
        model_name, options, shape, dtype):
    from medfed.client.optimizer import descend

    for task, optimizer in (("binary", "sgd"), ("multiclass", "adam")):
        model, params, X, y = _site(model_name, {**options, "optimizer": optimizer}, shape, 11, dtype, task)
        (trained, start), eval_passes = _eval_passes(
            model, shape, lambda: descend(model, params, X, y, [None] * 3, 0.1, l2=0.01))
        assert eval_passes == 0  # the first step's own forward pass gave it
        assert start == model.loss(params, X, y, l2=0.01)  # the eval-mode objective, to the bit
        assert any(not np.array_equal(trained[k], params[k]) for k in params)


@pytest.mark.usefixtures("torch_one_thread")
@pytest.mark.parametrize("case", ["batch_norm", "minibatch", "more_rows_than_eval_batch"])
def test_the_start_loss_keeps_its_eval_pass_where_a_training_pass_is_not_it(case):
    from medfed.client.optimizer import descend

    options = {"norm": "batch" if case == "batch_norm" else "none", "hidden": [8], "eval_batch": 8}
    n = 20 if case == "more_rows_than_eval_batch" else 8
    model, params, X, y = _site("mlp", options, (6,), n)
    batches = [np.arange(4), np.arange(4, 8)] if case == "minibatch" else [None, None]
    (_, start), eval_passes = _eval_passes(model, (6,), lambda: descend(model, params, X, y, batches, 0.1))
    assert eval_passes == -(-n // 8)  # its eval_batch chunks, as before
    assert start == model.loss(params, X, y)


@pytest.mark.usefixtures("torch_one_thread")
@pytest.mark.parametrize("run", [
    ["--dataset", "mni-phantom", "--dataset-option", "n_per_site=12", "--dataset-option", "size=16",
     "--model", "cnn2d", "--model-option", "channels=4,8", "--model-option", "norm=none", "--rounds", "2"],
    ["--dataset", "heart-disease", "--model", "mlp", "--model-option", "norm=group", "--model-option",
     "hidden=8", "--rounds", "3"],
])
def test_full_batch_torch_runs_have_the_numbers_they_had_with_the_separate_eval_pass(run, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from typer.testing import CliRunner

    import medfed.models.torch_models as torch_models
    from medfed.cli.app import app

    def results(out, **patch):
        with monkeypatch.context() as m:
            for name, value in patch.items():
                m.setattr(torch_models, name, value)
            done = CliRunner().invoke(app, ["run", *run, "--methods", "fedavg,fedprox,ditto", "--local-steps", "2",
                                            "--batch-size", "100000", "--repeats", "1", "--no-plots", "--out",
                                            str(tmp_path / out)])
        assert done.exit_code == 0, done.output
        doc = json.loads((tmp_path / out / "results.json").read_text())
        return {k: doc[k] for k in ("results", "histories", "models")}

    # every network as one with BatchNorm or dropout: the start loss from its own eval pass
    before = results("before", _modeless=lambda net: False)
    assert results("after") == before
