"""Plots of a run, fit for a paper: ROC per test site, training loss per federated method and,
with ``eval_every``, the test metrics per evaluated round.

Every curve is a mean over repeats with a band of ±1 sample standard deviation (the table's
spread, ``STD_DDOF``), and each figure's title says so. Curves differ in colour, line style
and marker at once, so curves that coincide (FedAvg and FedSGD often do) stay visible. Text
stays text in SVG and PDF, so a figure can be edited for a paper. Figures are built on
``matplotlib.figure.Figure`` (no pyplot state); matplotlib is imported inside the functions
only, and only when plots are asked for.
"""

from __future__ import annotations

import functools
import hashlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medfed.experiments.harness import Cell, ExperimentRun, History
from medfed.experiments.metrics import BINARY, roc_curve
from medfed.experiments.results import STD_DDOF, format_metric, summarize

# the FPR grid the repeats' ROC curves are averaged on (vertical averaging)
ROC_GRID = np.linspace(0.0, 1.0, 501)
METRIC_NAMES = {"acc": "accuracy (ACC)", "sen": "sensitivity (SEN)", "spe": "specificity (SPE)", "auc": "AUC"}

# matplotlib's Tableau colours, spelled out so a user's style sheet cannot change them; 10 colours
# and 4 line styles repeat together only after 20 curves, and 7 markers (staggered along each
# curve) tell apart curves drawn on top of each other
COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple",
           "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan")
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def curve_style(i: int, points: int | None = None) -> dict[str, Any]:
    """The ``i``-th curve's colour, line style and marker. Markers are hollow, so two shapes
    on one point both show; on a curve of many ``points`` (or unknown) they sit every tenth
    of its length, starting at staggered places so that coinciding curves' markers differ."""
    few = points is not None and points <= 15
    return {
        "color": COLOURS[i % len(COLOURS)],
        "linestyle": LINESTYLES[i % len(LINESTYLES)],
        "marker": MARKERS[i % len(MARKERS)],
        "markevery": None if few else (0.02 * (i % 5), 0.1),
        "markerfacecolor": "none",
        "markersize": 5,
        "linewidth": 1.4,
    }


@dataclass(frozen=True)
class Band:
    """Mean over repeats and mean ± 1 sample std at each point; NaN where too few repeats
    have a value (no mean without one, no band without ``STD_DDOF + 1``)."""

    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray


def mean_band(values: np.ndarray) -> Band:
    """``values`` is repeats x points, NaN where a repeat has no value there (undefined,
    diverged): those are left out, never counted as numbers."""
    values = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(values)
    n = ok.sum(axis=0)
    filled = np.where(ok, values, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, filled.sum(axis=0) / n, np.nan)
        sq = np.where(ok, (values - mean) ** 2, 0.0).sum(axis=0)
        std = np.where(n > STD_DDOF, np.sqrt(sq / (n - STD_DDOF)), np.nan)
    return Band(mean, mean - std, mean + std)


def tpr_on_grid(fpr: np.ndarray, tpr: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """One ROC curve's true-positive rate at each FPR of ``grid`` (vertical averaging, Fawcett
    2006): linear between the curve's points (a diagonal where scores tie); where the curve
    rises vertically (positives scored above the next negative) the top of the rise."""
    j = np.searchsorted(fpr, grid, side="right") - 1  # last point at or left of each grid FPR
    k = np.minimum(j + 1, fpr.size - 1)
    span = fpr[k] - fpr[j]
    w = np.divide(grid - fpr[j], span, out=np.zeros_like(grid, dtype=np.float64), where=span > 0)
    return tpr[j] + w * (tpr[k] - tpr[j])


def band_text(repeats: int) -> str:
    if repeats <= STD_DDOF:
        return f"{repeats} repeat, no band"
    return f"mean, band ±1 sample std over {repeats} repeats"


def _render(fig, fmt: str) -> bytes:
    """The figure's bytes; text kept as text (SVG, PDF Type 42) and no dates or random ids,
    so the same run writes the same files."""
    import matplotlib

    metadata = {"png": {"Software": None}, "pdf": {"CreationDate": None}, "svg": {"Date": None}}[fmt]
    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "pdf.fonttype": 42, "svg.hashsalt": "medfed"}):
        fig.savefig(buf, format=fmt, dpi=200, bbox_inches="tight", metadata=metadata)
    return buf.getvalue()


def _render_all(build: Callable[[], Any], formats: Sequence[str]) -> dict[str, bytes]:
    fig = build()
    return {fmt: _render(fig, fmt) for fmt in formats}


def _figure(**kw):
    from matplotlib.figure import Figure

    return Figure(**kw)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def file_stems(names: Sequence[str]) -> dict[str, str]:
    """A file-name stem per name: the name with characters other than letters, digits, ``-``
    and ``_`` replaced by ``_``; where two names would share a stem (``a/b`` and ``a b``,
    or ``A`` and ``a`` on a case-insensitive disk), each of them gets the first 8 hex digits
    of its raw name's SHA-256, so the stems are distinct and the same on every run."""
    safe = {name: _safe(name) for name in names}
    taken: dict[str, int] = {}
    for stem in safe.values():
        taken[stem.casefold()] = taken.get(stem.casefold(), 0) + 1
    return {
        name: stem if taken[stem.casefold()] == 1 else f"{stem}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
        for name, stem in safe.items()
    }


