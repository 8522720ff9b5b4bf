"""Images through the §6 harness: a manifest of PNG files, torch models, FedBN's personal rows."""

import json

import numpy as np
import pytest

pytest.importorskip("torch")
PIL = pytest.importorskip("PIL.Image")

from typer.testing import CliRunner

from medfed.cli.app import app
from medfed.experiments.config import NETWORK_TRAINING_DEFAULTS, build_config

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _png_manifest(folder, n_per_site=(16, 14), size=12, seed=0):
    """Two sites of 8-bit grayscale PNGs; positives carry a bright square, site 1 is darker."""
    rng = np.random.default_rng(seed)
    rows = ["path,label,site"]
    for k, n in enumerate(n_per_site):
        for i in range(n):
            label = i % 2
            img = rng.normal(100 - 30 * k, 10, size=(size, size))
            if label:
                img[3:7, 3:7] += 60
            name = f"s{k}_{i}.png"
            PIL.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L").save(folder / name)
            rows.append(f"{name},{label},hospital-{k}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder / "manifest.csv"


def test_a_png_manifest_runs_with_a_cnn_and_fedbn_reports_personal_rows_only(tmp_path):
    manifest = _png_manifest(tmp_path)
    out = tmp_path / "res"
    result = runner.invoke(app, ["run", "--manifest", str(manifest), "--model", "cnn2d", "--model-option",
                                 "channels=4,8", "--methods", "single,fedavg,fedbn", "--rounds", "2",
                                 "--local-steps", "2", "--repeats", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "results.json").read_text())
    assert doc["sample_shape"] == [1, 12, 12] and doc["model"]["name"] == "cnn2d"
    rows = {(r["setting"], r["model"], r["test_site"]) for r in doc["results"]}
    for site in ("hospital-0", "hospital-1"):
        assert ("FedAvg", "global", site) in rows and ("FedBN", "personal", site) in rows
        assert ("FedBN", "global", site) not in rows  # the shared part alone is not a model
    assert doc["config"]["training"]["batch_size"] == NETWORK_TRAINING_DEFAULTS["batch_size"]
    assert "FedBN · personal" in result.output


def test_network_models_get_network_training_defaults_unless_set():
    config = build_config({"data": {"dataset": "adni-like"}, "model": "mlp", "training": {"lr": 0.3}})
    assert config.training.lr == 0.3 and config.training.batch_size == NETWORK_TRAINING_DEFAULTS["batch_size"]
    assert build_config({"data": {"dataset": "adni-like"}}).training.batch_size is None


def test_numpy_logistic_on_images_says_which_model_to_choose(tmp_path):
    manifest = _png_manifest(tmp_path)
    result = runner.invoke(app, ["run", "--manifest", str(manifest), "--methods", "fedavg", "--repeats", "1",
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "choose one of torch_logistic, mlp, cnn2d" in result.output
    assert not (tmp_path / "o").exists()


def test_skipped_files_are_counted_on_screen_and_in_the_document(tmp_path):
    manifest = _png_manifest(tmp_path, n_per_site=(16, 16))
    (tmp_path / "s0_3.png").write_bytes(b"not a png")
    result = runner.invoke(app, ["run", "--manifest", str(manifest), "--skip-bad", "--model", "torch_logistic",
                                 "--methods", "fedavg", "--rounds", "1", "--local-steps", "1", "--repeats", "1",
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "1 bad file(s) skipped" in result.output and "s0_3.png" in result.output
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    assert doc["data_info"]["n_skipped"] == 1
