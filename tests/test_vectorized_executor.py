"""The vectorized executor (issue 13 §1): the same numbers as the in-process executor up to
summation order (bound: 1e-12 relative), the same records, refusals before training."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from medfed.cli.app import app
from medfed.client.local import LocalData, LocalTraining
from medfed.client.upload import Upload
from medfed.data.datasets import load_dataset
from medfed.engine import run_federated
from medfed.engine.faults import parse_drops
from medfed.errors import ConfigError
from medfed.experiments.config import build_config
from medfed.experiments.harness import check_study
from medfed.methods.method import context_for
from medfed.methods.registry import resolve, resolve_methods
from medfed.models import LogisticRegression
from medfed.rng import KeyedRng
from medfed.server.aggregate import stack_uploads
from medfed.server.validate import screen_stacked, screen_uploads

RTOL = 1e-12  # summation order of the batched products: a few ulps per step, far below this
MODEL = LogisticRegression()


class _Training:
    rounds, local_steps, lr = 4, 3, 0.3


def _sites(k=6, d=5, seed=0):
    """Sites of unequal sizes (so the stacked rows are padded) and shifted features."""
    gen = np.random.default_rng(seed)
    out = []
    for i in range(k):
        n = int(gen.integers(6, 30))
        X = gen.normal(0.3 * i, 1.0, (n, d))
        y = (X @ np.linspace(1, -1, d) + gen.normal(0, 1, n) > 0).astype(float)
        out.append(LocalData(f"site-{i}", X, y))
    return out


def _run(method, opts, executor, sites, *, batch=None, epochs=None, fraction=1.0, rounds=4, lr=0.3, **kwargs):
    spec, opts = resolve(method, opts)
    algorithm = spec.build(opts, _Training, context_for([s.name for s in sites]))
    training = LocalTraining(MODEL, lr, 3, batch, 0.01, epochs)
    return run_federated(algorithm, MODEL.init(sites[0].X.shape[1]), sites, training, rounds, KeyedRng(7),
                         fraction=fraction, executor=executor, **kwargs)


def _assert_agree(a, b):
    for k in a.params:
        np.testing.assert_allclose(b.params[k], a.params[k], rtol=RTOL, atol=1e-14)
    np.testing.assert_allclose(b.train_loss, a.train_loss, rtol=RTOL)
    fields = ("round", "sites", "bytes_up", "bytes_by_site", "rejected", "skipped", "missing", "loss_reported")
    for x, y in zip(a.history, b.history, strict=True):
        assert {f: getattr(y, f) for f in fields} == {f: getattr(x, f) for f in fields}
    assert b.client_states.keys() == a.client_states.keys()
    for site, state in a.client_states.items():  # None, or SCAFFOLD's c_i
        if state is None:
            assert b.client_states[site] is None
        else:
            for k, v in state.control.items():
                np.testing.assert_allclose(b.client_states[site].control[k], v, rtol=RTOL, atol=1e-14)


@pytest.mark.parametrize("method,opts", [
    ("fedavg", {}), ("fedprox", {"mu": 0.5}), ("fedsgd", {}), ("fedavgm", {}), ("fedadam", {}),
    ("trimmed_mean", {"beta": 0.2}),
])
@pytest.mark.parametrize("batch,fraction", [(None, 1.0), (8, 1.0), (8, 0.5)])
def test_agrees_with_inprocess(method, opts, batch, fraction):
    sites = _sites()
    serial = _run(method, opts, "inprocess", sites, batch=batch, fraction=fraction)
    batched = _run(method, opts, "vectorized", sites, batch=batch, fraction=fraction)
    _assert_agree(serial, batched)
    assert len(serial.history[0].sites) == (6 if fraction == 1.0 else 3)


@pytest.mark.parametrize("weighting", ["examples", "uniform"])
@pytest.mark.parametrize("batch,fraction", [(None, 1.0), (8, 0.5)])
def test_scaffold_agrees_with_inprocess(weighting, batch, fraction):
    """SCAFFOLD's c_i as stacked state: corrected steps, c_i committed only for used uploads (a
    dropped site and one over the norm bound keep theirs), extras screened and summed as in process."""
    sites = _sites()
    kwargs = {"faults": parse_drops(["site-1@2", "site-3@1-2"]), "max_update_norm": 0.5, "lr": 0.6}
    serial = _run("scaffold", {"weighting": weighting}, "inprocess", sites, batch=batch, fraction=fraction,
                  rounds=5, **kwargs)
    batched = _run("scaffold", {"weighting": weighting}, "vectorized", sites, batch=batch, fraction=fraction,
                   rounds=5, **kwargs)
    _assert_agree(serial, batched)
    assert any(r.rejected for r in serial.history) and any(r.missing for r in serial.history)
    assert sum(s is None for s in serial.client_states.values()) < len(sites)  # some c_i were committed
    for k, v in serial.server_state["scaffold_control"].weighted_sum.items():
        np.testing.assert_allclose(batched.server_state["scaffold_control"].weighted_sum[k], v, rtol=RTOL, atol=1e-14)


class _Crash(Exception):
    pass


def test_scaffold_resumes_bit_identically_from_the_stacked_state(tmp_path):
    """The coordinator dies after round 3's commit reached the sites but before its checkpoint:
    the resumed run repeats round 3 from the sites' earlier c_i and ends bit-identical."""
    sites = _sites()
    whole = _run("scaffold", {}, "vectorized", sites, batch=8, fraction=0.5, rounds=6)

    calls = iter(range(1, 100))

    def crash_at_round_3(params):
        if next(calls) == 3:
            raise _Crash
        return {}

    with pytest.raises(_Crash):
        _run("scaffold", {}, "vectorized", sites, batch=8, fraction=0.5, rounds=6, evaluate=crash_at_round_3,
             eval_every=1, checkpoint_dir=tmp_path, fingerprint="study")
    assert (tmp_path / "sites" / "vectorized.state").exists()
    resumed = _run("scaffold", {}, "vectorized", sites, batch=8, fraction=0.5, rounds=6, checkpoint_dir=tmp_path,
                   fingerprint="study")
    for k in whole.params:
        np.testing.assert_array_equal(resumed.params[k], whole.params[k])
    np.testing.assert_array_equal(resumed.train_loss, whole.train_loss)
    for site, state in whole.client_states.items():
        assert (resumed.client_states[site] is None) == (state is None)
        if state is not None:
            np.testing.assert_array_equal(resumed.client_states[site].control["weight"], state.control["weight"])
    with pytest.raises(ConfigError, match="not this federation's"):
        _run("scaffold", {}, "vectorized", sites[:4], rounds=7, checkpoint_dir=tmp_path, fingerprint="study")


