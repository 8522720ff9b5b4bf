"""Gradient-inversion audit (experiments/inversion.py, `medfed audit leakage`): iDLG labels and
Geiping et al.'s reconstruction of one site's upload, on tiny 8x8 mni-phantom images."""

import io
import json

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from medfed.cli.app import app
from medfed.cli.audit import render_leakage_audit
from medfed.cli.common import EXIT_AUDIT_FAILED, EXIT_BAD_INPUT
from medfed.client.local import LocalData, LocalTraining, local_sgd_update
from medfed.errors import ConfigError
from medfed.experiments.config import build_config
from medfed.experiments.inversion import (
    AttackSpec,
    Setting,
    Simulator,
    idlg_label,
    match_and_score,
    parse_factor,
    run_leakage_audit,
    sweep,
)
from medfed.models.registry import make_model
from medfed.rng import KeyedRng

pytest.importorskip("torch")
pytest.importorskip("skimage")

TINY = {"size": 8, "n_per_site": 12, "n_sites": 3}
# a CNN without BatchNorm trained by SGD: the case this attack inverts (BatchNorm at one image
# and Adam's sign-like step defeat it, see the module docstring)
CNN = {"norm": "none", "optimizer": "sgd", "channels": "4,8"}
BASE = Setting(1, 1, 0.0, "none", False)
STEPS = 200


def _config(model="cnn2d", options=CNN, seed=0):
    return build_config({"data": {"dataset": "mni-phantom", "options": TINY}, "model": model,
                         "model_options": dict(options), "methods": ["fedavg"], "training": {"lr": 0.1},
                         "seed": seed}, "test", lambda k: None)


@pytest.fixture(scope="module")
def audit():
    """One audit over the settings the tests compare (about 5 s on one core)."""
    settings = [BASE, Setting(1, 1, 1.0, "none", False), Setting(1, 1, 0.0, "none", True),
                Setting(1, 1, 0.0, "fedper", False)]
    return run_leakage_audit(_config(), AttackSpec(steps=STEPS), settings, "test", rounds=1)


def _record(doc, setting):
    return next(r for r in doc["records"] if Setting(**{k: r[k] for k in vars(setting)}) == setting)


# --------------------------------------------------------------------------- the attack's pieces


def test_simulated_local_steps_reproduce_the_sites_upload():
    """The attacker's differentiable copy of local training, at the true images, is the upload
    medfed's own site rule sends (SGD, L2, several steps, BatchNorm in train mode)."""
    import torch

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(3, 1, 8, 8)).astype(np.float32), np.array([1.0, 0.0, 1.0])
    model = make_model("cnn2d", X.shape[1:], channels="4,8", optimizer="sgd", recalibrate=False)
    start = model.init_params(X.shape[1:], KeyedRng(0, (0,)))
    data = LocalData("a", X, y)
    warm, _ = local_sgd_update(start, data, LocalTraining(model, 0.1, 3), None, KeyedRng(0, (2,)))
    start = {k: v + warm.payload[k] for k, v in start.items()}  # a non-zero head, so the body moves too
    upload, _ = local_sgd_update(start, data, LocalTraining(model, 0.1, 3, 3, 1e-3), None, KeyedRng(0, (1,)))
    visible = [k for k in upload.payload if "running" not in k]
    sim = Simulator.of(model, X.shape[1:], start, visible, 0.1, 1e-3, 3)
    simulated = sim.update(torch.as_tensor(X), torch.as_tensor(y, dtype=torch.float32))
    for name, got in zip(sim.visible, simulated):
        want = upload.payload[name].ravel()
        np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-4, atol=1e-6 * np.abs(want).max(), err_msg=name)


