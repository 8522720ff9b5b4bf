"""Plots per task (issue 11 §3): multiclass confusion matrices and per-class ROC, multilabel
per-label ROC, regression predicted-vs-true scatter; binary plots keep their names and content."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest
from typer.testing import CliRunner

from medfed.cli.app import app
from medfed.data.federation import Federation, Site
from medfed.experiments.config import build_config
from medfed.experiments.harness import example_rows, load_federation, run_experiment
from medfed.experiments.metrics import roc_auc
from medfed.experiments.plots import (EMPTY_DICE, axial_index, axial_slice, confusion_figure, overlay_figure,
                                      per_output_roc_figure, plot_files, scatter_figure)
from medfed.experiments.results import format_metric, results_document, summarize

CLASSES = ("cn", "mci", "ad")


def _federation(task: str) -> Federation:
    rng = np.random.default_rng(3)
    sites = []
    for k in range(2):
        X = rng.normal(size=(60, 4))
        if task == "multiclass":
            y = np.argmax(X[:, :3] + rng.normal(0, 0.8, (60, 3)), axis=1)
        elif task == "multilabel":
            y = (X[:, :2] + rng.normal(0, 0.8, (60, 2)) > 0).astype(np.int8)
        else:
            y = 60 + 5 * X[:, 0] + rng.normal(0, 2, 60)
        sites.append(Site(f"s{k}", X, y, task=task))
    classes = {"multiclass": CLASSES, "multilabel": ("a", "b")}.get(task, ())
    return Federation("toy", tuple(sites), ("f0", "f1", "f2", "f3"), task=task, classes=classes)


def _run(task: str):
    config = build_config({"data": {"dataset": "adni-like"}, "repeats": 2, "methods": ["single", "mix", "fedavg"],
                           "training": {"rounds": 4, "local_steps": 2}, "plot_formats": ["svg"]})
    return run_experiment(config, _federation(task))


def _texts(data: bytes) -> list[str]:
    root = ET.fromstring(data)
    return ["".join(t.itertext()).strip() for t in root.iter("{http://www.w3.org/2000/svg}text")]


@pytest.fixture(scope="module")
def multiclass():
    return _run("multiclass")


def test_each_task_writes_its_own_plots_per_test_site():
    expected = {"multiclass": {"confusion", "roc"}, "multilabel": {"roc"}, "regression": {"scatter"}}
    for task, kinds in expected.items():
        run = _run(task)
        files = plot_files(run, results_document(run))
        assert set(files) == {f"{kind}_{s}.svg" for kind in kinds for s in ("s0", "s1")} | {"convergence.svg"}
        for name, render in files.items():
            assert render().startswith(b"<?xml"), name  # every figure renders


def test_confusion_matrix_rows_are_the_repeats_pooled_share_of_each_true_class(multiclass):
    fig = confusion_figure(multiclass, "s1")
    cell = next(c for c in multiclass.cells if c.test_site == "s1" and c.setting == "Mix")
    counts = np.zeros((3, 3))
    for y, p in cell.scores:
        np.add.at(counts, (y.astype(int), p.argmax(axis=1)), 1)
    expected = counts / counts.sum(axis=1, keepdims=True)
    ax = next(a for a in fig.axes if a.get_title().startswith("Mix"))
    np.testing.assert_allclose(ax.get_images()[0].get_array(), expected)
    assert [t.get_text() for t in ax.get_yticklabels()] == list(CLASSES)
    assert ax.get_xlabel() == "predicted class" and ax.get_ylabel() == "true class"
    assert f"ACC {format_metric(summarize(cell.metrics['acc']))}" in ax.get_title()


def test_per_class_roc_gives_each_settings_one_vs_rest_auc(multiclass):
    fig = per_output_roc_figure(multiclass, "s0")
    assert [a.get_title() for a in fig.axes] == [f"{c} vs rest" for c in CLASSES]
    cell = next(c for c in multiclass.cells if c.test_site == "s0" and c.setting == "FedAvg")
    aucs = [roc_auc(y == 2, p[:, 2]) for y, p in cell.scores]
    labels = [line.get_label() for line in fig.axes[2].get_lines()]
    assert f"FedAvg: AUC {np.mean(aucs):.3f} ± {np.std(aucs, ddof=1):.3f}" in labels


def test_regression_scatter_plots_every_repeats_predictions_against_the_truth():
    run = _run("regression")
    fig = scatter_figure(run, "s0")
    cell = next(c for c in run.cells if c.test_site == "s0" and c.setting == "Single")
    ax = next(a for a in fig.axes if a.get_title().startswith("Single"))
    points = np.vstack([c.get_offsets() for c in ax.collections])
    np.testing.assert_allclose(points, np.vstack([np.c_[y, p] for y, p in cell.scores]))
    assert ax.get_xlabel() == "true value" and ax.get_ylabel() == "predicted value"
    assert f"MAE {format_metric(summarize(cell.metrics['mae']))}" in ax.get_title()


def test_binary_plots_keep_their_names(tmp_path):
    from conftest import synthetic_federation

    config = build_config({"data": {"dataset": "adni-like"}, "repeats": 2, "methods": ["single", "fedavg"],
                           "training": {"rounds": 3, "local_steps": 1}, "plot_formats": ["svg"]})
    run = run_experiment(config, synthetic_federation())
    files = plot_files(run, results_document(run))
    assert set(files) == {f"roc_{s}.svg" for s in run.federation.site_names} | {"convergence.svg"}
    assert any(t.startswith("ROC on ") for t in _texts(files[f"roc_{run.federation.site_names[0]}.svg"]()))


def test_medfed_run_plots_a_multiclass_phantom(tmp_path):
    pytest.importorskip("nibabel")
    pytest.importorskip("torch")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "run", "--dataset", "mni-phantom", "--dataset-option", "task=multiclass", "--dataset-option", "n_per_site=24",
        "--dataset-option", "size=16", "--model", "torch_logistic", "--methods", "single,fedavg", "--repeats", "1",
        "--rounds", "2", "--local-steps", "1", "--plots", "--out", str(out)])
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    assert {f"confusion_site-{k}.png" for k in (1, 2, 3)} <= names and {f"roc_site-{k}.png" for k in (1, 2, 3)} <= names


@pytest.fixture(scope="module")
def segmentation():
    pytest.importorskip("nibabel")
    pytest.importorskip("monai")
    config = build_config({"data": {"dataset": "mni-phantom", "options": {"task": "segmentation", "n_per_site": 20,
                                                                          "size": 16, "n_sites": 2}},
                           "model": "unet2d", "repeats": 1, "methods": ["single", "fedavg"],
                           "training": {"rounds": 2, "local_steps": 1}, "plot_formats": ["png"]})
    return run_experiment(config, load_federation(config.data))


def test_segmentation_writes_one_overlay_png_per_test_site(segmentation):
    files = plot_files(segmentation, results_document(segmentation))
    assert set(files) == {"overlay_site-1.png", "overlay_site-2.png", "convergence.png"}
    assert all(render().startswith(b"\x89PNG\r\n\x1a\n") for render in files.values())


def test_overlay_shows_the_kept_test_images_with_each_images_dice(segmentation):
    from medfed.experiments.harness import SEGMENTATION_EXAMPLES
    from medfed.experiments.metrics import segmentation_metrics

    fig = overlay_figure(segmentation, "site-2")
    cell = next(c for c in segmentation.cells if c.test_site == "site-2" and c.setting == "FedAvg")
    masks, probabilities = cell.scores[0]
    assert len(masks) == len(cell.images[0]) == SEGMENTATION_EXAMPLES  # a fixed few, not every test image
    titles = [a.get_title() for a in fig.axes if a.get_title().startswith("FedAvg")]
    assert len(titles) == SEGMENTATION_EXAMPLES
    for i, title in enumerate(titles):
        dice = segmentation_metrics(masks[i][None], probabilities[i][None], ("background", "lesion"))["dice"].value
        assert title.endswith(f"image {i + 1}\nDice " + (EMPTY_DICE if dice is None else f"{dice:.3f}"))
    grey = next(a for a in fig.axes if a.get_title() == titles[0]).get_images()[0].get_array()
    np.testing.assert_array_equal(grey, cell.images[0][0, 0])  # the unscaled test image itself


def test_example_rows_put_images_with_a_foreground_first():
    masks = np.zeros((5, 4, 4), dtype=np.int64)
    masks[3, 1, 1] = masks[1, 2, 2] = 1
    np.testing.assert_array_equal(example_rows(masks, 3), [1, 3, 0])


def test_a_volumes_overlay_slice_holds_most_of_its_true_mask():
    mask = np.zeros((5, 4, 6), dtype=np.int64)
    assert axial_index(mask, 0) == 2 and axial_index(mask[0], 0) is None  # no foreground: the middle; 2D: none
    mask[1, 0, 0] = mask[3, 1:3, 1:3] = 1
    assert axial_index(mask, 0) == 3 and axial_index(mask, 2) in (1, 2)
    volume = np.arange(mask.size).reshape(mask.shape)
    np.testing.assert_array_equal(axial_slice(volume, 0, 3), volume[3])
    np.testing.assert_array_equal(axial_slice(volume, 2, 1), np.rot90(volume[:, :, 1]))  # RAS: anterior up
    np.testing.assert_array_equal(axial_slice(volume[0], 0, None), volume[0])  # 2D as is


def test_medfed_run_plots_a_segmentation_phantom(tmp_path):
    pytest.importorskip("nibabel")
    pytest.importorskip("monai")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "run", "--dataset", "mni-phantom", "--dataset-option", "task=segmentation", "--dataset-option", "n_per_site=20",
        "--dataset-option", "size=16", "--model", "unet2d", "--methods", "single", "--repeats", "1",
        "--rounds", "1", "--local-steps", "1", "--plots", "--out", str(out)])
    assert result.exit_code == 0, result.output
    overlays = sorted(p.name for p in out.glob("overlay_*"))
    assert overlays == [f"overlay_site-{k}.png" for k in (1, 2, 3)]
    assert all((out / name).read_bytes().startswith(b"\x89PNG") for name in overlays)
