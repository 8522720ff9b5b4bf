"""Plots of a run, fit for a paper: per test site the task's own figure (binary: ROC;
multiclass: a confusion matrix per setting and one-vs-rest ROC per class; multilabel: ROC per
label; regression: predicted against true values per setting; segmentation: example overlays),
training loss per federated method and, with ``eval_every``, the test metrics per evaluated round.

File names (``<stem>.<format>`` for each of ``plot_formats``; ``<site>`` is the test site's
:func:`file_stems` stem): binary ``roc_<site>``; multiclass ``confusion_<site>`` and ``roc_<site>``;
multilabel ``roc_<site>``; regression ``scatter_<site>``; segmentation ``overlay_<site>`` (one
file per test site: :data:`~medfed.experiments.harness.SEGMENTATION_EXAMPLES` test images of
repeat 1, a row each, a column per setting); then ``convergence`` (federated methods),
``test_<metric>`` (with ``eval_every``) and ``site_effect`` (with harmonization).

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
from medfed.experiments.metrics import METRIC_LABELS, metric_set, roc_auc, roc_curve
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


def _panels(n: int, width: float = 3.2, height: float = 3.0):
    """A figure with ``n`` panels, at most 3 a row, the unused ones hidden; (figure, axes)."""
    cols = min(n, 3)
    rows = -(-n // cols)
    fig = _figure(figsize=(width * cols + 1.6, height * rows + 0.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes[n:]:
        ax.set_axis_off()
    return fig, axes[:n]


def _scored_cells(run: ExperimentRun, test_site: str) -> list[Cell]:
    """The cells tested on ``test_site`` that have predictions in at least one repeat."""
    return [c for c in run.cells if c.test_site == test_site and c.scores]


def _repeats_text(cell: Cell, repeats: int) -> str:
    return f"{len(cell.scores)} repeat{'s' * (len(cell.scores) != 1)} pooled" + (
        f" (of {repeats})" if len(cell.scores) < repeats else "")


def confusion_figure(run: ExperimentRun, test_site: str):
    """Multiclass: per setting, the confusion matrix on ``test_site``'s test rows, counts summed
    over the repeats and each row (true class) divided by its total, so a cell reads as the
    share of that class predicted as the column's class (the diagonal: per-class sensitivity);
    a row predicts its most probable class, as the metrics do."""
    classes = run.federation.classes
    K = len(classes)
    cells = _scored_cells(run, test_site)
    fig, axes = _panels(max(len(cells), 1), 0.45 * K + 2.0, 0.45 * K + 1.8)
    image = None
    for ax, cell in zip(axes, cells):
        counts = np.zeros((K, K))
        for y, p in cell.scores:
            np.add.at(counts, (np.asarray(y, dtype=np.intp), np.argmax(p, axis=1)), 1)
        totals = counts.sum(axis=1, keepdims=True)
        share = np.divide(counts, totals, out=np.full_like(counts, np.nan), where=totals > 0)
        image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
        for i, j in np.ndindex(K, K):
            if np.isfinite(share[i, j]):
                ax.text(j, i, f"{share[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.6 else "black")
        ax.set_xticks(range(K), classes, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(K), classes, fontsize=7)
        ax.set_xlabel("predicted class", fontsize=8)
        ax.set_ylabel("true class", fontsize=8)
        acc = summarize(cell.metrics["acc"])
        ax.set_title(f"{_cell_label(cell)}\nACC {format_metric(acc)}; {_repeats_text(cell, run.config.repeats)}",
                     fontsize=8)
    if image is None:
        axes[0].text(0.5, 0.5, "no setting could be scored here", ha="center", va="center", fontsize=8,
                     transform=axes[0].transAxes)
        axes[0].set_axis_off()
    else:
        fig.colorbar(image, ax=list(axes), shrink=0.8, label="share of the true class's test rows")
    fig.suptitle(f"Confusion matrices on {test_site} (rows: true class, normalized)", fontsize=9)
    return fig


def per_output_roc_figure(run: ExperimentRun, test_site: str):
    """Multiclass (one class against the rest) and multilabel (each label): a panel per class
    with, per setting, the mean of the repeats' ROC curves of that class's probability on
    ``test_site``, its band, and its AUC in the legend (mean ± sample std over the repeats
    where the class and its complement both occur in the test rows)."""
    task, names = run.federation.task, run.federation.classes
    repeats = run.config.repeats
    cells = _scored_cells(run, test_site)
    fig, axes = _panels(len(names), 3.2, 3.2)
    for k, (ax, name) in enumerate(zip(axes, names)):
        i = 0
        for cell in cells:
            truth = [(np.asarray(y)[:, k] == 1) if task == "multilabel" else (np.asarray(y) == k) for y, _ in cell.scores]
            both = [(t, p[:, k]) for t, (_, p) in zip(truth, cell.scores) if t.min() != t.max()]
            if not both:
                continue
            band = mean_band(np.vstack([tpr_on_grid(*roc_curve(t, p), ROC_GRID) for t, p in both]))
            aucs = [roc_auc(t, p) for t, p in both]
            auc = f"{np.mean(aucs):.3f}" + (f" ± {np.std(aucs, ddof=STD_DDOF):.3f}" if len(aucs) > STD_DDOF else "")
            style = curve_style(i)
            ax.plot(np.r_[0.0, ROC_GRID], np.r_[0.0, band.mean], label=f"{_cell_label(cell)}: AUC {auc}", **style)
            ax.fill_between(ROC_GRID, np.clip(band.low, 0, 1), np.clip(band.high, 0, 1), color=style["color"],
                            alpha=0.15, linewidth=0)
            i += 1
        ax.plot([0, 1], [0, 1], color="black", lw=0.8, ls=(0, (2, 2)), label="chance")
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_aspect("equal")
        ax.set_xlabel("1 − specificity (FPR)", fontsize=8)
        ax.set_ylabel("sensitivity (TPR)", fontsize=8)
        ax.set_title(f"{name} vs rest" if task == "multiclass" else f"label {name}", fontsize=8)
        ax.legend(loc="lower right", fontsize=6, frameon=False)
    what = "one class vs the rest" if task == "multiclass" else "per label"
    fig.suptitle(f"ROC on {test_site}, {what}\n{band_text(repeats)} (vertical averaging)", fontsize=9)
    return fig


def scatter_figure(run: ExperimentRun, test_site: str):
    """Regression: per setting, every repeat's predictions on ``test_site``'s test rows against
    the true values (a colour per repeat), the identity line, and MAE and R² as in the table."""
    cells = _scored_cells(run, test_site)
    fig, axes = _panels(max(len(cells), 1), 3.0, 3.0)
    values = np.concatenate([np.r_[np.ravel(y), np.ravel(p)] for c in cells for y, p in c.scores] or [np.zeros(1)])
    low, high = float(values.min()), float(values.max())
    pad = 0.04 * (high - low or 1.0)
    for ax, cell in zip(axes, cells):
        for r, (y, p) in enumerate(cell.scores):
            ax.scatter(y, p, s=6, alpha=0.6, color=COLOURS[r % len(COLOURS)], marker=MARKERS[r % len(MARKERS)],
                       linewidths=0, label=f"repeat {r + 1}" if len(cell.scores) <= len(COLOURS) else None)
        ax.plot([low - pad, high + pad], [low - pad, high + pad], color="black", lw=0.8, ls=(0, (2, 2)),
                label="prediction = truth")
        ax.set_xlim(low - pad, high + pad)
        ax.set_ylim(low - pad, high + pad)
        ax.set_aspect("equal")
        ax.set_xlabel("true value", fontsize=8)
        ax.set_ylabel("predicted value", fontsize=8)
        mae, r2 = summarize(cell.metrics["mae"]), summarize(cell.metrics["r2"])
        ax.set_title(f"{_cell_label(cell)}\nMAE {format_metric(mae)}, R² {format_metric(r2)}", fontsize=8)
        ax.legend(loc="upper left", fontsize=6, frameon=False, markerscale=2)
    if not cells:
        axes[0].text(0.5, 0.5, "no setting could be scored here", ha="center", va="center", fontsize=8,
                     transform=axes[0].transAxes)
        axes[0].set_axis_off()
    fig.suptitle(f"Predicted vs true on {test_site}, test rows of every repeat", fontsize=9)
    return fig


# an overlay's colours: the true mask's contour and the predicted mask (filled, with a contour), per
# foreground class; a class beyond these reuses them (ColorBrewer Set1 reds/blues stand out on grey)
TRUE_COLOUR = "#ffff33"
PREDICTED_COLOURS = ("#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00")
EMPTY_DICE = "undefined (no foreground)"


def axial_index(mask: np.ndarray, axial_axis: int) -> int | None:
    """Which axial slice of a 3D ``mask`` an overlay shows: the one holding most of its foreground
    (the middle slice of a volume would often miss a small lesion), the middle one without any;
    None for a 2D mask."""
    if mask.ndim == 2:
        return None
    other = tuple(a for a in range(mask.ndim) if a != axial_axis)
    counts = (mask > 0).sum(axis=other)
    return int(np.argmax(counts)) if counts.any() else mask.shape[axial_axis] // 2


def axial_slice(volume: np.ndarray, axial_axis: int, index: int | None) -> np.ndarray:
    """A 2D image as is; of a 3D volume (spatial axes only) slice ``index`` across ``axial_axis``.
    A RAS volume (the NIfTI loader's order, axial axis 2) is turned so that anterior is up and
    the subject's left on the left, as the phantom's slices are."""
    if index is None:
        return volume
    plane = np.take(volume, index, axis=axial_axis)
    return np.rot90(plane) if axial_axis == 2 else plane


def image_dice(mask: np.ndarray, probabilities: np.ndarray, classes: tuple[str, ...]) -> float | None:
    """One test image's Dice as the table computes it (mean over its foreground classes present),
    None where its true mask holds no foreground class."""
    from medfed.experiments.metrics import segmentation_metrics

    return segmentation_metrics(mask[None], probabilities[None], classes)["dice"].value


def overlay_figure(run: ExperimentRun, test_site: str):
    """Segmentation: the first scored repeat's predictions of a few test images of ``test_site`` (the harness's
    :func:`~medfed.experiments.harness.example_rows`: images with a lesion first), a row per
    image and a column per setting: the image in grey (its own intensity range), the true mask's
    contour and the predicted mask filled and contoured, the image's Dice in each title. 3D: the
    axial slice of :func:`axial_index` (not the middle one: a small lesion is seldom
    there), its number in the title, the Dice over the whole volume."""
    from matplotlib.colors import ListedColormap
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    classes = run.federation.classes
    axial = run.federation.info.get("axial_axis")
    axial = 2 if axial is None else int(axial)  # RAS unless the data set says otherwise
    cells = [c for c in _scored_cells(run, test_site) if c.images]
    rows = max((len(c.images[0]) for c in cells), default=1)
    fig = _figure(figsize=(2.5 * max(len(cells), 1) + 0.4, 2.6 * rows + 0.9), layout="constrained")
    axes = fig.subplots(rows, max(len(cells), 1), squeeze=False)
    fill = ListedColormap([PREDICTED_COLOURS[(k - 1) % len(PREDICTED_COLOURS)] for k in range(1, len(classes))])
    for col, cell in enumerate(cells):
        (masks, probabilities), images = cell.scores[0], cell.images[0]
        repeat = cell.skipped.index(None) + 1  # the first repeat the setting was scored in
        for row in range(rows):
            ax = axes[row, col]
            ax.set_axis_off()
            if row >= len(images):
                continue
            index = axial_index(masks[row], axial)
            truth = axial_slice(masks[row], axial, index)
            predicted = axial_slice(np.argmax(probabilities[row], axis=0), axial, index)
            ax.imshow(axial_slice(images[row][0], axial, index), cmap="gray", interpolation="nearest")
            ax.imshow(np.ma.masked_equal(predicted, 0), cmap=fill, vmin=1, vmax=max(len(classes) - 1, 1), alpha=0.45,
                      interpolation="nearest")
            for k in range(1, len(classes)):
                colour = PREDICTED_COLOURS[(k - 1) % len(PREDICTED_COLOURS)]
                if (predicted == k).any():
                    ax.contour(predicted == k, levels=[0.5], colors=[colour], linewidths=0.8)
                if (truth == k).any():
                    ax.contour(truth == k, levels=[0.5], colors=[TRUE_COLOUR], linewidths=1.0)
            dice = image_dice(masks[row], probabilities[row], classes)
            label = _cell_label(cell) + (f" (repeat {repeat})" if repeat != 1 else "")
            where = "" if index is None else f", axial slice {index + 1}/{masks[row].shape[axial]}"
            ax.set_title(f"{label}\nimage {row + 1}{where}\nDice " + (EMPTY_DICE if dice is None else f"{dice:.3f}"),
                         fontsize=7)
    if not cells:
        axes[0, 0].text(0.5, 0.5, "no setting could be scored here", ha="center", va="center", fontsize=8,
                        transform=axes[0, 0].transAxes)
        axes[0, 0].set_axis_off()
    handles = [Line2D([], [], color=TRUE_COLOUR, lw=1.0, label="true mask (contour)")] + [
        Patch(facecolor=PREDICTED_COLOURS[(k - 1) % len(PREDICTED_COLOURS)], alpha=0.6, label=f"predicted {name}")
        for k, name in enumerate(classes[1:], start=1)]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=7, frameon=False)
    three_d = bool(cells) and cells[0].scores[0][0].ndim == 4
    where = "the axial slice with most of the true mask (Dice: whole volume)" if three_d else "test images"
    fig.suptitle(f"Segmentations on {test_site}: {where}, repeat 1 unless a column says otherwise", fontsize=9)
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


def _metric_name(metric: str) -> str:
    return METRIC_NAMES.get(metric, METRIC_LABELS.get(metric, metric))


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
            ax.text(0.5, 0.5, f"{_metric_name(metric)} undefined on these test rows", ha="center", va="center",
                    transform=ax.transAxes, fontsize=8)
        ax.set_title(site, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"test {_metric_name(metric)}")
    for ax in axes[len(sites):]:
        ax.set_axis_off()
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        h, lab = ax.get_legend_handles_labels()
        handles += [x for x, name in zip(h, lab) if name not in labels]
        labels += [name for name in lab if name not in labels]
    fig.legend(handles, labels, loc="outside right upper", fontsize=7, frameon=False)
    every = run.config.eval_every
    fig.suptitle(f"Test {_metric_name(metric)} of the global model, every {every} round(s) and after the last\n"
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
    task = run.federation.task
    per_site = {"binary": {"roc": roc_figure}, "multilabel": {"roc": per_output_roc_figure},
                "multiclass": {"confusion": confusion_figure, "roc": per_output_roc_figure},
                "regression": {"scatter": scatter_figure}, "segmentation": {"overlay": overlay_figure}}[task]
    figures: dict[str, Callable[[], Any]] = {
        f"{kind}_{stem}": functools.partial(build, run, site)
        for kind, build in per_site.items()
        for site, stem in file_stems(run.federation.site_names).items()
    }
    if run.histories:
        figures["convergence"] = functools.partial(convergence_figure, run)
    if evaluated_settings(run):
        figures.update({f"test_{m}": functools.partial(metric_figure, run, m) for m in metric_set(task).screen})
    if doc.get("harmonization"):
        figures["site_effect"] = functools.partial(site_effect_figure, doc["harmonization"])
    formats = run.config.plot_formats
    files: dict[str, Callable[[], bytes]] = {}
    for stem, build in figures.items():
        rendered = functools.cache(functools.partial(_render_all, build, formats))
        for fmt in formats:
            files[f"{stem}.{fmt}"] = lambda rendered=rendered, fmt=fmt: rendered()[fmt]
    return files