@pytest.mark.parametrize("optimizer,steps", [("sgd", 1), ("sgd", 4), ("adam", 3)])
def test_idlg_reads_every_label_from_the_head_bias_at_one_image(optimizer, steps):
    """The one-logit carry-over of iDLG: the head bias' update is positive exactly for y = 1,
    whatever the image, the number of local steps and the optimizer."""
    rng = np.random.default_rng(1)
    model = make_model("cnn2d", (1, 8, 8), channels="4", optimizer=optimizer, norm="none")
    params = model.init_params((1, 8, 8), KeyedRng(0, (0,)))
    params["head.bias"] = np.array([rng.normal()])  # a model leaning either way
    found = []
    for i in range(12):
        X, y = rng.normal(size=(1, 1, 8, 8)), np.array([float(i % 2)])
        upload, _ = local_sgd_update(params, LocalData("a", X, y), LocalTraining(model, 0.05, steps, 1, 1e-3),
                                     None, KeyedRng(0, (i,)))
        found.append(idlg_label(float(upload.payload["head.bias"][0])) == y[0])
    assert np.mean(found) == 1.0


def test_images_are_matched_to_their_reconstructions_whatever_the_order():
    rng = np.random.default_rng(2)
    originals = rng.uniform(0, 1, size=(4, 1, 8, 8))
    order = np.array([2, 0, 3, 1])
    recs = originals[order] + rng.normal(0, 0.01, size=originals.shape)
    scores = match_and_score(originals, recs, 0.0, 1.0)
    assert scores.matched == [int(np.where(order == i)[0][0]) for i in range(4)]
    assert min(scores.psnr) > 30 and min(scores.ssim) > 0.9
    # five reconstructions for four originals (secure aggregation): each original gets its own
    extra = np.concatenate([rng.uniform(0, 1, size=(1, 1, 8, 8)), recs])
    assert match_and_score(originals, extra, 0.0, 1.0).matched == [m + 1 for m in scores.matched]


def test_the_default_sweep_varies_one_factor_at_a_time_around_the_base():
    values = {f: parse_factor("--x", None, f) for f in ("batch_size", "local_steps", "noise_multiplier", "sharing",
                                                         "secure_aggregation")}
    settings, how = sweep(values)
    assert settings[0] == BASE and len(settings) == len(set(settings)) == 1 + 2 + 1 + 2 + 1 + 1
    assert all(sum(getattr(s, f) != getattr(BASE, f) for f in vars(BASE)) == 1 for s in settings[1:])
    assert "one factor at a time" in how
    assert parse_factor("--secure-aggregation", ["on"], "secure_aggregation") == (True,)
    with pytest.raises(ConfigError, match="--sharing takes comma-separated none or fedper, got 'fedbn'"):
        parse_factor("--sharing", ["none", "fedbn"], "sharing")


# --------------------------------------------------------------------------- what the attack finds


def test_one_image_is_rebuilt_far_better_than_the_random_start(audit):
    base = _record(audit, BASE)
    assert base["label_rule"] == "idlg" and base["label_accuracy"] == 1.0
    assert base["psnr"] > base["baseline_psnr"] + 4  # measured: 14.3 dB against 8.6 dB
    assert base["ssim"] > 0.5 and base["baseline_ssim"] < 0.2  # measured: 0.79 against 0.01
    # the structure is the upload's, not the anatomy every image shares (the other sites'
    # mean image scores a higher PSNR, 17.3 dB, but an SSIM of 0.25)
    assert base["ssim"] > base["prior_ssim"] + 0.3
    assert set(base) >= {"batch_size", "local_steps", "noise_multiplier", "psnr", "ssim", "images"}


def test_dp_noise_and_secure_aggregation_lower_the_psnr(audit):
    base = _record(audit, BASE)
    noised = _record(audit, Setting(1, 1, 1.0, "none", False))
    summed = _record(audit, Setting(1, 1, 0.0, "none", True))
    assert noised["psnr"] < base["psnr"] - 4
    assert summed["psnr"] < base["psnr"]
    assert summed["sites_summed"] == ["site-1", "site-2", "site-3"] and summed["label_rule"] == "optimized"


