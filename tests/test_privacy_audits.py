"""Membership-inference and privacy-utility audits (experiments/leakage.py, `medfed audit membership|privacy`)."""

import io
import json
import warnings

import numpy as np
import pytest
from rich.console import Console
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from medfed.cli.app import app
from medfed.cli.audit import render_privacy_audit
from medfed.cli.common import EXIT_AUDIT_FAILED
from medfed.data.federation import Federation, Site
from medfed.errors import ConfigError
from medfed.experiments.config import build_config
from medfed.experiments.harness import run_experiment
from medfed.experiments.leakage import (
    membership_auc,
    row_losses,
    run_privacy_audit,
    worst_membership,
)
from medfed.models import LogisticRegression

HEART = ["--dataset", "heart-disease", "--rounds", "5", "--local-steps", "5", "--repeats", "1"]


def _config(methods=("fedavg",), repeats=1, **training):
    return build_config({"data": {"dataset": "heart-disease"}, "methods": list(methods), "repeats": repeats,
                         "training": training}, "test", lambda k: None)


# --------------------------------------------------------------------------- the attack's arithmetic


def test_row_losses_average_to_the_models_loss():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(50, 3)), (rng.random(50) > 0.5).astype(float)
    model = LogisticRegression()
    params = {"weight": rng.normal(size=3), "bias": np.array([0.3])}
    np.testing.assert_allclose(row_losses(model.predict_proba(params, X), y).mean(), model.loss(params, X, y),
                               rtol=1e-12)


def test_membership_auc_is_one_for_a_memorizing_model_and_one_half_for_equal_losses():
    rng = np.random.default_rng(1)
    # a model that memorized its rows: near-zero loss on members, the usual loss elsewhere
    assert membership_auc(rng.uniform(0, 1e-3, 200), rng.uniform(0.1, 2.0, 300)) == 1.0
    same = membership_auc(rng.exponential(size=4000), rng.exponential(size=4000))
    assert abs(same - 0.5) < 0.02  # one draw: std of the AUC is about 0.0065 here
    # ties included (rounded losses), against scikit-learn on "-loss" as the member score
    members, others = np.round(rng.exponential(0.8, 120), 1), np.round(rng.exponential(1.0, 90), 1)
    truth = np.r_[np.ones(120), np.zeros(90)]
    assert membership_auc(members, others) == pytest.approx(roc_auc_score(truth, -np.r_[members, others]), abs=1e-12)
    assert membership_auc(members, np.array([])) is None


# --------------------------------------------------------------------------- audits on data


def _random_labels(seed: int, n: int = 100, d: int = 300) -> Federation:
    """Three sites whose labels are coin flips: all a model can learn is which rows it saw."""
    rng = np.random.default_rng(seed)
    sites = tuple(Site(f"s{k}", rng.normal(size=(n, d)), rng.integers(0, 2, n)) for k in range(3))
    return Federation("coin flips", sites, tuple(f"f{j}" for j in range(d)))


def test_dp_noise_stops_a_model_that_memorizes_its_sites():
    # 300 features for 240 training rows and no L2: without DP the model fits its training
    # rows' random labels (low member loss), so the attack wins; heavy noise leaves it at chance.
    # (On heart-disease, 13 features for ~700 rows, the attack is near chance with or without
    # DP: 0.518 +- 0.014 without and 0.495 +- 0.008 at z = 20 over 4 sites x 3 repeats, seed 0.)
    config = _config(repeats=3, rounds=30, local_steps=10, lr=0.5, l2=0.0)
    doc = run_privacy_audit(config, "membership", [0, 50], 0.1, federation=_random_labels(seed=2))
    auc = {z: np.mean([v for r in doc["rows"] if r["noise"] == z for v in r["attack_auc"]["values"]]) for z in (0, 50)}
    assert auc[0] > 0.7  # measured 0.76-0.82 over four data seeds
    assert abs(auc[50] - 0.5) < 0.1  # measured 0.49-0.52
    assert worst_membership(doc)["noise"] == 0