def _cell_label(cell: Cell) -> str:
    label = cell.setting if cell.setting != "Cross" else f"Cross ({cell.train_site} tr)"
    if cell.model == "personal":
        label += " · personal"
    if cell.evaluation == "loso":
        label += " (site unseen)"
    elif cell.evaluation == "loso+adapt":
        label += " (site unseen, adapted)"
    return label


def _legend(ax, title: str | None = None) -> None:
    # outside the axes, so it never covers a curve and the plot stays square
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, title=title, title_fontsize=7,
              frameon=False)


def roc_figure(run: ExperimentRun, test_site: str):
    """Per setting, the mean of the repeats' ROC curves on ``test_site`` with its band; the
    legend gives each setting's AUC (mean ± sample std over repeats, as in the table)."""
    fig = _figure(figsize=(7.5, 4.6))
    ax = fig.subplots()
    repeats = run.config.repeats
    i = 0
    for cell in run.cells:
        if cell.test_site != test_site:
            continue
        curves = [roc_curve(y, s) for y, s in cell.scores if y.min() != y.max()]
        if not curves:  # not computable, or one class in every repeat's test rows
            continue
        band = mean_band(np.vstack([tpr_on_grid(f, t, ROC_GRID) for f, t in curves]))
        auc = summarize(cell.metrics["auc"])
        label = f"{_cell_label(cell)}: AUC {format_metric(auc)}"
        if auc["n"] < repeats:
            label += f" ({auc['n']} of {repeats} repeats)"
        style = curve_style(i)
        # every curve starts at (0, 0): the grid's first value is the top of the rise at FPR 0
        ax.plot(np.r_[0.0, ROC_GRID], np.r_[0.0, band.mean], label=label, **style)
        ax.fill_between(ROC_GRID, np.clip(band.low, 0, 1), np.clip(band.high, 0, 1), color=style["color"],
                        alpha=0.15, linewidth=0)
        i += 1
    ax.plot([0, 1], [0, 1], color="black", lw=0.8, ls=(0, (2, 2)), label="chance")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("1 − specificity (false-positive rate)")
    ax.set_ylabel("sensitivity (true-positive rate)")
    ax.set_title(f"ROC on {test_site}\n{band_text(repeats)} (vertical averaging)", fontsize=9)
    _legend(ax, "AUC: mean ± sample std over repeats")
    return fig


def _x_axis(run: ExperimentRun) -> tuple[str, Callable[[History], int]]:
    """The x axis both training figures share: gradient steps per site (so FedSGD's many
    one-step rounds line up with FedAvg's), or rounds where ``local_epochs`` makes a site's
    steps per round depend on its size."""
    if run.config.training.local_epochs is None:
        return "gradient steps per site", lambda h: h.steps_per_round
    return "communication rounds", lambda h: 1


def _by_setting(run: ExperimentRun) -> dict[str, list[History]]:
    out: dict[str, list[History]] = {}
    for h in run.histories:
        out.setdefault(h.setting, []).append(h)
    return out


def _has_global_model(run: ExperimentRun) -> dict[str, bool]:
    return {spec.display: spec.global_model for spec, _ in run.methods}


def convergence_figure(run: ExperimentRun):
    """Training loss per federated method: at the start of each round, on every site's training
    rows (example-weighted), of the model each site started from. That is the global model,
    except for methods with no global model (FedBN, FedPer): there it is each site's own model
    (the shared part with the site's private layers), and the legend says so."""
    fig = _figure(figsize=(7.5, 4.2))
    ax = fig.subplots()
    xlabel, per_round = _x_axis(run)
    global_model = _has_global_model(run)
    finite: list[np.ndarray] = []
    for i, (setting, hs) in enumerate(_by_setting(run).items()):
        loss = np.vstack([h.train_loss for h in hs])
        finite.append(loss[np.isfinite(loss)])
        bad = int((~np.isfinite(loss)).any(axis=1).sum())
        band = mean_band(loss)
        x = np.arange(loss.shape[1]) * per_round(hs[0])
        label = setting + (" (global model)" if global_model.get(setting, True)
                           else " (each site's model: shared part + its private layers)")
        if bad:
            label += f" (NaN/Inf in {bad} repeat(s), left out there)"
        style = curve_style(i)
        ax.plot(x, band.mean, label=label, **style)
        ax.fill_between(x, band.low, band.high, color=style["color"], alpha=0.15, linewidth=0)
    values = np.concatenate(finite) if finite else np.empty(0)
    if values.size and values.min() > 0 and values.max() > 1e3 * values.min():  # a blown-up loss flattens the rest
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("training loss (all sites' rows,\nexample-weighted)")
    ax.set_title(f"Training loss at the start of each round\n{band_text(run.config.repeats)}", fontsize=9)
    _legend(ax)
    return fig


