"""Plots fit for a paper: ROC mean curves with bands and AUC legends, distinguishable curves,
truthful convergence curves, test metrics per evaluated round, distinct file names, PDF/SVG."""

import dataclasses
import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from conftest import synthetic_federation
from typer.testing import CliRunner

from medfed.cli.app import app
from medfed.data.federation import Federation, Site
from medfed.errors import ConfigError
from medfed.experiments.config import build_config
from medfed.experiments.harness import run_experiment
from medfed.experiments.metrics import BINARY, roc_auc, roc_curve
from medfed.experiments.plots import (
    ROC_GRID,
    convergence_figure,
    file_stems,
    metric_figure,
    plot_files,
    roc_figure,
    tpr_on_grid,
)
from medfed.experiments.report import write_atomically
from medfed.experiments.results import format_metric, results_document

REPEATS = 3


def _config(**kw):
    values = {"data": {"dataset": "adni-like"}, "repeats": REPEATS, "methods": ["single", "mix", "fedavg", "fedsgd"],
              "training": {"rounds": 6, "local_steps": 2}, "eval_every": 2, "plot_formats": ["svg"]}
    values.update(kw)
    return build_config(values)


@pytest.fixture(scope="module")
def run():
    return run_experiment(_config(), synthetic_federation())


@pytest.fixture(scope="module")
def doc(run):
    return results_document(run)


def _svg_texts(data: bytes) -> list[str]:
    root = ET.fromstring(data)
    return ["".join(t.itertext()).strip() for t in root.iter("{http://www.w3.org/2000/svg}text")]


def _row(doc, setting, site):
    return next(r for r in doc["results"] if r["setting"] == setting and r["test_site"] == site
                and r["model"] == "global" and r["evaluation"] == "split")


def _curves(ax):
    return [line for line in ax.get_lines() if line.get_label() != "chance" and not line.get_label().startswith("_")]


def test_roc_legend_gives_each_settings_auc_and_the_title_says_what_the_band_is(run, doc):
    texts = _svg_texts(plot_files(run, doc)["roc_site-0.svg"]())
    for setting in ("Single", "Mix", "FedAvg", "FedSGD"):
        auc = _row(doc, setting, "site-0")["metrics"]["auc"]
        assert auc["std"] is not None
        assert f"{setting}: AUC {format_metric(auc)}" in texts  # the table's mean ± std, in the legend
    assert any(f"±1 sample std over {REPEATS} repeats" in t for t in texts)
    assert "chance" in texts
    assert any("false-positive rate" in t for t in texts) and any("true-positive rate" in t for t in texts)


def test_tpr_on_grid_interpolates_between_points_and_takes_the_top_of_a_vertical_rise():
    fpr = np.array([0.0, 0.0, 0.5, 0.5, 1.0])
    tpr = np.array([0.0, 0.5, 0.5, 1.0, 1.0])
    got = tpr_on_grid(fpr, tpr, np.array([0.0, 0.25, 0.5 - 1e-9, 0.5, 0.75, 1.0]))
    np.testing.assert_allclose(got, [0.5, 0.5, 0.5, 1.0, 1.0, 1.0], atol=1e-8)
    # a diagonal segment from tied scores: halfway along it, halfway up
    np.testing.assert_allclose(tpr_on_grid(np.array([0.0, 1.0]), np.array([0.0, 1.0]), np.array([0.3])), [0.3])


def test_the_vertical_average_has_the_mean_auc_of_the_repeats_as_its_area():
    rng = np.random.default_rng(1)
    grid = np.linspace(0, 1, 100_001)
    curves, aucs = [], []
    for _ in range(4):
        y = np.r_[np.zeros(4), np.ones(7)]
        s = np.round(rng.normal(size=11) + y, 1)  # rounded: ties give diagonal segments
        aucs.append(roc_auc(y, s))
        curves.append(tpr_on_grid(*roc_curve(y, s), grid))
    mean = np.mean(curves, axis=0)
    area = float(np.sum((mean[1:] + mean[:-1]) / 2 * np.diff(grid)))
    assert area == pytest.approx(np.mean(aucs), abs=1e-4)


def test_roc_draws_the_mean_of_the_repeats_curves_with_a_band_on_a_square_plot(run):
    fig = roc_figure(run, "site-1")
    ax = fig.axes[0]
    cell = next(c for c in run.cells if c.setting == "FedAvg" and c.test_site == "site-1" and c.model == "global")
    assert len(cell.scores) == REPEATS
    expected = np.mean([tpr_on_grid(*roc_curve(y, s), ROC_GRID) for y, s in cell.scores], axis=0)
    line = next(line for line in _curves(ax) if line.get_label().startswith("FedAvg:"))
    np.testing.assert_allclose(line.get_ydata(), np.r_[0.0, expected])
    assert len(ax.collections) == len(_curves(ax))  # one band per curve
    assert ax.get_aspect() == 1.0 and ax.get_xlim() == ax.get_ylim()