def test_personalizing_methods_are_attacked_on_their_personal_models_too():
    doc = run_privacy_audit(_config(("fedavg", "ditto"), rounds=3, local_steps=3), "membership", [0], None)
    kinds = {(r["method"], r["model"]) for r in doc["rows"]}
    assert kinds == {("fedavg", "global"), ("ditto", "global"), ("ditto", "personal")}
    assert len(doc["rows"]) == 3 * 4  # four sites
    assert all(r["epsilon"] is None for r in doc["rows"])


def test_privacy_audit_epsilon_falls_with_noise_and_noise_zero_is_the_plain_run():
    config = _config(rounds=5, local_steps=5)
    doc = run_privacy_audit(config, "privacy", [0, 0.5, 1, 2], 1.0)
    sites = [s["name"] for s in doc["sites"]]
    for site in sites:
        eps = [next(r["epsilon"] for r in doc["rows"] if r["site"] == site and r["noise"] == z) for z in (0.5, 1, 2)]
        assert eps[0] > eps[1] > eps[2] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = run_experiment(config, _federation())
    for site in sites:
        cell = next(c for c in plain.cells if c.method == "fedavg" and c.test_site == site)
        row = next(r for r in doc["rows"] if r["site"] == site and r["noise"] == 0)
        assert row["epsilon"] is None
        for m in ("acc", "auc"):
            assert row[m]["values"] == [x.value for x in cell.metrics[m]]


def _federation():
    from medfed.data.datasets import load_dataset

    return load_dataset("heart-disease")


@pytest.mark.parametrize("noises,clip,methods,needle", [
    ([0, 1], None, ("fedavg",), "--clip"),
    ([-1], 1.0, ("fedavg",), "--noise"),
    ([1, 1], 1.0, ("fedavg",), "twice"),
    ([0, 1], 1.0, ("mix",), "centralized"),
    ([0, 1], 1.0, ("median",), "median"),
])
def test_bad_audits_are_refused_before_training(noises, clip, methods, needle):
    with pytest.raises(ConfigError, match=needle):
        run_privacy_audit(_config(methods, rounds=2), "privacy", noises, clip)


# --------------------------------------------------------------------------- command line


@pytest.mark.parametrize("threshold,status", [("0.0", EXIT_AUDIT_FAILED), ("1.0", 0)])
def test_fail_if_membership_auc_above_fails_after_writing_the_report(tmp_path, threshold, status):
    out = tmp_path / "m"
    result = CliRunner().invoke(app, ["audit", "membership", *HEART, "--noise", "0,1", "--clip", "1",
                                      "--out", str(out), "--fail-if-membership-auc-above", threshold])
    assert result.exit_code == status, result.output
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == {"membership.json", "membership.csv", "membership.md"}
    doc = json.loads((out / "membership.json").read_text())
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    if status:
        worst = worst_membership(doc)
        assert len(errors) == 1 and f"> {threshold[0]}" in errors[0] and repr(worst["site"]) in errors[0]
        assert f"noise {worst['noise']:g}" in errors[0] and "Traceback" not in result.output
    else:
        assert not errors and "Attack AUC" in result.output


def test_cli_privacy_writes_its_files_and_a_table_that_fits_80_columns(tmp_path):
    out = tmp_path / "p"
    result = CliRunner().invoke(app, ["audit", "privacy", *HEART, "--noise", "0,1", "--clip", "1", "--out", str(out)],
)
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == {"privacy.json", "privacy.csv", "privacy.md", "privacy.png"}
    assert (out / "privacy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (out / "privacy.csv").read_text().splitlines()
    assert lines[0].startswith("method,model,noise,epsilon,site") and len(lines) == 1 + 2 * 4
    assert "| FedAvg | global | 0 | inf |" in (out / "privacy.md").read_text()
    assert "Test AUC" in result.output
    screen = io.StringIO()
    render_privacy_audit(json.loads((out / "privacy.json").read_text()), Console(file=screen, width=80))
    assert "FedAvg" in screen.getvalue() and max(map(len, screen.getvalue().splitlines())) <= 80


def test_cli_noise_without_clip_is_one_line_and_writes_nothing(tmp_path):
    result = CliRunner().invoke(app, ["audit", "membership", *HEART, "--noise", "0,2", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--clip" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()
