"""`semisupervised` on a segmentation task (issue 14 §2; Yang et al., 2021a, COVID-19 region
segmentation): per-voxel pseudo-masks from the global model, unconfident voxels out of the loss, one
geometry for the weak and the strong view, FedAvg bit for bit without unlabeled images, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

from typer.testing import CliRunner  # noqa: E402

from medfed.cli.app import app  # noqa: E402
from medfed.client import LocalData, LocalTraining  # noqa: E402
from medfed.client.semisupervised import pseudo_masks, segmentation_views  # noqa: E402
from medfed.engine import run_federated  # noqa: E402
from medfed.experiments.config import TrainingSpec  # noqa: E402
from medfed.methods.method import BuildContext  # noqa: E402
from medfed.methods.registry import METHODS  # noqa: E402
from medfed.models.registry import make_model  # noqa: E402
from medfed.models.unet import IGNORE, dice_ce, voxel_weighted_dice_ce  # noqa: E402
from medfed.rng import KeyedRng  # noqa: E402

SHAPE = (1, 16, 16)


def _images(n, seed):
    """Phantom-like images: a bright square lesion at a random place on noise, and its mask."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, 16, 16))
    for i in range(n):
        r, c = rng.integers(1, 10, 2)
        masks[i, r:r + 5, c:c + 5] = 1
    return (masks[:, None] + 0.3 * rng.standard_normal((n, *SHAPE))).astype(np.float32), masks


def _sites(unlabeled):
    out = []
    for k in range(2):
        X, y = _images(10, seed=k)
        out.append(LocalData(f"s{k}", X[:6], y[:6], X[6:6 + unlabeled] if unlabeled else None))
    return out


def _run(name, sites, **opts):
    model = make_model("unet2d", SHAPE, task="segmentation", n_classes=2, norm="group", channels="4,8")
    spec = METHODS[name]
    algorithm = spec.build(spec.validate(opts), TrainingSpec(), BuildContext(("s0", "s1")))
    training = LocalTraining(model, lr=0.05, steps=3, batch_size=4)
    return run_federated(algorithm, model.init_params(SHAPE, KeyedRng(0)), sites, training, 2, KeyedRng(3)).params


def test_no_unlabeled_image_or_no_confident_voxel_is_fedavg_bit_for_bit():
    fedavg = _run("fedavg", _sites(0))
    with_unlabeled = _sites(4)
    for sites, threshold in ((_sites(0), 0.5), (with_unlabeled, 1.0)):  # p = 1 exactly: no voxel is confident
        semi = _run("semisupervised", sites, threshold=threshold)
        assert all(np.array_equal(semi[k], fedavg[k]) for k in fedavg)
    trained = _run("semisupervised", with_unlabeled, threshold=0.5)  # every voxel confident (K = 2)
    assert not np.array_equal(trained["head.conv.weight"], fedavg["head.conv.weight"])


def _loss_and_grad(z, y, w):
    z = z.clone().requires_grad_(True)
    loss = voxel_weighted_dice_ce(z, y, w).sum()
    loss.backward()
    return loss.detach(), z.grad


def test_a_voxel_without_a_target_contributes_nothing_to_the_loss_or_its_gradient():
    rng = np.random.default_rng(0)
    z = torch.from_numpy(rng.normal(size=(3, 3, 8, 8)))
    y = torch.from_numpy(rng.integers(0, 3, (3, 8, 8)))
    w = torch.from_numpy((rng.random((3, 8, 8)) < 0.6).astype(np.float64))
    w[2] = 0.0  # an image without a confident voxel
    other = torch.where(w > 0, y, (y + 1) % 3)  # another pseudo-class at every unconfident voxel
    loss, grad = _loss_and_grad(z, y, w)
    loss_other, grad_other = _loss_and_grad(z, other, w)
    assert torch.equal(loss, loss_other) and torch.equal(grad, grad_other)
    assert torch.equal(grad[2], torch.zeros_like(grad[2])) and float(voxel_weighted_dice_ce(z, y, w)[2]) == 0.0
    # IGNORE in the mask is a weight of 0; without any, the weighted loss is the plain one
    marked = torch.where(w > 0, y, torch.full_like(y, IGNORE))
    assert torch.equal(dice_ce(z, marked, "none", ignore=True), voxel_weighted_dice_ce(z, y, w))
    assert torch.allclose(voxel_weighted_dice_ce(z, y, torch.ones_like(w)), dice_ce(z, y, "none"), rtol=0, atol=1e-12)


class _Threshold:
    """A stand-in global model: a voxel brighter than 0.5 is lesion, with probability 0.99."""

    def predict_proba(self, params, X):
        lesion = np.where(X[:, 0] > 0.5, 0.99, 0.01)
        return np.stack([1.0 - lesion, lesion], axis=1)


def test_the_pseudo_mask_lies_on_the_strong_views_grid():
    truth = np.zeros((8, 16, 16))
    truth[:, 1:6, 1:3] = 1  # an L at the top left: asymmetric under a flip
    truth[:, 4:6, 3:7] = 1
    views = segmentation_views(truth[:, None], 0.01, 0.5, KeyedRng(5))
    assert views.geometry.flip.any() and not views.geometry.flip.all()
    moved = views.geometry.apply(truth)
    assert not np.array_equal(moved, truth)
    confident = pseudo_masks(_Threshold(), None, views.weak, 0.9)
    np.testing.assert_array_equal(confident.rows, np.arange(8))
    np.testing.assert_array_equal(confident.masks, moved)  # the pseudo-mask is the augmented ground truth
    for strong, mask in zip(views.strong[:, 0], moved):  # the strong view: that geometry, another jitter
        np.testing.assert_array_equal(strong > (strong.min() + strong.max()) / 2, mask > 0)


