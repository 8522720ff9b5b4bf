"""Without the imaging extra, an image run is one line naming the missing package and the
install command (torch from PyTorch's CPU wheel index, then medfed[imaging]), never a traceback.

Each test makes one import fail with ``sys.modules[name] = None``, which is what Python does
for a package that is not installed, even when the package was imported earlier."""

from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

from medfed.cli.app import app
from medfed.errors import ConfigError, DataError

INSTALL = 'pip install torch --index-url https://download.pytorch.org/whl/cpu && pip install "medfed[imaging]"'


@pytest.mark.parametrize("model", ["torch_logistic", "mlp", "cnn2d", "cnn3d"])
def test_torch_model_without_torch(monkeypatch, model):
    from medfed.models.registry import make_model

    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ConfigError) as info:
        make_model(model)
    assert str(info.value) == f"model {model!r} needs torch (the imaging extra): {INSTALL}"


@pytest.mark.parametrize(
    "module, reader, name, needle",
    [
        ("nibabel", "read_nifti", "scan.nii.gz", "reading NIfTI files needs nibabel"),
        ("pydicom", "read_dicom_file", "slice.dcm", "reading DICOM files needs pydicom"),
        ("PIL", "read_planar", "image.png", "reading 2-D image files needs Pillow"),
    ],
)
def test_image_readers_without_their_library(tmp_path, monkeypatch, module, reader, name, needle):
    import medfed.data.images as images

    path = tmp_path / name
    path.write_bytes(b"\0" * 256)
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(DataError) as info:
        getattr(images, reader)(path)
    assert str(info.value) == f"{needle} (the imaging extra): {INSTALL}"


def test_dicom_series_without_nibabel(tmp_path, monkeypatch):
    from medfed.data.extras import import_extra

    monkeypatch.setitem(sys.modules, "nibabel", None)
    with pytest.raises(DataError, match="assembling a DICOM series"):
        import_extra("nibabel", "assembling a DICOM series into a volume")


def test_mni_phantom_without_nibabel(monkeypatch):
    from medfed.data.datasets import mni_phantom

    monkeypatch.setitem(sys.modules, "nibabel", None)
    with pytest.raises(DataError, match="the mni-phantom data set needs nibabel"):
        mni_phantom._read_templates.__wrapped__()


def test_manifest_without_pillow_is_not_a_skipped_file(tmp_path, monkeypatch):
    """--skip-bad counts bad files; a missing library is not a bad file but one error."""
    (tmp_path / "a.png").write_bytes(b"\0")
    (tmp_path / "m.csv").write_text("path,label,site\n" + "a.png,0,s\na.png,1,s\n" * 6)
    monkeypatch.setitem(sys.modules, "PIL", None)
    result = CliRunner().invoke(app, ["run", "--manifest", str(tmp_path / "m.csv"), "--skip-bad",
                                      "--model", "cnn2d", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert "needs Pillow" in result.output and "download.pytorch.org/whl/cpu" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()


def test_image_run_without_torch_is_one_line_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    result = CliRunner().invoke(app, [
        "run", "--dataset", "mni-phantom", "--dataset-option", "n_per_site=10", "--dataset-option", "size=8",
        "--model", "cnn2d", "--methods", "fedavg", "--repeats", "1", "--out", str(tmp_path / "o"),
    ])
    assert result.exit_code == 2, result.output
    assert f"model 'cnn2d' needs torch (the imaging extra): {INSTALL}" in " ".join(result.output.split())
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()
