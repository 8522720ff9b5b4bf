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


def test_a_nifti_manifest_runs_with_a_3d_cnn(tmp_path):
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(1)
    rows = ["path,label,site,split"]
    for k in range(2):
        for i in range(12):
            label = i % 2
            vol = rng.normal(50 + 20 * k, 5, size=(8, 8, 8)).astype(np.float32)
            vol[2:5, 2:5, 2:5] += 25 * label
            nib.save(nib.Nifti1Image(vol, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / f"v{k}_{i}.nii.gz")
            rows.append(f"v{k}_{i}.nii.gz,{label},site-{k},{'test' if i >= 8 else 'train'}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    result = runner.invoke(app, ["run", "--manifest", str(tmp_path / "m.csv"), "--split-column", "split",
                                 "--model", "cnn3d", "--model-option", "channels=2,4", "--methods", "mix,fedavg",
                                 "--rounds", "2", "--local-steps", "2", "--repeats", "1", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    assert doc["sample_shape"] == [1, 8, 8, 8] and doc["split"] == "predefined"
    assert doc["data_info"]["sites"]["site-0"]["voxel_sizes"][0]["value"] == [2.0, 2.0, 2.0]