def _image_sites(k=5, seed=0):
    """Small 1 x 6 x 6 images, sites of unequal sizes."""
    gen = np.random.default_rng(seed)
    out = []
    for i in range(k):
        n = int(gen.integers(5, 14))
        y = (gen.random(n) < 0.5).astype(float)
        X = gen.normal(0.0, 1.0, (n, 1, 6, 6)) + 0.4 * y[:, None, None, None]
        out.append(LocalData(f"site-{i}", X, y))
    return out


def _torch_run(arch, method, opts, executor, *, batch=None, fraction=1.0, epochs=None, **options):
    from medfed.models.registry import make_model

    model = make_model(arch, norm="none", dtype="float64", device="cpu", **options)
    sites = _image_sites() if arch == "cnn2d" else _sites(k=5)
    spec, opts = resolve(method, opts)
    algorithm = spec.build(opts, _Training, context_for([s.name for s in sites]))
    init = model.init_params(sites[0].X.shape[1:], KeyedRng(3))
    init = {k: v + 0.05 if k.startswith("head.") else v for k, v in init.items()}  # every layer's gradient nonzero
    return run_federated(algorithm, init, sites, LocalTraining(model, 0.2, 3, batch, 0.01, epochs), 3, KeyedRng(7),
                         fraction=fraction, executor=executor)


@pytest.mark.parametrize("arch,options", [("mlp", {"hidden": (6, 4)}), ("cnn2d", {"channels": (3, 4)}),
                                          ("torch_logistic", {})])
