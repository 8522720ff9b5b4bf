"""`medfed predict --manifest` (issue 11): an image model saved by `medfed run --save-model` scores
new images read as the run read its own, giving the run's test-image predictions bit for bit; a
segmentation model writes its masks as files (PNG for PNG inputs, NIfTI with the image's own affine
and axis order for NIfTI inputs) and, against true masks, per-image Dice and IoU."""

import csv
import json

import numpy as np
import pytest
from image_support import png_classification
from typer.testing import CliRunner

import medfed.experiments.harness as harness
from medfed.cli.app import app
from medfed.experiments.config import build_config
from medfed.experiments.harness import load_federation, run_experiment
from medfed.experiments.report import report_files, write_atomically
from medfed.experiments.results import results_document

runner = CliRunner()


def invoke(args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def rows_of(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def run_and_write(values, out):
    config = build_config({"save_model": True, "repeats": 1, **values})
    run = run_experiment(config, load_federation(config.data))
    write_atomically(out, report_files(results_document(run), run))
    return config, run


def test_cell(run, setting, site):
    return next(c for c in run.cells if c.setting == setting and c.test_site == site and c.model == "global"
                and c.evaluation == "split")


test_cell.__test__ = False  # a helper, not a test


def test_manifest(config, manifest, i, path, columns=("path",)):
    """Site i's test rows of repeat 1 from the run's manifest, as a scoring manifest of `columns`."""
    fed = load_federation(config.data)
    test = ~harness.training_rows(fed.sites[i], i, config, 0)
    with open(manifest, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["site"] == fed.site_names[i]]
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        writer.writerows([r[c] for c in columns] for r, t in zip(rows, test) if t)
    return fed.sites[i].y[test]


test_manifest.__test__ = False


def test_a_cnn_scores_a_manifest_as_the_run_scored_its_test_images(tmp_path, torch_one_thread):
    """cnn2d with BatchNorm, FedAvg: hospital-1's test PNGs scored by predict equal the run's test
    probabilities bit for bit (per-channel standardization, same reader); row, path, score, predicted."""
    pytest.importorskip("torch")
    pytest.importorskip("PIL")
    manifest = png_classification(tmp_path)
    out = tmp_path / "out"
    config, run = run_and_write({"data": {"manifest": str(manifest)}, "model": "cnn2d",
                                 "model_options": {"channels": [2, 4]}, "methods": ["fedavg"],
                                 "training": {"rounds": 2, "local_steps": 2}}, out)
    new = tmp_path / "new" / "scans.csv"
    new.parent.mkdir()
    y = test_manifest(config, manifest, 1, new)
    # the scoring manifest lives elsewhere: its paths resolve against its own folder
    new.write_text(new.read_text().replace("s1_", str(tmp_path / "s1_")))
    code, text = invoke(["predict", "--model", out / "models" / "FedAvg.npz", "--manifest", new,
                         "--out", tmp_path / "p.csv"])
    assert code == 0, text
    got = rows_of(tmp_path / "p.csv")
    assert list(got[0]) == ["row", "path", "score", "predicted"] and len(got) == len(y)
    y_test, expected = test_cell(run, "FedAvg", "hospital-1").scores[0]
    np.testing.assert_array_equal(y_test, y)
    np.testing.assert_array_equal([float(r["score"]) for r in got], expected)
    assert [int(r["predicted"]) for r in got] == (expected >= 0.5).astype(int).tolist()
    assert got[0]["path"].startswith(str(tmp_path / "s1_")) and f"scored {len(y)} image(s)" in text
    # a table model's flags or a table given to an image model: one line each
    for args, needle in ((["--data", manifest], "--manifest FILE"),
                         (["--manifest", new, "--data", manifest], "one of them"),
                         (["--manifest", new, "--mask-column", "path"], "segmentation model's predictions only"),
                         (["--manifest", new, "--label-column", "label"], "applies to a table")):
        code, text = invoke(["predict", "--model", out / "models" / "FedAvg.npz", *args, "--out", tmp_path / "x.csv"])
        assert code == 2 and text.count("\n") == 1 and needle in text, text
    # an image on another grid than the model's: the row and the file, before anything is written
    Image = pytest.importorskip("PIL.Image")
    Image.fromarray(np.zeros((12, 10), np.uint8)).save(tmp_path / "big.png")
    (tmp_path / "big.csv").write_text(f"path\n{tmp_path / 's1_0.png'}\nbig.png\n")
    code, text = invoke(["predict", "--model", out / "models" / "FedAvg.npz", "--manifest", tmp_path / "big.csv",
                         "--out", tmp_path / "x.csv"])
    assert code == 2 and "data row 2" in text and "big.png" in text and "1×12×10" in text, text
    assert not (tmp_path / "x.csv").exists()


def _png_segmentation(tmp_path):
    """Tiny 16×16 PNG images whose masks hold 0 and 255, two sites of 10."""
    from PIL import Image

    rng = np.random.default_rng(1)
    rows = ["path,mask,site"]
    for s in "AB":
        for i in range(10):
            mask = np.zeros((16, 16), np.uint8)
            mask[2:8, 2 + i % 4:9] = 255
            img = (rng.integers(0, 60, (16, 16)) + 90 * (mask > 0)).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / f"{s}{i}.png")
            Image.fromarray(mask).save(tmp_path / f"{s}{i}_mask.png")
            rows.append(f"{s}{i}.png,{s}{i}_mask.png,{s}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "m.csv"


def test_a_unet_writes_png_masks_equal_to_the_runs_argmax_and_per_image_dice(tmp_path, torch_one_thread):
    """unet2d: site B's test PNGs give PNG masks (stored values 0/255) equal to the run's per-pixel
    argmax, voxel counts per class, and per-image Dice/IoU whose mean is the run's site Dice/IoU."""
    pytest.importorskip("monai")
    from PIL import Image

    manifest = _png_segmentation(tmp_path)
    out = tmp_path / "out"
    config, run = run_and_write({"data": {"manifest": str(manifest), "task": "segmentation"}, "model": "unet2d",
                                 "model_options": {"channels": [4, 8], "norm": "batch"}, "methods": ["fedavg"],
                                 "training": {"rounds": 2, "local_steps": 2, "lr": 0.1}}, out)
    test_manifest(config, manifest, 1, tmp_path / "new.csv", columns=("path", "mask"))
    code, text = invoke(["predict", "--model", out / "models" / "FedAvg.npz", "--manifest", tmp_path / "new.csv",
                         "--mask-column", "mask", "--out", tmp_path / "seg.csv"])
    assert code == 0, text
    got = rows_of(tmp_path / "seg.csv")
    assert list(got[0]) == ["row", "path", "mask", "voxels:background", "voxels:255", "dice", "iou", "hd95",
                            "dice:255", "iou:255"]
    cell = test_cell(run, "FedAvg", "B")
    _, probabilities = cell.scores[0]
    expected = np.argmax(probabilities, axis=1)
    assert all(e.any() and not e.all() for e in expected)  # masks of both classes: the check can fail
    assert len(got) == len(expected) >= 2
    for r, want in zip(got, expected):
        assert r["mask"] == f"seg_masks/{r['path'].rsplit('/', 1)[1][:-4]}_mask.png"
        mask = np.asarray(Image.open(tmp_path / r["mask"]))
        assert mask.dtype == np.uint8 and mask.shape == (16, 16)
        np.testing.assert_array_equal(mask, 255 * want)
        assert [int(r["voxels:background"]), int(r["voxels:255"])] == [int((want == 0).sum()), int((want == 1).sum())]
    dice = [float(r["dice"]) for r in got]
    assert dice == [float(r["dice:255"]) for r in got]
    np.testing.assert_allclose(np.mean(dice), cell.metrics["dice"][0].value, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.mean([float(r["iou"]) for r in got]), cell.metrics["iou"][0].value, rtol=0, atol=1e-12)
    assert "against the manifest's masks" in text and "seg_masks" in text
    # without a mask column: no metric columns; the same masks
    code, text = invoke(["predict", "--model", out / "models" / "FedAvg.npz", "--manifest", tmp_path / "new.csv",
                         "--out", tmp_path / "seg2.csv"])
    assert code == 0, text
    assert list(rows_of(tmp_path / "seg2.csv")[0])[-1] == "voxels:255"
    for a, b in zip(sorted((tmp_path / "seg_masks").iterdir()), sorted((tmp_path / "seg2_masks").iterdir())):
        assert a.read_bytes() == b.read_bytes()


def test_nifti_masks_keep_the_images_affine_and_axis_order(tmp_path, torch_one_thread):
    """unet3d on NIfTI volumes stored in LPS order: each mask file has its image's shape and affine
    (a viewer overlays them), and read back (reoriented to RAS, as images are) equals the run's argmax.
    Two images in different folders with the same name get distinct mask files."""
    pytest.importorskip("monai")
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(2)
    affine = np.array([[-1.5, 0, 0, 30.0], [0, -1.5, 0, 20.0], [0, 0, 2.0, -10.0], [0, 0, 0, 1]])
    rows = ["path,mask,site"]
    for s in "AB":
        for i in range(10):
            folder = tmp_path / f"sub-{s}{i}"
            folder.mkdir()
            mask = np.zeros((8, 8, 8), np.uint8)
            mask[1:5, 2 + i % 3:7, 2:6] = 1
            img = (rng.normal(0, 1, (8, 8, 8)) + 3 * mask).astype(np.float32)
            nib.save(nib.Nifti1Image(img, affine), folder / "t1.nii.gz")
            nib.save(nib.Nifti1Image(mask, affine), folder / "lesion.nii.gz")
            rows.append(f"sub-{s}{i}/t1.nii.gz,sub-{s}{i}/lesion.nii.gz,{s}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    config, run = run_and_write({"data": {"manifest": str(tmp_path / "m.csv"), "task": "segmentation"},
                                 "model": "unet3d", "model_options": {"channels": [2, 4], "norm": "group"},
                                 "methods": ["fedavg"], "training": {"rounds": 1, "local_steps": 1}}, out)
    test_manifest(config, tmp_path / "m.csv", 0, tmp_path / "new.csv")
    code, text = invoke(["predict", "--model", out / "models" / "FedAvg.npz", "--manifest", tmp_path / "new.csv",
                         "--out", tmp_path / "p.csv"])
    assert code == 0, text
    got = rows_of(tmp_path / "p.csv")
    _, probabilities = test_cell(run, "FedAvg", "A").scores[0]
    expected = np.argmax(probabilities, axis=1)
    # masks that a flip of the LPS axes would change: the axis order is checked, not assumed
    assert all(e.any() and not np.array_equal(e, e[::-1, ::-1]) for e in expected)
    assert [r["mask"] for r in got] == ["p_masks/t1_mask.nii.gz"] + [f"p_masks/t1-{k}_mask.nii.gz"
                                                                      for k in range(2, len(got) + 1)]
    from medfed.data.images import read_nifti

    for r, want in zip(got, expected):
        written, image = nib.load(str(tmp_path / r["mask"])), nib.load(r["path"])
        assert written.shape == image.shape and np.array_equal(written.affine, image.affine)
        assert "".join(nib.aff2axcodes(written.affine)) == "LPS"
        np.testing.assert_array_equal(read_nifti(tmp_path / r["mask"])[0][0], want)
    assert json.loads((out / "results.json").read_text())["task"] == "segmentation"
