"""`distill` with torch students, torch and state-dict teachers, and the site's unlabeled rows
(issue 14 §2): weight 0 is FedAvg bit for bit with a torch student; the torch loss's gradient is
the numpy sessions' (torch_logistic vs logistic/softmax, float64); a state dict loads into the
student's architecture with the logits of the module it came from, a mismatched one is one error;
unlabeled rows move the update only when the soft term is on; the CLI end to end on tiny data."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from medfed.cli.app import app
from medfed.client import LocalData, LocalTraining
from medfed.client.distill import Teacher, distill_update, training_rows
from medfed.engine import run_federated
from medfed.errors import ConfigError
from medfed.experiments.config import TrainingSpec
from medfed.experiments.saved_model import check_state_dict, load_teacher
from medfed.methods.method import BuildContext
from medfed.methods.registry import METHODS
from medfed.models import LogisticRegression
from medfed.models.distill import Distillation, pack, soften, student
from medfed.models.glm import SoftmaxRegression
from medfed.models.registry import make_model
from medfed.rng import KeyedRng

runner = CliRunner()
D = 4


def _sites(K=2, unlabeled=0, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for k, n in enumerate((20, 16, 12)):
        X = rng.normal(size=(n, D)) + 0.3 * k
        score = X[:, 0] + 0.5 * X[:, 1]
        y = (score > 0.3 * k).astype(float) if K == 2 else np.digitize(score, [-0.5, 0.5]).astype(float)
        extra = rng.normal(size=(unlabeled, D)) if unlabeled else None
        out.append(LocalData(f"s{k}", X, y, extra))
    return out


def _torch(name="torch_logistic", K=2, **options):
    return make_model(name, (D,), task="binary" if K == 2 else "multiclass", n_classes=None if K == 2 else K,
                      dtype="float64", device="cpu", **options)


def _run(name, sites, model, held=None, **opts):
    spec = METHODS[name]
    algo = spec.build(spec.validate(opts), TrainingSpec(), BuildContext(("s0", "s1", "s2"), teacher=held))
    training = LocalTraining(model, lr=0.3, steps=3, batch_size=8, l2=0.01)
    start = model.init_params((D,), KeyedRng(3))
    return run_federated(algo, start, sites, training, 3, KeyedRng(7))


def _teacher(model, seed=1):
    """A teacher of the student's own model with random parameters (its logits far from the student's)."""
    rng = np.random.default_rng(seed)
    return Teacher(model, {k: v + rng.normal(size=v.shape) for k, v in model.init_params((D,), KeyedRng(seed)).items()},
                   "t")


@pytest.mark.parametrize("name,K,options", [("torch_logistic", 2, {}), ("mlp", 3, {"hidden": (6,), "norm": "none"})])
def test_weight_zero_is_fedavg_bit_for_bit_with_a_torch_student(name, K, options):
    sites = _sites(K, unlabeled=5)  # unlabeled rows present: at weight 0 they are not used
    model = _torch(name, K, **options)
    teacher = _teacher(model)
    fedavg = _run("fedavg", sites, model)
    distill = _run("distill", sites, model, teacher, teacher="t", weight=0.0, temperature=3.0)
    assert all(np.array_equal(distill.params[k], fedavg.params[k]) for k in fedavg.params)
    assert [r.train_loss for r in distill.history] == [r.train_loss for r in fedavg.history]
    moved = _run("distill", sites, model, teacher, teacher="t", weight=0.5)
    assert not np.array_equal(moved.params["head.weight"], fedavg.params["head.weight"])


def _numpy_view(K, torch_params):
    """torch_logistic's head as the numpy model's parameters (weight (d,) or (d, K))."""
    w, b = torch_params["head.weight"], torch_params["head.bias"]
    return {"weight": w[0].copy(), "bias": b.copy()} if K == 2 else {"weight": w.T.copy(), "bias": b.copy()}


@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("T,lam", [(1.0, 0.5), (2.5, 0.3), (4.0, 1.0)])
def test_torch_distillation_gradient_equals_the_numpy_one(K, T, lam):
    """torch_logistic (autograd of the head's loss) against logistic/softmax (the closed form), on
    labeled and unlabeled (NaN-labeled) rows together, in float64."""
    data = _sites(K, unlabeled=6)[0]
    X, y = training_rows(data, True)
    assert np.isnan(y).sum() == 6
    tmodel = _torch("torch_logistic", K)
    rng = np.random.default_rng(5)
    tparams = {k: rng.normal(size=v.shape) for k, v in tmodel.init_params((D,), KeyedRng(0)).items()}
    nmodel = LogisticRegression() if K == 2 else SoftmaxRegression(K)
    nparams = _numpy_view(K, tparams)
    soft = Distillation(T, lam)
    packed = pack(y, soften(rng.normal(size=len(y)) if K == 2 else rng.normal(size=(len(y), K)), T))
    with student(tmodel, soft).session(tparams, X, packed) as s:
        tg, tloss = s.gradient(None, with_loss=True)
        tg = {k: v.detach().numpy() for k, v in tg.items()}
    with student(nmodel, soft).session(nparams, X, packed) as s:
        ng, nloss = s.gradient(None, with_loss=True)
    assert tloss == pytest.approx(nloss, rel=1e-12)
    got = _numpy_view(K, {"head.weight": tg["head.weight"], "head.bias": tg["head.bias"]})
    np.testing.assert_allclose(got["weight"], np.asarray(ng["weight"]), rtol=0, atol=1e-8)
    np.testing.assert_allclose(got["bias"], np.atleast_1d(ng["bias"]), rtol=0, atol=1e-8)


# --------------------------------------------------------------------------- state-dict teachers

def _state_dict_file(tmp_path, model, name="teacher.pt", seed=11, d=D):
    """A torch module of the student's architecture with weights of its own, saved as users save one."""
    net = model.network((d,)).double()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    path = tmp_path / name
    torch.save(net.state_dict(), path)
    return path, net


@pytest.mark.parametrize("name,K,options", [("torch_logistic", 2, {}), ("mlp", 3, {"hidden": (5,)})])
def test_state_dict_teacher_gives_the_logits_of_its_module(tmp_path, name, K, options):
    model = _torch(name, K, **options)
    path, net = _state_dict_file(tmp_path, model)
    teacher = load_teacher(path)
    assert teacher.model is None  # the architecture is the student's
    X = np.random.default_rng(2).normal(size=(9, D))
    net.eval()
    with torch.no_grad():
        expected = net(torch.as_tensor(X)).numpy()
    np.testing.assert_allclose(teacher.scores(X, model), expected.reshape(teacher.scores(X, model).shape),
                               rtol=1e-12, atol=1e-12)


def test_mismatched_state_dict_is_one_error_naming_file_key_and_shape(tmp_path):
    model = _torch("mlp", 2, hidden=(5,))
    shapes = model.param_shapes((D,))
    wide, _ = _state_dict_file(tmp_path, _torch("mlp", 2, hidden=(7,)), "wide.pt")
    params = load_teacher(wide).params
    with pytest.raises(ConfigError, match=r"wide.pt does not fit .*'body.0.linear.weight' has shape \(7, 4\), "
                                          r"expected \(5, 4\)"):
        check_state_dict(wide, params, shapes, "mlp")
    with pytest.raises(ConfigError, match=r"lacks 'head.bias' \(expected shape \(1,\)\)"):
        check_state_dict(wide, {k: v for k, v in params.items() if k != "head.bias"} | {
            k: np.zeros(s) for k, s in shapes.items() if k != "head.bias"}, shapes, "mlp")
    with pytest.raises(ConfigError, match="unexpected key 'extra'"):
        check_state_dict(wide, {k: np.zeros(s) for k, s in shapes.items()} | {"extra": np.zeros(1)}, shapes, "mlp")
    pickled = tmp_path / "code.pt"  # a pickle of arbitrary objects: weights_only refuses to load it
    torch.save({"head.bias": np.zeros(1)}, pickled)
    with pytest.raises(ConfigError, match="code.pt is not a torch state dict torch.load can read"):
        load_teacher(pickled)
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(ConfigError, match="list.pt holds no state dict"):
        load_teacher(listed)


# --------------------------------------------------------------------------- unlabeled rows

def _update(data, model, lam, unlabeled=True, K=2):
    training = LocalTraining(model, lr=0.3, steps=4, batch_size=6, l2=0.0)
    params = model.init_params((D,), KeyedRng(3))
    upload, _ = distill_update(params, data, training, None, KeyedRng(9), teacher=_teacher(model),
                               soft=Distillation(2.0, lam), unlabeled=unlabeled)
    return upload


@pytest.mark.parametrize("name,K", [("logistic", 2), ("torch_logistic", 2), ("torch_logistic", 3)])
def test_unlabeled_rows_change_the_update_only_with_the_soft_term(name, K):
    model = (LogisticRegression() if name == "logistic" else _torch(name, K))
    with_rows = _sites(K, unlabeled=8)[0]
    without = dataclasses.replace(with_rows, X_unlabeled=None)
    empty = dataclasses.replace(with_rows, X_unlabeled=np.zeros((0, D)))
    base = _update(without, model, 0.5)
    for same in (_update(empty, model, 0.5), _update(with_rows, model, 0.5, unlabeled=False)):
        assert all(np.array_equal(same.payload[k], base.payload[k]) for k in base.payload)  # bit for bit
    moved = _update(with_rows, model, 0.5)
    assert moved.n_examples == base.n_examples == with_rows.n  # the upload counts the labeled rows
    assert any(not np.allclose(moved.payload[k], base.payload[k]) for k in base.payload)
    at_zero, plain = _update(with_rows, model, 0.0), _update(without, model, 0.0)
    assert all(np.array_equal(at_zero.payload[k], plain.payload[k]) for k in plain.payload)


# --------------------------------------------------------------------------- the CLI, end to end

def _table(tmp_path, n=30):
    rng = np.random.default_rng(0)
    df = pd.DataFrame({c: rng.normal(size=3 * n) for c in ("x1", "x2", "x3")})
    df.insert(0, "site", np.repeat(["A", "B", "C"], n))
    df["label"] = (df["x1"] + 0.3 * rng.normal(size=3 * n) > 0).astype(int)
    path = tmp_path / "t.csv"
    df.to_csv(path, index=False)
    return path


def _cli(path, out, *extra):
    result = runner.invoke(app, [str(a) for a in ("run", "--data", path, "--site-column", "site", "--label-column",
                                                  "label", "--rounds", 3, "--local-steps", 2, "--repeats", 1,
                                                  "--model", "mlp", "--model-option", "hidden=4", "--out", out,
                                                  *extra)])
    return result.exit_code, result.output


def test_cli_with_torch_model_and_state_dict_teachers(tmp_path):
    path = _table(tmp_path)
    code, text = _cli(path, tmp_path / "teach", "--methods", "mix", "--save-model")
    assert code == 0, text
    saved = tmp_path / "teach" / "models" / "Mix.npz"
    code, text = _cli(path, tmp_path / "s", "--methods", "fedavg,distill", "--teacher", saved,
                      "--labeled-fraction", 0.5)
    assert code == 0, text
    doc = (tmp_path / "s" / "report.md").read_text() if (tmp_path / "s" / "report.md").exists() else text
    assert "used by Distill" in doc, doc
    rows = pd.read_csv(tmp_path / "s" / "results.csv")
    assert set(rows["setting"]) == {"FedAvg", "Distill"}
    # a state dict of the student's architecture: runs; weight 0 equals FedAvg
    state, _ = _state_dict_file(tmp_path, make_model("mlp", (3,), hidden=(4,)), d=3)
    code, text = _cli(path, tmp_path / "p", "--methods", "fedavg,distill", "--teacher", state,
                      "--method-option", "distill.weight=0")
    assert code == 0, text
    got = pd.read_csv(tmp_path / "p" / "results.csv").pivot_table(index="test_site", columns="setting",
                                                                   values=["acc_mean", "auc_mean"])
    np.testing.assert_array_equal(got.xs("Distill", axis=1, level=1), got.xs("FedAvg", axis=1, level=1))
    # a state dict of another architecture: one line, exit 2, naming the file, the key and the shape
    wide, _ = _state_dict_file(tmp_path, make_model("mlp", (3,), hidden=(6,)), "wide.pt", d=3)
    code, text = _cli(path, tmp_path / "w", "--methods", "distill", "--teacher", wide)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "wide.pt" in lines[0] and "'body.0.linear.weight'" in lines[0] \
        and "expected (4, 3)" in lines[0], text


def test_distill_without_unlabeled_rows_is_named_among_the_methods_that_leave_them_out(tmp_path):
    """distill.unlabeled=false (or weight 0) learns from the labeled rows only: the run's note must
    say so, and the unlabeled-row refusals (harmonization) must not apply to it."""
    from medfed.methods import resolve

    spec, _ = resolve("distill", {})
    assert spec.uses_unlabeled(spec.validate({}))
    assert not spec.uses_unlabeled(spec.validate({"unlabeled": False}))
    assert not spec.uses_unlabeled(spec.validate({"weight": 0}))
    path = _table(tmp_path)
    code, text = _cli(path, tmp_path / "teach", "--methods", "mix", "--save-model")
    assert code == 0, text
    saved = tmp_path / "teach" / "models" / "Mix.npz"
    code, text = _cli(path, tmp_path / "s", "--methods", "fedavg,distill", "--teacher", saved,
                      "--labeled-fraction", 0.5, "--method-option", "distill.unlabeled=false")
    assert code == 0, text
    notes = json.loads((tmp_path / "s" / "results.json").read_text())["warnings"]
    line = next(n for n in notes if "unlabeled training rows" in n)
    assert "not used by FedAvg, Distill:" in line and "semi-supervised" not in line, line


def test_each_site_scores_its_rows_with_the_teacher_once_and_keeps_them_in_its_state():
    """The teacher and the site's rows are fixed: its softened outputs are computed in the site's
    first round and kept in its client state (never uploaded); later rounds reuse them."""
    from medfed.client.distill import TeacherTargets

    model = _torch()
    calls = []

    class Counting(Teacher):
        def scores(self, X, student_model=None):
            calls.append(len(X))
            return super().scores(X, student_model)

    held = _teacher(model)
    run = _run("distill", _sites(unlabeled=5), model, Counting(held.model, held.params, "t"), weight=0.5)
    assert calls == [25, 21, 17]  # 3 rounds, 3 sites: one scoring per site (labeled + unlabeled rows)
    for name, state in run.client_states.items():
        assert isinstance(state, TeacherTargets) and state.soft.shape == ({"s0": 25, "s1": 21, "s2": 17}[name],)
    # a kept state gives the update of scoring afresh, bit for bit
    site, training = _sites(unlabeled=5)[0], LocalTraining(model, lr=0.3, steps=3, batch_size=8, l2=0.01)
    soft = Distillation(2.0, 0.5)
    kept = run.client_states["s0"]
    again, _ = distill_update(run.params, site, training, kept, KeyedRng(9), teacher=held, soft=soft)
    fresh, state = distill_update(run.params, site, training, None, KeyedRng(9), teacher=held, soft=soft)
    np.testing.assert_array_equal(state.soft, kept.soft)
    for k in fresh.payload:
        np.testing.assert_array_equal(again.payload[k], fresh.payload[k])