@pytest.mark.parametrize("method,opts,batch,fraction,epochs", [
    ("fedavg", {}, None, 1.0, None), ("fedprox", {"mu": 0.5}, 4, 0.6, None), ("fedavg", {}, 4, 1.0, 1.5),
])
def test_torch_models_train_with_vmap_as_in_process(arch, options, method, opts, batch, fraction, epochs):
    """float64 torch models without BatchNorm: vmap over the sites equals the per-site loop within
    1e-12 relative (the kernels' summation order); padding, mini-batches, epochs, a cohort."""
    serial = _torch_run(arch, method, opts, "inprocess", batch=batch, fraction=fraction, epochs=epochs, **options)
    batched = _torch_run(arch, method, opts, "vectorized", batch=batch, fraction=fraction, epochs=epochs, **options)
    _assert_agree(serial, batched)


@pytest.mark.parametrize("options,method,why", [
    ({"norm": "batch"}, "fedavg", "BatchNorm's running statistics"),
    ({"norm": "none", "optimizer": "adam"}, "fedavg", "local optimizer 'adam' is not batched"),
    ({"norm": "none"}, "scaffold", "on torch models it batches FedAvg's and FedProx's site rules only"),
    ({"norm": "none"}, "fedsgd", "on torch models it batches FedAvg's and FedProx's site rules only"),
])
def test_torch_models_vmap_refuses_what_it_cannot_batch(options, method, why):
    from medfed.models.registry import make_model

    model = make_model("mlp", device="cpu", **options)
    sites = _sites(k=3)
    spec, opts = resolve(method, {})
    algorithm = spec.build(opts, _Training, context_for([s.name for s in sites]))
    with pytest.raises(ConfigError, match=f"cannot run on executor 'vectorized': .*{why}"):
        run_federated(algorithm, model.init_params((5,), KeyedRng(0)), sites, LocalTraining(model, 0.1, 2), 1,
                      KeyedRng(0), executor="vectorized")


def test_local_epochs_give_each_site_its_own_step_count():
    sites = _sites()  # 6 to 29 rows: with batches of 8, from 1 to 4 steps per epoch
    _assert_agree(_run("fedavg", {}, "inprocess", sites, batch=8, epochs=1.5),
                  _run("fedavg", {}, "vectorized", sites, batch=8, epochs=1.5))


def test_screening_and_dropouts_match_inprocess():
    sites = _sites()
    drops = parse_drops(["site-1@2", "site-4@1-3"])
    kwargs = {"max_update_norm": 0.8, "faults": drops, "min_sites": 2}
    serial = _run("fedavg", {}, "inprocess", sites, lr=1.5, **kwargs)
    batched = _run("fedavg", {}, "vectorized", sites, lr=1.5, **kwargs)
    _assert_agree(serial, batched)
    assert any(r.rejected for r in serial.history) and any(r.missing for r in serial.history)


def test_diverging_sites_are_refused_with_the_in_process_reason():
    sites = _sites()
    big = [LocalData(s.name, s.X * (1e200 if i == 2 else 1.0), s.y) for i, s in enumerate(sites)]
    with np.errstate(all="ignore"):
        serial = _run("fedavg", {}, "inprocess", big, lr=1e200, rounds=1)
        batched = _run("fedavg", {}, "vectorized", big, lr=1e200, rounds=1)
    assert batched.history[0].rejected == serial.history[0].rejected != {}


def test_screen_stacked_equals_screen_uploads():
    glob = {"weight": np.zeros(3), "bias": np.zeros(1)}
    rows = [np.array([0.1, 0.2, 0.3, 0.0]), np.array([np.nan, 0.0, 0.0, np.inf]), np.array([3.0, 0.0, 0.0, 1.0]),
            np.array([0.0, 0.0, 0.0, np.nan]), np.array([-0.2, 0.1, 0.0, 0.4])]
    extras = [{"weight": np.zeros(3), "bias": np.array([np.nan if i in (1, 4) else 0.0])} for i in range(5)]
    uploads = [Upload(f"s{i}", {"weight": r[:3], "bias": r[3:]}, 5 + i, "delta", {"loss": 0.1 * i},
                      {"control_delta": extras[i]}) for i, r in enumerate(rows)]
    accepted, rejected = screen_uploads(uploads, glob, max_norm=1.0)
    stack, stacked_rejected = screen_stacked(stack_uploads(uploads), glob, max_norm=1.0)
    assert stacked_rejected == rejected and len(rejected) == 4  # s4: its extras only
    assert "extra 'control_delta.bias'" in rejected["s4"] and "'weight'" in rejected["s1"]
    expected = stack_uploads(accepted)
    assert stack.sites == expected.sites
    np.testing.assert_array_equal(stack.weights, expected.weights)
    for k in glob:
        np.testing.assert_array_equal(stack.payload[k], expected.payload[k])
    np.testing.assert_array_equal(stack.metrics["loss"], expected.metrics["loss"])