def test_overlapping_curves_differ_in_colour_and_line_style(run):
    ax = roc_figure(run, "site-0").axes[0]
    curves = _curves(ax)
    styles = {(line.get_color(), line.get_linestyle()) for line in curves}
    assert len(styles) == len(curves) == 4
    assert len({line.get_linestyle() for line in curves}) == 4
    by = {line.get_label().split(":")[0]: line for line in curves}
    fedavg, fedsgd = by["FedAvg"], by["FedSGD"]  # these two often coincide
    assert fedavg.get_color() != fedsgd.get_color() and fedavg.get_linestyle() != fedsgd.get_linestyle()
    assert fedavg.get_marker() != fedsgd.get_marker()


def test_convergence_has_a_band_per_method_and_says_what_the_band_and_the_axis_are(run, doc):
    texts = _svg_texts(plot_files(run, doc)["convergence.svg"]())
    assert any(f"±1 sample std over {REPEATS} repeats" in t for t in texts)
    assert "gradient steps per site" in texts and any("training loss" in t for t in texts)
    assert "FedAvg (global model)" in texts and "FedSGD (global model)" in texts
    ax = convergence_figure(run).axes[0]
    fedsgd = next(line for line in ax.get_lines() if line.get_label().startswith("FedSGD"))
    losses = np.vstack(doc["histories"]["FedSGD"]["train_loss"])
    np.testing.assert_allclose(fedsgd.get_ydata(), losses.mean(axis=0))
    np.testing.assert_array_equal(fedsgd.get_xdata(), np.arange(12))  # one step per FedSGD round
    assert len(ax.collections) == 2


def test_convergence_counts_rounds_when_local_epochs_set_the_steps():
    run = run_experiment(_config(methods=["fedavg"], repeats=2, eval_every=0,
                                 training={"rounds": 3, "local_epochs": 1, "batch_size": 16}), synthetic_federation())
    assert convergence_figure(run).axes[0].get_xlabel() == "communication rounds"


def test_a_loss_that_blows_up_is_drawn_on_a_log_scale(run):
    assert convergence_figure(run).axes[0].get_yscale() == "linear"
    blown = run_experiment(_config(methods=["fedavg"], repeats=1, eval_every=0, training={"rounds": 4, "lr": 1e6}),
                           synthetic_federation())
    assert convergence_figure(blown).axes[0].get_yscale() == "log"


def test_a_method_without_a_global_model_has_no_global_model_curve():
    pytest.importorskip("torch")
    config = _config(model="mlp", model_options={"hidden": [4]}, methods=["fedavg", "fedper"], repeats=2,
                     training={"rounds": 2, "local_steps": 1})
    run = run_experiment(config, synthetic_federation(sizes=(30, 24)))
    labels = [line.get_label() for line in convergence_figure(run).axes[0].get_lines()]
    assert "FedAvg (global model)" in labels
    fedper = [label for label in labels if label.startswith("FedPer")]
    assert fedper == ["FedPer (each site's model: shared part + its private layers)"]
    # and no per-round test metrics of a "global model" FedPer does not have
    assert all(not h.evaluation for h in run.histories if h.setting == "FedPer")
    assert any(h.evaluation for h in run.histories if h.setting == "FedAvg")


def test_every_metric_is_recorded_per_site_per_evaluated_round(doc):
    runs = doc["histories"]["FedAvg"]["evaluation"]
    assert len(runs) == REPEATS
    for repeat, entries in enumerate(runs):
        assert [e["round"] for e in entries] == [1, 3, 5]  # every 2nd of 6 rounds, 0-based
        for e in entries:
            assert set(e["test_metrics"]) == {"site-0", "site-1", "site-2"}
            for site, metrics in e["test_metrics"].items():
                assert set(metrics) == set(BINARY.keys)
                assert e["test_auc"][site] == metrics["auc"]  # the old key stays
        # after the last round the global model is the one the table scores
        for site in ("site-0", "site-1", "site-2"):
            row = _row(doc, "FedAvg", site)
            for m in BINARY.keys:
                assert entries[-1]["test_metrics"][site][m] == row["metrics"][m]["values"][repeat]
    json.dumps(doc, allow_nan=False)


def test_per_round_metric_figures_plot_the_mean_over_repeats(run, doc):
    files = plot_files(run, doc)
    for m in BINARY.screen:  # the headline metrics have figures
        texts = _svg_texts(files[f"test_{m}.svg"]())
        assert any(f"±1 sample std over {REPEATS} repeats" in t for t in texts)
    ax = metric_figure(run, "acc").axes[0]
    assert ax.get_title() == "site-0"
    line = next(line for line in ax.get_lines() if line.get_label() == "FedAvg")
    runs = doc["histories"]["FedAvg"]["evaluation"]
    values = [[e["test_metrics"]["site-0"]["acc"] for e in entries] for entries in runs]
    np.testing.assert_allclose(line.get_ydata(), np.mean(values, axis=0))
    np.testing.assert_array_equal(line.get_xdata(), [4, 8, 12])  # after rounds 2, 4, 6; 2 steps each