def evaluated_settings(run: ExperimentRun) -> dict[str, list[History]]:
    """The settings whose global model was tested during training (``eval_every``)."""
    return {s: hs for s, hs in _by_setting(run).items() if any(h.evaluation for h in hs)}


def _metric_values(hs: list[History], site: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Evaluated rounds (0-based) and repeats x rounds values; undefined (None) become NaN."""
    rounds = sorted({e["round"] for h in hs for e in h.evaluation})
    col = {r: k for k, r in enumerate(rounds)}
    values = np.full((len(hs), len(rounds)), np.nan)
    for i, h in enumerate(hs):
        for e in h.evaluation:
            v = e["test_metrics"].get(site, {}).get(metric)
            if v is not None:
                values[i, col[e["round"]]] = v
    return np.asarray(rounds), values


def metric_figure(run: ExperimentRun, metric: str):
    """One test metric of each federated method's global model per evaluated round, a panel
    per test site; a metric undefined on a site's test rows (one class) is not drawn."""
    sites = run.federation.site_names
    cols = min(len(sites), 3)
    rows = -(-len(sites) // cols)
    fig = _figure(figsize=(3.4 * cols + 2.6, 3.0 * rows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False)).ravel()
    xlabel, per_round = _x_axis(run)
    for ax, site in zip(axes, sites):
        drawn = False
        for i, (setting, hs) in enumerate(evaluated_settings(run).items()):
            rounds, values = _metric_values(hs, site, metric)
            band = mean_band(values)
            if not np.isfinite(band.mean).any():
                continue
            x = (rounds + 1) * per_round(hs[0])  # evaluated after the round
            style = curve_style(i, len(x))
            ax.plot(x, band.mean, label=setting, **style)
            ax.fill_between(x, band.low, band.high, color=style["color"], alpha=0.15, linewidth=0)
            drawn = True
        if not drawn:
            ax.text(0.5, 0.5, f"{metric.upper()} undefined on these test rows", ha="center", va="center",
                    transform=ax.transAxes, fontsize=8)
        ax.set_title(site, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"test {METRIC_NAMES[metric]}")
    for ax in axes[len(sites):]:
        ax.set_axis_off()
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        h, lab = ax.get_legend_handles_labels()
        handles += [x for x, name in zip(h, lab) if name not in labels]
        labels += [name for name in lab if name not in labels]
    fig.legend(handles, labels, loc="outside right upper", fontsize=7, frameon=False)
    every = run.config.eval_every
    fig.suptitle(f"Test {METRIC_NAMES[metric]} of the global model, every {every} round(s) and after the last\n"
                 f"{band_text(run.config.repeats)}", fontsize=9)
    return fig


def site_effect_figure(harmonization: dict[str, Any]):
    """Harmonization's site effect: each feature's between-site share of variance before and
    after (mean over repeats, features sorted by the first), the site-classifier AUCs in the title."""
    fig = _figure(figsize=(7.5, 3.6))
    ax = fig.subplots()
    before = np.array(list(harmonization["before"]["variance_ratio"].values()))
    after = np.array(list(harmonization["after"]["variance_ratio"].values()))
    order = np.argsort(before)[::-1]
    x = np.arange(before.size)
    ax.plot(x, before[order], label="before", **curve_style(0))
    ax.plot(x, after[order], label="after", **curve_style(1))
    ax.set_xlabel("feature (sorted by the share before)")
    ax.set_ylabel("between-site share of variance")
    ax.set_title(f"{harmonization['method']}: site-classifier AUC {harmonization['before']['site_auc_mean']:.3f} "
                 f"-> {harmonization['after']['site_auc_mean']:.3f} (test rows)", fontsize=9)
    _legend(ax)
    return fig


def plot_files(run: ExperimentRun, doc: dict[str, Any]) -> dict[str, Callable[[], bytes]]:
    """Every plot in every format of ``run.config.plot_formats``, by file name. A figure is
    built once and rendered in all its formats on first use."""
    figures: dict[str, Callable[[], Any]] = {
        f"roc_{stem}": functools.partial(roc_figure, run, site)
        for site, stem in file_stems(run.federation.site_names).items()
    }
    if run.histories:
        figures["convergence"] = functools.partial(convergence_figure, run)
    if evaluated_settings(run):
        figures.update({f"test_{m}": functools.partial(metric_figure, run, m) for m in BINARY.screen})
    if doc.get("harmonization"):
        figures["site_effect"] = functools.partial(site_effect_figure, doc["harmonization"])
    formats = run.config.plot_formats
    files: dict[str, Callable[[], bytes]] = {}
    for stem, build in figures.items():
        rendered = functools.cache(functools.partial(_render_all, build, formats))
        for fmt in formats:
            files[f"{stem}.{fmt}"] = lambda rendered=rendered, fmt=fmt: rendered()[fmt]
    return files