def test_pseudo_masks_ignore_voxels_below_the_threshold_and_streams_are_keyed():
    X = np.random.default_rng(2).random((4, *SHAPE))
    p = _Threshold().predict_proba(None, X)
    confident = pseudo_masks(_Threshold(), None, X, 0.995)  # above every voxel's 0.99
    assert confident.rows.size == 0 and confident.masks.shape == (0, 16, 16)
    half = pseudo_masks(_Threshold(), None, np.where(X > 0.5, X, 0.5), 0.9)  # 0.5 is not brighter than 0.5
    assert np.array_equal(half.masks == IGNORE, np.zeros_like(p[:, 0], bool)) and set(np.unique(half.masks)) <= {0, 1}
    a, b = segmentation_views(X, 0.05, 0.5, KeyedRng(1)), segmentation_views(X, 0.05, 2.0, KeyedRng(1))
    assert np.array_equal(a.weak, b.weak) and np.array_equal(a.geometry.shifts, b.geometry.shifts)
    assert not np.array_equal(a.strong, b.strong)


def test_medfed_run_semisupervised_segmentation_end_to_end(tmp_path):
    pytest.importorskip("nilearn")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "run", "--dataset", "mni-phantom", "--dataset-option", "task=segmentation", "--dataset-option", "size=16",
        "--dataset-option", "n_per_site=12", "--dataset-option", "lesion_mm=20", "--model", "unet2d",
        "--model-option", "norm=group", "--methods", "fedavg,semisupervised", "--method-option",
        "semisupervised.threshold=0.5", "--labeled-fraction", "0.5", "--rounds", "2", "--repeats", "1",
        "--out", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "results.json").read_text())
    assert {r["setting"] for r in doc["results"]} == {"FedAvg", "SemiSup"}
    assert all(set(r["metrics"]) == {"dice", "iou", "hd95"} for r in doc["results"])
    loss = {name: entry["train_loss"][0] for name, entry in doc["histories"].items()}
    assert loss["FedAvg"][0] == loss["SemiSup"][0] and loss["FedAvg"] != loss["SemiSup"]  # the pseudo-masks trained
    assert any("used by SemiSup" in w for w in doc["warnings"])


def test_an_empty_mask_cell_in_a_manifest_is_an_unlabeled_image(tmp_path):
    pytest.importorskip("PIL")
    from test_segmentation import _png_manifest

    from medfed.data.images import load_image_manifest
    from medfed.errors import DataError

    path = _png_manifest(tmp_path, n=12)
    lines = path.read_text().splitlines()
    for row in (3, 5, 15):  # data rows A2, A4 and B2 lose their mask
        image, _, site = lines[row].split(",")
        lines[row] = f"{image},,{site}"
    path.write_text("\n".join(lines) + "\n")
    fed = load_image_manifest(path, mask_column="mask")
    a, b = fed.sites
    np.testing.assert_array_equal(np.flatnonzero(a.unlabeled), [2, 4])
    np.testing.assert_array_equal(np.flatnonzero(b.unlabeled), [2])
    assert a.n == 12 and not a.y[a.unlabeled].any() and a.y[~a.unlabeled].any()  # a placeholder mask, never a target
    for row in range(12, 24):  # no labeled image left at site B: one error naming the column
        image, _, site = lines[row + 1].split(",")
        lines[row + 1] = f"{image},,{site}"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"m\.csv: label column 'mask': site 'B' \(0 of 12\) has fewer than 2 labeled"):
        load_image_manifest(path, mask_column="mask")


def test_volumes_keep_the_pseudo_mask_on_the_strong_views_grid_and_a_unet3d_round_trains():
    """3D images (n, 1, D, H, W): the flip and shift act on the last two axes of image and mask
    alike, slice by slice, so the pseudo-mask is the augmented ground truth; a unet3d site trains."""
    truth = np.zeros((6, 4, 16, 16))
    truth[:, 1:3, 1:6, 1:3] = 1  # an L in two of four slices: asymmetric under a flip
    truth[:, 1:3, 4:6, 3:7] = 1
    views = segmentation_views(truth[:, None], 0.01, 0.5, KeyedRng(8))
    moved = views.geometry.apply(truth)
    assert views.weak.shape == truth[:, None].shape and not np.array_equal(moved, truth)
    assert not moved[:, [0, 3]].any() and moved[:, [1, 2]].any()  # in plane: no slice moves to another
    confident = pseudo_masks(_Threshold(), None, views.weak, 0.9)
    np.testing.assert_array_equal(confident.masks, moved)
    shape = (1, 8, 8, 8)
    model = make_model("unet3d", shape, task="segmentation", n_classes=2, norm="group", channels="4,8")
    rng = np.random.default_rng(0)
    masks = (rng.random((6, 8, 8, 8)) < 0.2).astype(float)
    X = (masks[:, None] + 0.3 * rng.standard_normal((6, *shape))).astype(np.float32)
    sites = [LocalData("s0", X[:3], masks[:3], X[3:])]
    training = LocalTraining(model, lr=0.05, steps=2, batch_size=3)
    init = model.init_params(shape, KeyedRng(0))
    params = {}
    for name, opts in (("fedavg", {}), ("semisupervised", {"threshold": 0.5})):
        algorithm = METHODS[name].build(METHODS[name].validate(opts), TrainingSpec(), BuildContext(("s0",)))
        params[name] = run_federated(algorithm, init, sites, training, 1, KeyedRng(3)).params
    assert all(np.isfinite(v).all() for v in params["semisupervised"].values())
    assert any(not np.array_equal(params["semisupervised"][k], params["fedavg"][k]) for k in params["fedavg"])