def _positive_test_rows_federation():
    """site-2's test rows are all positive: its SPE and AUC are undefined in every round."""
    fed = synthetic_federation(sizes=(40, 40, 30))
    sites = []
    for k, s in enumerate(fed.sites):
        split = np.zeros(s.n, dtype=bool)
        split[: int(0.75 * s.n)] = True
        y = s.y.copy()
        if k == 2:
            y[:10], y[10:20], y[~split] = 0, 1, 1
        sites.append(Site(s.name, s.X, y, split))
    return Federation("one-class test rows", tuple(sites), fed.feature_names)


def test_undefined_metrics_are_recorded_as_null_and_not_plotted():
    run = run_experiment(_config(methods=["fedavg"], repeats=1), _positive_test_rows_federation())
    doc = results_document(run)
    for e in doc["histories"]["FedAvg"]["evaluation"][0]:
        assert e["test_metrics"]["site-2"]["spe"] is None and e["test_metrics"]["site-2"]["auc"] is None
        assert e["test_metrics"]["site-2"]["sen"] is not None
    fig = metric_figure(run, "spe")
    panel = next(ax for ax in fig.axes if ax.get_title() == "site-2")
    assert not panel.get_lines()  # nothing drawn as if it were a number
    assert any("undefined" in t.get_text() for t in panel.texts)
    sen = next(ax for ax in metric_figure(run, "sen").axes if ax.get_title() == "site-2")
    assert len(sen.get_lines()) == 1


def test_site_names_that_sanitize_alike_get_distinct_stable_file_names():
    stems = file_stems(["a/b", "a b", "c", "X", "x"])
    assert len(set(stems.values())) == 5
    assert stems["c"] == "c"  # names without a collision keep their plain name
    assert stems["a/b"].startswith("a_b-") and stems["a b"].startswith("a_b-")
    assert len({s.casefold() for s in stems.values()}) == 5  # distinct on case-insensitive disks too
    assert file_stems(["a b", "a/b"]) == {"a b": stems["a b"], "a/b": stems["a/b"]}  # order does not matter


def test_colliding_site_names_write_one_roc_file_each(tmp_path):
    fed = synthetic_federation(sizes=(30, 30, 30))
    fed = Federation("names", tuple(Site(n, s.X, s.y) for n, s in zip(["a/b", "a b", "c"], fed.sites)),
                     fed.feature_names)
    run = run_experiment(_config(methods=["fedavg"], repeats=1, eval_every=0, plot_formats=["png"]), fed)
    doc = results_document(run)
    written = write_atomically(tmp_path, plot_files(run, doc))
    rocs = sorted(p.name for p in written if p.name.startswith("roc_"))
    assert len(rocs) == 3 and "roc_c.png" in rocs
    assert rocs == sorted(n for n in plot_files(run, doc) if n.startswith("roc_"))  # the same names every time


def test_plot_formats_default_to_png_and_refuse_unknown_ones():
    assert _config(plot_formats=["png"]).plot_formats == ["png"]
    assert build_config({"data": {"dataset": "adni-like"}}).plot_formats == ["png"]
    assert _config(plot_formats=["SVG", "pdf", "svg"]).plot_formats == ["svg", "pdf"]
    for bad in (["jpg"], []):
        with pytest.raises(ConfigError, match=r"plot_formats.*png, pdf, svg"):
            _config(plot_formats=bad)


def test_plots_render_the_same_bytes_every_time(run, doc):
    pdf_run = dataclasses.replace(run, config=run.config.model_copy(update={"plot_formats": ["pdf", "svg"]}))
    first, second = plot_files(pdf_run, doc), plot_files(pdf_run, doc)
    for name in ("roc_site-0.pdf", "roc_site-0.svg"):
        assert first[name]() == second[name]()


runner = CliRunner()


def test_run_and_reproduce_take_plot_format(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "--dataset", "adni-like", "--methods", "fedavg", "--rounds", "3",
                                 "--repeats", "2", "--plot-format", "pdf,svg", "--out", str(out)])
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    assert {"roc_ADNI-1.pdf", "roc_ADNI-1.svg", "convergence.pdf", "convergence.svg"} <= names
    assert not any(n.endswith(".png") for n in names)  # --plot-format implies --plots, and only those formats
    assert (out / "convergence.pdf").read_bytes().startswith(b"%PDF")
    ET.fromstring((out / "roc_ADNI-1.svg").read_bytes())
    assert json.loads((out / "results.json").read_text())["config"]["plot_formats"] == ["pdf", "svg"]

    out = tmp_path / "reproduce"
    result = runner.invoke(app, ["reproduce", "--repeats", "1", "--methods", "fedavg", "--plot-format", "svg",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "roc_ADNI-2.svg").exists() and not (out / "roc_ADNI-2.png").exists()


def test_an_unknown_plot_format_is_one_line_before_any_work(tmp_path):
    result = runner.invoke(app, ["run", "--dataset", "adni-like", "--plot-format", "png,jpg",
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "'jpg' is not a plot format" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
