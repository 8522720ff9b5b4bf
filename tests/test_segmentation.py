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
                           (["--model", "unet2d", "--methods", "fedsld"], "method 'fedsld' trains binary tasks")):
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 2 and message in result.output and result.output.count("\n") == 1, result.output