def test_deterministic_and_independent_of_site_order():
    sites = _sites()
    first = _run("fedavg", {}, "vectorized", sites, batch=8, fraction=0.5)
    again = _run("fedavg", {}, "vectorized", sites, batch=8, fraction=0.5)
    for k in first.params:
        np.testing.assert_array_equal(again.params[k], first.params[k])
    shuffled = _run("fedavg", {}, "vectorized", sites[::-1], batch=8)  # draws keyed by site names
    ordered = _run("fedavg", {}, "vectorized", sites, batch=8)
    for k in ordered.params:
        np.testing.assert_allclose(shuffled.params[k], ordered.params[k], rtol=RTOL, atol=1e-14)


@pytest.mark.parametrize("method,why", [
    ("fedsld", "site rule is not batched"), ("ditto", "personal models"), ("dynamic_fusion", "site rule is not batched"),
])
def test_unbatched_methods_are_refused_before_training(method, why):
    sites = _sites()
    spec, opts = resolve(method, {})
    algorithm = spec.build(opts, _Training, context_for([s.name for s in sites]))
    with pytest.raises(ConfigError, match=f"method {method!r} cannot run on executor 'vectorized': .*{why}.*"
                                          "--executor inprocess"):
        run_federated(algorithm, MODEL.init(5), sites, LocalTraining(MODEL, 0.1, 2), 2, KeyedRng(0),
                      executor="vectorized")


@pytest.fixture(scope="module")
def heart():
    return load_dataset("heart-disease")


@pytest.mark.parametrize("values,why", [
    ({"methods": ["fedavg", "fedsld"]}, "'fedsld' cannot run on executor 'vectorized'"),
    ({"methods": ["fedavg"], "compress": "q8"}, "upload compression"),
    ({"methods": ["fedavg"], "privacy": {"dp": "client", "clip": 1.0, "noise": 1.0}}, "differential privacy"),
    ({"methods": ["fedavg"], "model": "mlp"}, "BatchNorm's running statistics"),
])
def test_study_refuses_before_any_training(heart, values, why):
    config = build_config({"data": {"dataset": "heart-disease"}, "executor": "vectorized", **values})
    with pytest.raises(ConfigError, match=why):
        check_study(config, heart, resolve_methods(config.methods, config.method_options, config.pipelines))


def test_cli_runs_a_study_on_the_vectorized_executor(tmp_path):
    common = ["run", "--dataset", "heart-disease", "--methods", "fedavg,fedprox,scaffold", "--rounds", "3", "--repeats", "1"]
    for executor in ("inprocess", "vectorized"):
        result = CliRunner().invoke(app, [*common, "--executor", executor, "--out", str(tmp_path / executor)])
        assert result.exit_code == 0, result.output
    docs = {e: json.loads((tmp_path / e / "results.json").read_text()) for e in ("inprocess", "vectorized")}
    metrics = {e: [[r["metrics"][m]["mean"] for m in sorted(r["metrics"])] for r in d["results"]]
               for e, d in docs.items()}
    np.testing.assert_allclose(np.array(metrics["vectorized"], float), np.array(metrics["inprocess"], float),
                               rtol=RTOL)
    assert docs["vectorized"]["communication"] == docs["inprocess"]["communication"]
    out = tmp_path / "refused"
    refused = CliRunner().invoke(app, [*common[:4], "fedavg,fedsld", *common[5:], "--executor", "vectorized",
                                       "--out", str(out)])
    assert refused.exit_code == 2 and len(refused.output.strip().splitlines()) == 1
    assert "'fedsld' cannot run on executor 'vectorized'" in refused.output
    assert "--executor inprocess" in refused.output
    assert not out.exists() or not any(out.iterdir())  # refused before FedAvg trained


