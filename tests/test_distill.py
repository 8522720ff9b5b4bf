"""The `distill` method (issue 14 §2; Kumar et al., 2021a, Hinton et al., 2015's loss): its defining
property (weight 0: FedAvg, bit for bit), the loss and gradient against a hand computation and finite
differences, the T² scaling, a teacher equal to the student, and the refusals of --teacher."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from medfed.cli.app import app
from medfed.client import LocalData, LocalTraining
from medfed.client.distill import Teacher
from medfed.engine import run_federated
from medfed.errors import ConfigError
from medfed.experiments.config import TrainingSpec
from medfed.experiments.saved_model import load_teacher
from medfed.methods.method import BuildContext
from medfed.methods.registry import METHODS
from medfed.models import LogisticRegression
from medfed.models.distill import Distillation, Distilling, pack, soften
from medfed.models.glm import SoftmaxRegression
from medfed.rng import KeyedRng

runner = CliRunner()


def _sites(K=2, d=4, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for k, n in enumerate((30, 24, 18)):
        X = rng.normal(size=(n, d)) + 0.3 * k
        score = X[:, 0] + 0.5 * X[:, 1]
        y = (score > 0.3 * k).astype(float) if K == 2 else np.digitize(score, np.linspace(-1, 1, K - 1)).astype(float)
        out.append(LocalData(f"s{k}", X, y))
    return out


def _model(K):
    return LogisticRegression() if K == 2 else SoftmaxRegression(K)


def _params(K, d, seed):
    rng = np.random.default_rng(seed)
    if K == 2:
        return {"weight": rng.normal(size=d), "bias": rng.normal(size=1)}
    return {"weight": rng.normal(size=(d, K)), "bias": rng.normal(size=K)}


def _run(name, sites, model, held=None, batch_size=8, **opts):
    spec = METHODS[name]
    algo = spec.build(spec.validate(opts), TrainingSpec(), BuildContext(("s0", "s1", "s2"), teacher=held))
    training = LocalTraining(model, lr=0.3, steps=4, batch_size=batch_size, l2=0.01)
    start = model.init_params(sites[0].X.shape[1:])
    return run_federated(algo, start, sites, training, 4, KeyedRng(7))


@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("batch_size", [None, 8])
def test_weight_zero_is_fedavg_bit_for_bit(K, batch_size):
    sites, model = _sites(K), _model(K)
    teacher = Teacher(model, _params(K, 4, 1), "t")
    fedavg = _run("fedavg", sites, model, batch_size=batch_size)
    distill = _run("distill", sites, model, teacher, batch_size, teacher="t", weight=0.0, temperature=3.0)
    assert all(np.array_equal(distill.params[k], fedavg.params[k]) for k in fedavg.params)
    assert [r.train_loss for r in distill.history] == [r.train_loss for r in fedavg.history]  # the reported losses too
    moved = _run("distill", sites, model, teacher, batch_size, teacher="t", weight=0.5)
    assert not np.array_equal(moved.params["weight"], fedavg.params["weight"])  # the teacher reaches the sites


def _hand_loss(K, params, X, y, t, T, lam):
    """The loss written out from its definition, with no code shared with medfed.models.distill."""
    z = X @ params["weight"] + params["bias"]
    if K == 2:
        z = z.reshape(-1)
        ps, qs, qt = 1 / (1 + np.exp(-z)), 1 / (1 + np.exp(-z / T)), 1 / (1 + np.exp(-t / T))
        ce = -(y * np.log(ps) + (1 - y) * np.log(1 - ps))
        kl = qt * np.log(qt / qs) + (1 - qt) * np.log((1 - qt) / (1 - qs))
    else:
        def sm(u):
            e = np.exp(u - u.max(axis=1, keepdims=True))
            return e / e.sum(axis=1, keepdims=True)
        ce = -np.log(sm(z)[np.arange(len(y)), y.astype(int)])
        qs, qt = sm(z / T), sm(t / T)
        kl = (qt * np.log(qt / qs)).sum(axis=1)
    return np.mean((1 - lam) * ce + lam * T * T * kl)


def _session_grad(model, soft, params, X, packed):
    with Distilling(model, soft).session(params, X, packed) as s:
        g, loss = s.gradient(None, with_loss=True)
    return {"weight": np.asarray(g["weight"]), "bias": np.atleast_1d(g["bias"])}, loss


@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("T,lam", [(1.0, 0.5), (2.5, 0.3), (4.0, 1.0)])
def test_loss_and_gradient_equal_a_hand_computation(K, T, lam):
    X, y = _sites(K)[0].X, _sites(K)[0].y
    model, params = _model(K), _params(K, 4, 2)
    t = Teacher(model, _params(K, 4, 3), "t").scores(X)
    soft = Distillation(T, lam)
    packed = pack(y, soften(t, T))
    grads, loss = _session_grad(model, soft, params, X, packed)
    assert loss == pytest.approx(_hand_loss(K, params, X, y, t, T, lam), rel=1e-12)
    h = 1e-6
    for name, value in params.items():
        for idx in np.ndindex(value.shape):
            up = {k: v.copy() for k, v in params.items()}
            down = {k: v.copy() for k, v in params.items()}
            up[name][idx] += h
            down[name][idx] -= h
            fd = (_hand_loss(K, up, X, y, t, T, lam) - _hand_loss(K, down, X, y, t, T, lam)) / (2 * h)
            assert grads[name][idx] == pytest.approx(fd, abs=1e-6)


@pytest.mark.parametrize("K", [2, 3])
def test_t_squared_keeps_the_soft_gradient_magnitude(K):
    """Hinton et al.'s reason for T²: the soft term's gradient scales as 1/T², so T² keeps it of one
    size whatever T (exactly so for small logits, where softmax(z/T) is linear in z/T)."""
    X, y = _sites(K)[0].X, _sites(K)[0].y
    model = _model(K)
    student, teacher = ({k: 0.02 * v for k, v in _params(K, 4, s).items()} for s in (4, 5))
    t = model.decision(teacher, X)
    norms = {}
    for T in (1.0, 4.0):
        g, _ = _session_grad(model, Distillation(T, 1.0), student, X, pack(y, soften(t, T)))
        norms[T] = np.linalg.norm(g["weight"])
    assert norms[4.0] / norms[1.0] == pytest.approx(1.0, abs=0.02)  # without T²: 1/16


@pytest.mark.parametrize("K", [2, 3])
def test_a_teacher_equal_to_the_student_gives_no_soft_gradient(K):
    X, y = _sites(K)[0].X, _sites(K)[0].y
    model, params = _model(K), _params(K, 4, 6)
    t = Teacher(model, params, "t").scores(X)
    g, _ = _session_grad(model, Distillation(2.0, 1.0), params, X, pack(y, soften(t, 2.0)))
    assert np.abs(g["weight"]).max() < 1e-15 and np.abs(g["bias"]).max() < 1e-15
    hard, _ = _session_grad(model, Distillation(2.0, 0.5), params, X, pack(y, soften(t, 2.0)))
    plain, _ = model.gradient(params, X, y)
    np.testing.assert_allclose(hard["weight"], 0.5 * plain["weight"], rtol=1e-12, atol=1e-15)  # only the hard half


# --------------------------------------------------------------------------- --teacher, end to end and refusals

def _table(tmp_path, name="t.csv", columns=("x1", "x2"), K=2):
    rng = np.random.default_rng(0)
    n = 40
    df = pd.DataFrame({c: rng.normal(size=3 * n) for c in columns})
    df.insert(0, "site", np.repeat(["A", "B", "C"], n))
    score = df[columns[0]] + 0.3 * rng.normal(size=3 * n)
    df["label"] = (score > 0).astype(int) if K == 2 else np.digitize(score, [-0.5, 0.5])
    path = tmp_path / name
    df.to_csv(path, index=False)
    return path


def _invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def _cli(path, out, *extra):
    return _invoke("run", "--data", path, "--site-column", "site", "--label-column", "label", "--rounds", 3,
                   "--local-steps", 2, "--repeats", 1, "--out", out, *extra)


def _teacher(tmp_path, path):
    code, text = _cli(path, tmp_path / "teach", "--methods", "mix", "--save-model")
    assert code == 0, text
    return tmp_path / "teach" / "models" / "Mix.npz"


def _one_line_error(code, text, *needles):
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), text
    for needle in needles:
        assert needle in lines[0], text


def test_teacher_flag_runs_and_weight_zero_matches_fedavg(tmp_path):
    path = _table(tmp_path)
    teacher = _teacher(tmp_path, path)
    code, text = _cli(path, tmp_path / "s", "--methods", "fedavg,distill", "--teacher", teacher,
                      "--method-option", "distill.weight=0")
    assert code == 0, text
    rows = pd.read_csv(tmp_path / "s" / "results.csv")
    got = rows.pivot_table(index="test_site", columns="setting", values=["acc_mean", "auc_mean", "f1_mean"])
    np.testing.assert_array_equal(got.xs("Distill", axis=1, level=1), got.xs("FedAvg", axis=1, level=1))


def test_refusals_name_the_file_and_what_differs(tmp_path):
    path = _table(tmp_path)
    teacher = _teacher(tmp_path, path)
    other = _table(tmp_path, "o.csv", columns=("x1", "x3"))
    _one_line_error(*_cli(other, tmp_path / "a", "--methods", "distill", "--teacher", teacher), str(teacher), "features", "'x2'")
    three = _table(tmp_path, "k.csv", K=3)
    _one_line_error(*_cli(three, tmp_path / "b", "--methods", "distill", "--teacher", teacher), str(teacher), "task")
    _one_line_error(*_cli(path, tmp_path / "c", "--methods", "distill"), "distill", "--teacher")
    _one_line_error(*_cli(path, tmp_path / "d", "--methods", "distill", "--teacher", tmp_path / "none.npz"), "none.npz")
    _one_line_error(*_cli(path, tmp_path / "e", "--methods", "distill", "--teacher", teacher, "--loss", "gce"), "--loss ce")
    state = tmp_path / "w.pt"
    state.write_bytes(b"PK\x03\x04")  # not a torch file: one error naming it, not torch's traceback
    with pytest.raises(ConfigError, match="w.pt is not a torch state dict"):
        load_teacher(state)
    _one_line_error(*_cli(path, tmp_path / "f", "--methods", "distill", "--teacher", state), str(state), "torch state dict")
    _one_line_error(*_cli(path, tmp_path / "g", "--methods", "fedavg", "--teacher", teacher), "--teacher", "distill")
