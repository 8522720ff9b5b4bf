"""Segmentation (issue 11): U-Nets behind the parameter view, the Dice + CE loss, Dice/IoU/HD95
against MONAI, mni-phantom masks, one-line refusals and ``medfed run`` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
monai = pytest.importorskip("monai")

from typer.testing import CliRunner  # noqa: E402

from medfed.cli.app import app  # noqa: E402
from medfed.data.federation import Site  # noqa: E402
from medfed.data.tasks import strata  # noqa: E402
from medfed.errors import ConfigError, DataError  # noqa: E402
from medfed.experiments.metrics import metric_keys, segmentation_metrics  # noqa: E402
from medfed.models.registry import is_head, is_norm, is_norm_statistic, make_model  # noqa: E402
from medfed.rng import KeyedRng  # noqa: E402

SHAPE = (1, 16, 16)


def _model(norm="batch", arch="unet2d", shape=SHAPE, K=2, **opts):
    model = make_model(arch, shape, task="segmentation", n_classes=K, norm=norm, **opts)
    return model, model.init_params(shape, KeyedRng(0, ()))


@pytest.mark.parametrize("norm, n_norm, n_stats", [("batch", 16, 8), ("group", 8, 0), ("none", 0, 0)])
def test_unet_parameter_view_follows_the_naming_convention(norm, n_norm, n_stats):
    model, params = _model(norm)
    names = list(params)
    # 4 norm layers (2 down, the bottom, 1 up; the top up-conv is the head): weight+bias, BatchNorm also its statistics
    assert sum(map(is_norm, names)) == n_norm and sum(map(is_norm_statistic, names)) == n_stats
    heads = [k for k in names if is_head(k)]
    assert heads == (["head.conv.weight", "head.conv.bias"] if norm == "none" else ["head.conv.weight"])
    assert params["head.conv.weight"].shape[:2] == (16, 2)  # transposed conv (in: skip 8 + up 8, K, 3, 3)
    assert all(v.dtype == np.float64 for v in params.values())
    # the network is MONAI's: the same module list as monai.networks.nets.UNet's, renamed
    from monai.networks.nets import UNet

    ref = UNet(2, 1, 2, (8, 16, 32), (2, 2), act="relu", norm=None if norm == "none" else "batch" if norm == "batch"
               else ("group", {"num_groups": 4}), bias=norm == "none")
    assert [tuple(v.shape) for k, v in ref.state_dict().items() if "num_batches" not in k] == [v.shape for v in params.values()]
    X = np.random.default_rng(0).random((3, *SHAPE)).astype(np.float32)
    assert model.predict(params, X).shape == (3, 2, 16, 16)
    assert np.allclose(model.predict(params, X).sum(axis=1), 1.0)


def test_unet3d_and_the_grid_check():
    model, params = _model("group", "unet3d", (1, 8, 8, 8), channels="4,8")
    assert model.predict(params, np.zeros((2, 1, 8, 8, 8), np.float32)).shape == (2, 2, 8, 8, 8)
    with pytest.raises(ConfigError, match="every spatial size must be a multiple of 4"):
        make_model("unet2d", (1, 18, 18), task="segmentation", n_classes=2)
    with pytest.raises(ConfigError, match="cannot train a segmentation task; choose one of unet2d, unet3d$"):
        make_model("logistic", SHAPE, task="segmentation", n_classes=2)
    with pytest.raises(ConfigError, match="'unet2d' cannot train a binary task"):
        make_model("unet2d", SHAPE, task="binary")


def _fixed(seed=0, n=4, K=3, size=12):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), np.int64)
    masks[:, 2:6, 3:8] = 1
    masks[1:, 7:10, 6:11] = 2
    masks[0, :, :] = 0  # an image with no foreground at all
    logits = rng.normal(size=(n, K, size, size)) + 3.0 * np.eye(K)[masks].transpose(0, 3, 1, 2)
    return masks, logits


def test_dice_ce_loss_is_monais():
    from monai.losses import DiceCELoss

    from medfed.models.unet import dice_ce

    masks, logits = _fixed()
    z, y = torch.from_numpy(logits), torch.from_numpy(masks)
    ref = DiceCELoss(to_onehot_y=True, softmax=True)(z, y.unsqueeze(1))
    assert float(dice_ce(z, y, "mean")) == pytest.approx(float(ref), abs=1e-12)
    per = dice_ce(z, y, "none")
    assert per.shape == (4,) and float(per.mean()) == pytest.approx(float(ref), abs=1e-12)
    for i in range(4):  # each image's term is MONAI's loss on that image alone
        one = DiceCELoss(to_onehot_y=True, softmax=True)(z[i:i + 1], y[i:i + 1].unsqueeze(1))
        assert float(per[i]) == pytest.approx(float(one), abs=1e-12)
    model, params = _model("none")
    X = np.random.default_rng(1).random((4, *SHAPE)).astype(np.float32)
    m = (X[:, 0] > 0.6).astype(np.int64)
    zt = torch.from_numpy(model.decision(params, X))
    assert model.loss(params, X, m) == pytest.approx(float(DiceCELoss(to_onehot_y=True, softmax=True)(
        zt, torch.from_numpy(m).unsqueeze(1))), abs=1e-12)


def test_segmentation_metrics_match_monai():
    from monai.metrics import DiceMetric, MeanIoU, compute_hausdorff_distance

    masks, logits = _fixed()
    out = segmentation_metrics(masks, logits, ("background", "a", "b"))
    assert set(out) == set(metric_keys("segmentation", ("background", "a", "b")))
    assert "dice:background" not in out
    pred = torch.nn.functional.one_hot(torch.from_numpy(logits.argmax(axis=1)), 3).movedim(-1, 1)
    true = torch.nn.functional.one_hot(torch.from_numpy(masks), 3).movedim(-1, 1)
    for key, metric in (("dice", DiceMetric), ("iou", MeanIoU)):
        ref = metric(include_background=False, reduction="mean")
        ref(pred, true)
        assert out[key].value == pytest.approx(float(ref.aggregate()), abs=1e-6)  # MONAI sums in float32
        per = metric(include_background=False, reduction="mean_batch")
        per(pred, true)
        assert [out[f"{key}:a"].value, out[f"{key}:b"].value] == pytest.approx(per.aggregate().tolist(), abs=1e-6)
    hd = compute_hausdorff_distance(pred, true, include_background=False, percentile=95).numpy()
    assert out["hd95"].value == pytest.approx(float(np.nanmean(hd[1:])), abs=1e-6)  # image 0: no foreground
    assert 0 < out["dice"].value < 1 and out["hd95"].value > 0
    # nothing to score: no test image holds a foreground class
    empty = segmentation_metrics(np.zeros((2, 4, 4), np.int64), np.zeros((2, 2, 4, 4)), ("background", "a"))
    assert empty["dice"].value is None and "no test image" in empty["dice"].reason


def test_site_takes_masks_on_the_image_grid_and_strata_keep_lesion_images_in_proportion():
    X = np.zeros((10, 1, 4, 4), np.float32)
    masks = np.zeros((10, 4, 4), np.int64)
    masks[::2, 1, 1] = 1
    site = Site("A", X, masks, task="segmentation")
    assert site.y.dtype == np.int64 and site.y.shape == (10, 4, 4)
    assert strata("segmentation", site.y).tolist() == [1, 0] * 5
    with pytest.raises(DataError, match=r"site 'A': a segmentation task takes one mask per image on the image's grid, "
                                        r"shape \(10, 4, 4\); got masks of shape \(10, 4, 5\)"):
        Site("A", X, np.zeros((10, 4, 5)), task="segmentation")


def test_mni_phantom_segmentation_masks_are_its_lesions():
    pytest.importorskip("nilearn")
    from medfed.data.datasets.mni_phantom import load_mni_phantom

    seg = load_mni_phantom(task="segmentation", size=16, n_per_site=20, lesion_mm=20)
    lesion = load_mni_phantom(task="lesion", size=16, n_per_site=20, lesion_mm=20)
    assert seg.task == "segmentation" and seg.classes == ("background", "lesion")
    for s, b in zip(seg.sites, lesion.sites):
        assert np.array_equal(s.X, b.X)  # the same images as task=lesion, the lesion now as a mask
        has = s.y.reshape(s.n, -1).any(axis=1)
        assert not has[b.y == 0].any() and has[b.y == 1].mean() > 0.8
    # hypointense lesions: inside the masks T1 is darker than in the same pixels of lesion-free images
    s = seg.sites[0]
    inside = s.y.astype(bool)
    free = ~s.y.reshape(s.n, -1).any(axis=1)
    assert s.X[:, 0][inside].mean() < s.X[free, 0].mean(axis=0)[inside.any(axis=0)].mean()


def test_medfed_run_segmentation_end_to_end(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "run", "--dataset", "mni-phantom", "--dataset-option", "task=segmentation", "--dataset-option", "size=16",
        "--dataset-option", "n_per_site=12", "--dataset-option", "lesion_mm=20", "--model", "unet2d",
        "--model-option", "norm=group", "--methods", "single,fedavg", "--rounds", "2", "--repeats", "1",
        "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Dice" in result.output and "HD95" in result.output
    doc = json.loads((out / "results.json").read_text())
    assert doc["task"] == "segmentation" and doc["classes"] == ["background", "lesion"]
    rows = doc["results"]
    assert {r["setting"] for r in rows} == {"Single", "FedAvg"} and len(rows) == 6
    for r in rows:
        assert set(r["metrics"]) == {"dice", "iou", "hd95"}
        dice = r["metrics"]["dice"]["mean"]
        assert dice is None or 0.0 <= dice <= 1.0
        assert set(r["per_class"]) == {"dice", "iou"} and list(r["per_class"]["dice"]) == ["lesion"]


def test_segmentation_refusals_are_one_line(tmp_path):
    runner = CliRunner()
    base = ["run", "--dataset", "mni-phantom", "--dataset-option", "task=segmentation", "--dataset-option", "size=16",
            "--dataset-option", "n_per_site=12", "--rounds", "1", "--out", str(tmp_path / "x")]
    for extra, message in ((["--model", "cnn2d"], "model 'cnn2d' cannot train a segmentation task"),
                           (["--model", "unet2d", "--methods", "fedsld"], "method 'fedsld' trains binary or multiclass tasks; these data are segmentation")):
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 2 and message in result.output and result.output.count("\n") == 1, result.output


# --------------------------------------------------------------------------- masks from manifests


def _png_manifest(tmp_path, values=(0, 3, 7), n=10, sites=("A", "B"), mask_of=None):
    """Tiny 16×16 PNG images and masks (uint8 labels ``values``), 2 sites; the manifest has no label column."""
    from PIL import Image

    rows = ["path,mask,site"]
    rng = np.random.default_rng(0)
    for s in sites:
        for i in range(n):
            mask = np.zeros((16, 16), np.uint8)
            mask[2:6, 2 + i % 4:8] = values[1]
            mask[9:13, 8:12] = values[2] if i % 2 else 0
            img = (rng.integers(0, 40, (16, 16)) + 100 * (mask > 0)).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / f"{s}{i}.png")
            Image.fromarray(mask if mask_of is None else mask_of(s, i, mask)).save(tmp_path / f"{s}{i}_mask.png")
            rows.append(f"{s}{i}.png,{s}{i}_mask.png,{s}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "m.csv"


def test_png_masks_from_a_manifest_make_a_segmentation_federation(tmp_path):
    pytest.importorskip("PIL")
    from PIL import Image

    from medfed.data.images import load_image_manifest

    fed = load_image_manifest(_png_manifest(tmp_path), mask_column="mask")
    assert fed.task == "segmentation" and fed.classes == ("background", "3", "7")
    assert fed.info["mask_column"] == "mask" and fed.info["mask_values"] == {"background": 0, "3": 3, "7": 7}
    for s in fed.sites:
        assert s.task == "segmentation" and s.y.shape == (10, 16, 16) and s.y.dtype == np.int64
        for i in range(10):  # the stored labels 0/3/7 are class indices 0/1/2, pixel for pixel
            stored = np.asarray(Image.open(tmp_path / f"{s.name}{i}_mask.png"))
            np.testing.assert_array_equal(s.y[i], np.searchsorted([0, 3, 7], stored))
            np.testing.assert_array_equal(s.X[i, 0], np.asarray(Image.open(tmp_path / f"{s.name}{i}.png")))
    # without a mask column the same manifest is a label manifest, and it has no label column
    with pytest.raises(DataError, match="no label column 'label'"):
        load_image_manifest(tmp_path / "m.csv")


def test_a_mask_off_its_images_grid_is_one_error_naming_both_files(tmp_path):
    pytest.importorskip("PIL")
    from medfed.data.images import load_image_manifest

    wide = _png_manifest(tmp_path, mask_of=lambda s, i, m: np.pad(m, ((0, 0), (0, 4))) if (s, i) == ("B", 3) else m)
    with pytest.raises(DataError, match=r"data row 14 \(site 'B'\): .*B3_mask\.png: is a mask of spatial shape 16×20 "
                                        r"while its image .*B3\.png has 16×16"):
        load_image_manifest(wide, mask_column="mask")
    rgb = _png_manifest(tmp_path, mask_of=lambda s, i, m: np.stack([m] * 3, -1) if (s, i) == ("A", 0) else m)
    with pytest.raises(DataError, match=r"A0_mask\.png: is a mask with 3 channels; allowed: one channel of labels, "
                                        r"on the grid of its image .*A0\.png"):
        load_image_manifest(rgb, mask_column="mask")
    with pytest.raises(DataError, match="every mask is background"):
        load_image_manifest(_png_manifest(tmp_path, mask_of=lambda s, i, m: 0 * m), mask_column="mask")
    # with --skip-bad the row is left out and the reason names both files
    fed = load_image_manifest(_png_manifest(tmp_path, n=11, mask_of=lambda s, i, m: m[:8] if (s, i) == ("A", 5) else m),
                              mask_column="mask", skip_bad=True)
    (skipped,) = fed.info["skipped"]
    assert skipped["site"] == "A" and "A5.png" in skipped["reason"] and skipped["path"].endswith("A5.png")
    assert "A5_mask.png" in skipped["reason"] and [s.n for s in fed.sites] == [10, 11]


def _nifti(path, data, affine):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))


def test_nifti_masks_are_reoriented_with_their_images_and_must_share_their_affine(tmp_path):
    pytest.importorskip("nibabel")
    from medfed.data.images import load_image_manifest

    lps = np.diag([-2.0, -2.0, 2.0, 1.0])  # stored L->R flipped and P->A flipped: reorientation must flip both files
    rng = np.random.default_rng(1)
    rows = ["path,mask,site,label"]
    for i in range(10):
        mask = np.zeros((8, 8, 4), np.int16)
        mask[1 + i % 3:5, 2:4, 1:3] = 2
        _nifti(tmp_path / f"v{i}.nii.gz", (rng.random((8, 8, 4)) + 5 * mask).astype(np.float32), lps)
        _nifti(tmp_path / f"v{i}_mask.nii.gz", mask, lps)
        rows.append(f"v{i}.nii.gz,v{i}_mask.nii.gz,A,x")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    fed = load_image_manifest(tmp_path / "m.csv", mask_column="mask")
    (site,) = fed.sites
    assert fed.classes == ("background", "2") and site.X.shape == (10, 1, 8, 8, 4)
    np.testing.assert_array_equal(site.y == 1, site.X[:, 0] > 4.5)  # the lesion voxels, after both were reoriented
    import nibabel as nib

    stored = np.asarray(nib.load(str(tmp_path / "v0_mask.nii.gz")).dataobj) == 2
    assert not np.array_equal(site.y[0] == 1, stored) and np.array_equal(site.y[0] == 1, stored[::-1, ::-1])
    # the same voxels, but the mask's origin shifted by 4 mm: a different grid
    _nifti(tmp_path / "v7_mask.nii.gz", np.zeros((8, 8, 4), np.int16), lps + np.array([[0, 0, 0, 4.0]] + [[0] * 4] * 3))
    with pytest.raises(DataError, match=r"v7_mask\.nii\.gz: is a mask whose voxel-to-mm affine .* differs from its "
                                        r"image .*v7\.nii\.gz's"):
        load_image_manifest(tmp_path / "m.csv", mask_column="mask")
    _nifti(tmp_path / "v7_mask.nii.gz", np.full((8, 8, 4), 0.5, np.float32), lps)
    with pytest.raises(DataError, match=r"v7_mask\.nii\.gz: is a mask holding 256 values that are not class labels "
                                        r"\(first: 0\.5\)"):
        load_image_manifest(tmp_path / "m.csv", mask_column="mask")


def test_dicom_masks_must_share_their_images_orientation_spacing_and_origin(tmp_path):
    """DICOM series and 2-D DICOM files carry their voxel-to-mm affine as NIfTI does: a mask
    on an equally shaped and spaced grid placed elsewhere (origin) or turned (orientation) is refused."""
    pytest.importorskip("pydicom")
    pytest.importorskip("nibabel")
    from test_image_loaders import write_dicom_slice

    from medfed.data.images import load_image_manifest

    def series(folder, stored, z0=10.0, uid="1.2.826.0.1.3680043.8.498.7"):
        for k, pixels in enumerate(stored):
            write_dicom_slice(folder / f"IM{k}.dcm", pixels, z=z0 + 2.5 * k, series_uid=uid, instance=k + 1)

    rng = np.random.default_rng(3)
    rows = ["path,mask,site"]
    for i in range(10):  # a site's least for a train/test split
        mask = np.zeros((3, 6, 5), np.uint16)
        mask[1:, 2:5, 1 + i % 2:4] = 1
        series(tmp_path / f"s{i}", (rng.integers(0, 50, (3, 6, 5)) + 200 * mask).astype(np.uint16))
        series(tmp_path / f"s{i}_mask", mask, uid="1.2.826.0.1.3680043.8.498.8")
        write_dicom_slice(tmp_path / f"p{i}.dcm", (rng.integers(0, 50, (6, 5)) + 200 * mask[1]).astype(np.uint16),
                          z=0.0, series_uid="1.2.3.4", instance=1)
        write_dicom_slice(tmp_path / f"p{i}_mask.dcm", mask[1], z=0.0, series_uid="1.2.3.5", instance=1)
        rows.append(f"s{i},s{i}_mask,A")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    planar = tmp_path / "p.csv"
    planar.write_text("\n".join(["path,mask,site"] + [f"p{i}.dcm,p{i}_mask.dcm,A" for i in range(10)]) + "\n")
    for manifest in (tmp_path / "m.csv", planar):
        (site,) = load_image_manifest(manifest, mask_column="mask", kind="dicom").sites
        np.testing.assert_array_equal(site.y == 1, site.X[:, 0] > 150)  # the same voxels, both reoriented alike
    # the same shape and spacing, the mask's slices 5 mm further along: another origin
    for f in (tmp_path / "s2_mask").iterdir():
        f.unlink()
    series(tmp_path / "s2_mask", np.zeros((3, 6, 5), np.uint16), z0=15.0, uid="1.2.826.0.1.3680043.8.498.8")
    with pytest.raises(DataError, match=r"s2_mask: is a mask whose voxel-to-mm affine .* differs from its image "
                                        r".*s2's"):
        load_image_manifest(tmp_path / "m.csv", mask_column="mask", kind="dicom")
    import pydicom

    turned = pydicom.dcmread(str(tmp_path / "p1_mask.dcm"))
    turned.ImageOrientationPatient = [0.0, 1.0, 0.0, 1.0, 0.0, 0.0]  # rows and columns swapped in space
    turned.save_as(str(tmp_path / "p1_mask.dcm"))
    with pytest.raises(DataError, match=r"p1_mask\.dcm: is a mask whose voxel-to-mm affine .* differs from its "
                                        r"image .*p1\.dcm's"):
        load_image_manifest(planar, mask_column="mask", kind="dicom")


def test_medfed_run_on_a_mask_manifest_and_the_mask_column_flag(tmp_path):
    pytest.importorskip("PIL")
    manifest = _png_manifest(tmp_path, values=(0, 255, 255))
    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "--manifest", str(manifest), "--task", "segmentation", "--model", "unet2d",
                                 "--model-option", "norm=group", "--methods", "fedavg", "--rounds", "1", "--repeats", "1",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "results.json").read_text())
    assert doc["task"] == "segmentation" and doc["classes"] == ["background", "255"]
    assert {r["setting"] for r in doc["results"]} == {"FedAvg"}
    result = runner.invoke(app, ["run", "--dataset", "mni-phantom", "--mask-column", "mask", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--mask-column (data.mask_column) applies to a manifest" in result.output
    assert result.output.count("\n") == 1, result.output


# --------------------------------------------------------------------------- partial sharing and DP on U-Nets


def _seg_sites(n=10, k=3):
    """Tiny 16×16 segmentation sites, each with its own scanner scale and offset."""
    from medfed.client import LocalData

    sites = []
    for s in range(k):
        rng = np.random.default_rng(40 + s)
        masks = np.zeros((n, 16, 16), np.int64)
        for i in range(n):
            masks[i, 2 + i % 5:9, 3:10] = 1
        X = (rng.normal(size=(n, *SHAPE)) + 2.0 * masks[:, None]).astype(np.float32)
        sites.append(LocalData(f"site-{s}", X * (1 + 0.5 * s) + 0.3 * s, masks))
    return sites


@pytest.mark.usefixtures("torch_one_thread")
@pytest.mark.parametrize("method, opts, private", [("fedbn", {}, is_norm), ("fedper", {}, is_head),
                                                   ("fedper", {"private": "decoder"}, "decoder")])
def test_fedbn_and_fedper_on_a_unet_never_upload_their_private_parameters(method, opts, private):
    from medfed.client import LocalTraining
    from medfed.comm import UploadBoundary
    from medfed.engine import run_federated
    from medfed.experiments.config import TrainingSpec
    from medfed.methods.images import IMAGE_METHODS
    from medfed.methods.method import context_for
    from medfed.models.registry import is_decoder

    private = is_decoder if private == "decoder" else private
    spec = {m.name: m for m in IMAGE_METHODS}[method]
    algorithm = spec.build(spec.validate(opts), TrainingSpec(), context_for(["site-0", "site-1", "site-2"]))
    uploads = []
    model, init = _model("batch")
    sites = _seg_sites()
    run = run_federated(algorithm, init, sites, LocalTraining(model, 0.05, 2, 5, 1e-4), 2, KeyedRng(1),
                        boundary=UploadBoundary([lambda u: uploads.append(u) or u]))
    kept = {k for k in init if private(k)}
    assert kept and kept != set(init) and len(uploads) == 6
    for upload in uploads:
        assert set(upload.payload) == set(init) - kept
    for k in init:
        if k in kept:  # the server's copy never moves; each site trained its own
            np.testing.assert_array_equal(run.params[k], init[k])
            if not is_norm_statistic(k):
                own = [run.client_states[s.name].private[k] for s in sites]
                assert not np.allclose(own[0], init[k]) and not np.allclose(own[0], own[1])
        elif not is_norm_statistic(k):
            assert not np.array_equal(run.params[k], init[k])
    if private is is_decoder:  # the whole up path is private, the encoder and the bottom shared
        assert kept == {k for k in init if k.startswith(("head.", "body.skip.submodule.up."))}
        assert "body.skip.submodule.skip.submodule.conv.weight" not in kept and "body.down.conv.weight" not in kept


def test_client_level_dp_runs_fedbn_and_fedper_decoder_on_a_unet(tmp_path):
    base = ["run", "--dataset", "mni-phantom", "--dataset-option", "task=segmentation", "--dataset-option", "size=16",
            "--dataset-option", "n_per_site=12", "--dataset-option", "lesion_mm=20", "--model", "unet2d",
            "--rounds", "2", "--repeats", "1"]
    runner = CliRunner()
    result = runner.invoke(app, base + ["--methods", "fedbn,fedper",
                                        "--method-option", "fedper.private=decoder", "--dp", "client", "--clip", "1",
                                        "--noise", "0.5", "--out", str(tmp_path / "dp")])
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "dp" / "results.json").read_text())
    assert {r["setting"] for r in doc["results"]} == {"FedBN", "FedPer"}
    assert all(set(r["metrics"]) == {"dice", "iou", "hd95"} for r in doc["results"])