# --- every task (issue 11): multiclass, multilabel and regression on the vectorized executor -----


def _task_sites(task, k=3, d=4, classes=3, seed=1):
    """Three sites of unequal sizes for ``task``: class indices as floats (multiclass, as the harness
    hands them over), (n, L) 0/1 targets (multilabel), standardized real targets (regression)."""
    gen = np.random.default_rng(seed)
    out = []
    for i in range(k):
        n = int(gen.integers(7, 25))
        X = gen.normal(0.3 * i, 1.0, (n, d))
        score = X @ gen.normal(0, 1, (d, classes)) + gen.normal(0, 0.5, (n, classes))
        if task == "multiclass":
            y = score.argmax(axis=1).astype(float)
        elif task == "multilabel":
            y = (score > 0).astype(float)
        else:
            y = score[:, 0]
            y = (y - y.mean()) / y.std()
        out.append(LocalData(f"site-{i}", X, y))
    return out


def _task_run(model, method, opts, executor, sites, *, batch=None, fraction=1.0, rounds=3, init=None, **kwargs):
    spec, opts = resolve(method, opts)
    algorithm = spec.build(opts, _Training, context_for([s.name for s in sites]))
    if init is None:  # nonzero: every class's column moves from the first step
        init = {k: v + 0.05 for k, v in model.init_params(sites[0].X.shape[1:], KeyedRng(3)).items()}
    return run_federated(algorithm, init, sites, LocalTraining(model, 0.3, 3, batch, 0.01), rounds, KeyedRng(7),
                         fraction=fraction, executor=executor, **kwargs)


def _numpy_model(task):
    from medfed.models.glm import (
        LinearRegression,
        MultilabelLogistic,
        SoftmaxRegression,
    )

    return {"multiclass": SoftmaxRegression(3), "multilabel": MultilabelLogistic(3),
            "regression": LinearRegression()}[task]


@pytest.mark.parametrize("task", ["multiclass", "multilabel", "regression"])
@pytest.mark.parametrize("method,opts,batch,fraction", [
    ("fedavg", {}, None, 1.0), ("fedprox", {"mu": 0.5}, 6, 1.0), ("fedsgd", {}, None, 1.0), ("fedsgd", {}, 6, 1.0),
    ("fedadam", {}, 6, 0.7), ("trimmed_mean", {"beta": 0.2}, None, 1.0),
])
def test_numpy_models_of_every_task_agree_with_inprocess(task, method, opts, batch, fraction):
    """softmax, multilabel_logistic and linear: the stacked steps (padding, mini-batches, a
    cohort, FedSGD's gradients, a server chain) equal the per-site loop within 1e-12 relative."""
    model, sites = _numpy_model(task), _task_sites(task)
    serial = _task_run(model, method, opts, "inprocess", sites, batch=batch, fraction=fraction)
    batched = _task_run(model, method, opts, "vectorized", sites, batch=batch, fraction=fraction)
    _assert_agree(serial, batched)
    assert serial.params["weight"].shape == ((4,) if task == "regression" else (4, 3))
    assert not np.allclose(serial.params["weight"], 0.05)  # it trained


@pytest.mark.parametrize("task", ["multiclass", "multilabel", "regression"])
def test_scaffold_on_every_numpy_task_agrees_with_inprocess(task):
    """SCAFFOLD's stacked c_i in the K-output parameter view; a dropped site keeps its c_i."""
    model, sites = _numpy_model(task), _task_sites(task)
    kwargs = {"faults": parse_drops(["site-1@2"]), "batch": 6}
    _assert_agree(_task_run(model, "scaffold", {}, "inprocess", sites, rounds=4, **kwargs),
                  _task_run(model, "scaffold", {}, "vectorized", sites, rounds=4, **kwargs))


