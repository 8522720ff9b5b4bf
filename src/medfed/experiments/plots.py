"""Plots of a run: ROC curves per test site and training-loss convergence per federated method.

matplotlib is imported here only, and only when plots are asked for.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np

from medfed.experiments.harness import ExperimentRun
from medfed.experiments.metrics import roc_curve


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def roc_figure(run: ExperimentRun, test_site: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    for cell in run.cells:
        if cell.test_site != test_site or not cell.scores:
            continue
        y = np.concatenate([ys for ys, _ in cell.scores])
        s = np.concatenate([ss for _, ss in cell.scores])
        if y.min() == y.max():
            continue
        fpr, tpr = roc_curve(y, s)
        label = cell.setting if cell.setting != "Cross" else f"Cross ({cell.train_site} tr)"
        if cell.model == "personal":
            label += " · personal"
        if cell.evaluation == "loso":
            label += " (site unseen)"
        ax.plot(fpr, tpr, label=label, lw=1.4)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC on {test_site} (test rows of all repeats)")
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def convergence_figure(run: ExperimentRun) -> bytes:
    """Training loss of the global model against gradient steps per site, mean and range over repeats."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    by_setting: dict[str, list] = {}
    for h in run.histories:
        by_setting.setdefault(h.setting, []).append(h)
    for setting, hs in by_setting.items():
        loss = np.vstack([h.train_loss for h in hs])
        x = np.arange(loss.shape[1]) * hs[0].steps_per_round
        ax.plot(x, loss.mean(axis=0), label=setting)
        ax.fill_between(x, loss.min(axis=0), loss.max(axis=0), alpha=0.2)
    ax.set(xlabel="gradient steps per site", ylabel="training loss of the global model", title="Convergence")
    ax.legend()
    return _png(fig)


def plot_files(run: ExperimentRun, doc: dict[str, Any]) -> dict[str, Callable[[], bytes]]:
    files: dict[str, Callable[[], bytes]] = {
        f"roc_{_safe(site)}.png": (lambda site=site: roc_figure(run, site)) for site in run.federation.site_names
    }
    if run.histories:
        files["convergence.png"] = lambda: convergence_figure(run)
    return files