def test_fedper_hides_the_head_so_labels_are_not_read_from_it(audit):
    fedper = _record(audit, Setting(1, 1, 0.0, "fedper", False))
    assert not any(k.startswith("head.") for k in fedper["visible_parameters"])
    assert fedper["label_rule"] == "optimized"


def test_the_same_seed_gives_the_same_numbers(audit):
    again = run_leakage_audit(_config(), AttackSpec(steps=STEPS), [BASE], "test", rounds=1)
    assert again["records"][0]["images"] == _record(audit, BASE)["images"]


def test_bad_settings_are_refused_before_training():
    with pytest.raises(ConfigError, match="numpy model"):
        run_leakage_audit(_config("logistic", {}), AttackSpec(steps=1), [BASE], "t")
    with pytest.raises(ConfigError, match="--batch-sizes 20: site 'site-1' has 10 training rows; give batch sizes up to 10"):
        run_leakage_audit(_config(), AttackSpec(steps=1), [Setting(20, 1, 0.0, "none", False)], "t")
    with pytest.raises(ConfigError, match="--site 'nowhere' is not a site"):
        run_leakage_audit(_config(), AttackSpec(steps=1, site="nowhere"), [BASE], "t")
    with pytest.raises(ConfigError, match="norm=batch needs at least 2 images"):
        run_leakage_audit(_config("mlp", {"norm": "batch"}), AttackSpec(steps=1), [BASE], "t")


# --------------------------------------------------------------------------- the command


TINY_FLAGS = ["--dataset", "mni-phantom", "--dataset-option", "size=8", "--dataset-option", "n_per_site=12",
              "--dataset-option", "n_sites=2", "--model-option", "channels=4", "--model-option", "norm=none",
              "--model-option", "optimizer=sgd", "--lr", "0.1", "--attack-steps", "20", "--local-steps", "1",
              "--noise", "0", "--sharing", "none", "--secure-aggregation", "off"]


def test_the_command_writes_its_files_and_fails_a_preflight_check_above_the_psnr(tmp_path):
    out = tmp_path / "leak"
    result = CliRunner().invoke(app, ["audit", "leakage", *TINY_FLAGS, "--batch-sizes", "1,2", "--out", str(out),
                                      "--fail-if-psnr-above", "0"])
    assert result.exit_code == EXIT_AUDIT_FAILED, result.output
    assert "gradient inversion PSNR" in result.output and "> 0 at batch" in result.output
    doc = json.loads((out / "leakage.json").read_text())
    assert [r["batch_size"] for r in doc["records"]] == [1, 2]
    assert (out / "leakage.png").read_bytes()[:4] == b"\x89PNG"
    assert "| Batch |" in (out / "leakage.md").read_text()
    assert (out / "leakage.csv").read_text().count("\n") == 1 + 1 + 2  # header, one image, two images
    passed = CliRunner().invoke(app, ["audit", "leakage", *TINY_FLAGS, "--batch-sizes", "1", "--out",
                                      str(tmp_path / "ok"), "--fail-if-psnr-above", "100"])
    assert passed.exit_code == 0, passed.output
    # the table fits an 80-column terminal, each setting on one line
    buf = io.StringIO()
    render_leakage_audit(doc, Console(file=buf, width=80))
    lines = buf.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    assert sum(line.split()[:2] == ["1", "1"] for line in lines) == 1


@pytest.mark.parametrize("flags,message", [
    (["--model", "logistic"], "numpy model"),
    (["--sharing", "secret"], "--sharing takes comma-separated none or fedper"),
    (["--batch-sizes", "99"], "--batch-sizes 99: site 'site-1' has"),
    (["--secure-aggregation", "maybe"], "--secure-aggregation takes comma-separated off or on"),
])
def test_bad_flags_are_one_line_and_write_nothing(tmp_path, flags, message):
    out = tmp_path / "leak"
    result = CliRunner().invoke(app, ["audit", "leakage", *TINY_FLAGS, *flags, "--out", str(out)])
    assert result.exit_code == EXIT_BAD_INPUT
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()