@pytest.mark.parametrize("task", ["multiclass", "multilabel", "regression"])
@pytest.mark.parametrize("method,opts,batch,fraction", [("fedavg", {}, None, 1.0), ("fedprox", {"mu": 0.5}, 6, 0.7)])
def test_torch_heads_of_every_task_train_with_vmap_as_in_process(task, method, opts, batch, fraction):
    """A tiny float64 mlp with a multiclass, multilabel or regression head: vmap of the head's own
    loss equals the per-site loop within 1e-12 relative; the start loss is the head's mean."""
    from medfed.models.registry import make_model

    model = make_model("mlp", task=task, n_classes=None if task == "regression" else 3, hidden=(5,), norm="none",
                       dtype="float64", device="cpu")
    sites = _task_sites(task)
    init = model.init_params((4,), KeyedRng(3))
    serial = _task_run(model, method, opts, "inprocess", sites, batch=batch, fraction=fraction, init=init)
    batched = _task_run(model, method, opts, "vectorized", sites, batch=batch, fraction=fraction, init=init)
    _assert_agree(serial, batched)


@pytest.mark.parametrize("task,headline", [("multiclass", "macro_f1"), ("regression", "rmse")])
def test_cli_runs_every_task_table_on_the_vectorized_executor(tmp_path, task, headline):
    """A multiclass and a regression table through ``medfed run``: the softmax and linear models
    on the vectorized executor report the in-process metrics (the harness standardizes the
    regression target for both); main refused both models."""
    gen = np.random.default_rng(0)
    rows = ["site,a,b,dx"]
    for i in range(60):
        a, b = gen.normal(size=2)
        label = ("flu", "cold", "ok")[int(a > 0) + int(b > 0.5)] if task == "multiclass" else \
            f"{50 + 8 * a - 3 * b + gen.normal():.3f}"
        rows.append(f"s{i % 3},{a:.4f},{b:.4f},{label}")
    table = tmp_path / "t.csv"
    table.write_text("\n".join(rows) + "\n")
    common = ["run", "--data", str(table), "--site-column", "site", "--label-column", "dx", "--task", task,
              "--methods", "fedavg,scaffold", "--rounds", "3", "--repeats", "1"]
    docs = {}
    for executor in ("inprocess", "vectorized"):
        result = CliRunner().invoke(app, [*common, "--executor", executor, "--out", str(tmp_path / executor)])
        assert result.exit_code == 0, result.output
        docs[executor] = json.loads((tmp_path / executor / "results.json").read_text())
    metrics = {e: [[r["metrics"][m]["mean"] for m in sorted(r["metrics"])] for r in d["results"]]
               for e, d in docs.items()}
    assert headline in docs["vectorized"]["results"][0]["metrics"]
    np.testing.assert_allclose(np.array(metrics["vectorized"], float), np.array(metrics["inprocess"], float),
                               rtol=RTOL)


@pytest.mark.parametrize("norm", ["none", "group"])
def test_segmentation_unets_train_with_vmap_as_in_process(norm):
    """A tiny float64 U-Net (MONAI's UNet, Dice + cross-entropy with the masks one-hot encoded by
    comparison, which vmap runs) on 3 sites: the vectorized executor equals the per-site loop."""
    from medfed.models.registry import make_model

    model = make_model("unet2d", task="segmentation", n_classes=2, norm=norm, channels=(2, 4), dtype="float64",
                       device="cpu")
    gen = np.random.default_rng(0)
    sites = [LocalData(f"s{i}", gen.normal(size=(3 + i, 1, 8, 8)), (gen.random((3 + i, 8, 8)) > 0.5).astype(float))
             for i in range(3)]
    init = model.init_params((1, 8, 8), KeyedRng(3))
    serial = _task_run(model, "fedavg", {}, "inprocess", sites, init=init, rounds=2)
    batched = _task_run(model, "fedavg", {}, "vectorized", sites, init=init, rounds=2)
    # GroupNorm's batched reductions sum in another order (the module docstring's bound)
    if norm == "none":
        _assert_agree(serial, batched)
    else:
        for k in serial.params:
            np.testing.assert_allclose(batched.params[k], serial.params[k], rtol=1e-7, atol=1e-9)
    assert any(not np.allclose(serial.params[k], init[k]) for k in init)  # it trained


