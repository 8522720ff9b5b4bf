"""The survey's metrics (§6.2): ACC, SEN (true-positive rate), SPE (true-negative rate), AUC.

A metric that is undefined on a test set (SEN with no positives, SPE with no negatives,
AUC with one class present) is returned as ``None`` with the reason, never a made-up
number. Computed in numpy (agreement with scikit-learn is a test) to keep start-up fast.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METRICS = ("acc", "sen", "spe", "auc")


@dataclass(frozen=True, slots=True)
class Metric:
    value: float | None
    reason: str | None = None


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve as the Mann-Whitney statistic with average ranks for ties."""
    y = np.asarray(y_true).astype(bool)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    ranks = (upper - (counts - 1) / 2.0)[inverse]  # average 1-based rank of each tie group
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    y = np.asarray(y_true).astype(bool)
    order = np.argsort(-np.asarray(scores), kind="mergesort")
    s, y = np.asarray(scores)[order], y[order]
    last_of_group = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]
    tps = np.cumsum(y)[last_of_group]
    fps = (last_of_group + 1) - tps
    tpr = np.r_[0.0, tps / max(y.sum(), 1)]
    fpr = np.r_[0.0, fps / max((~y).sum(), 1)]
    return fpr, tpr


def binary_metrics(y_true: np.ndarray, scores: np.ndarray, threshold: float = 0.5,
                   ranking: np.ndarray | None = None) -> dict[str, Metric]:
    """ACC, SEN, SPE at ``threshold`` on the positive-class probability, and AUC of ``ranking``
    (the model's logits, when given: they rank the rows as the probabilities do, but do not tie
    where the sigmoid rounds to exactly 0 or 1 -- a model with large logits would otherwise
    score an AUC of 0.5 however it ranks)."""
    y = np.asarray(y_true).astype(bool)
    pred = np.asarray(scores) >= threshold
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    tp = int((pred & y).sum())
    tn = int((~pred & ~y).sum())
    out = {"acc": Metric((tp + tn) / y.size) if y.size else Metric(None, "empty test set")}
    out["sen"] = Metric(tp / n_pos) if n_pos else Metric(None, "no positive cases in the test set")
    out["spe"] = Metric(tn / n_neg) if n_neg else Metric(None, "no negative cases in the test set")
    if n_pos and n_neg:
        out["auc"] = Metric(roc_auc(y, scores if ranking is None else ranking))
    else:
        out["auc"] = Metric(None, "AUC is undefined with one class in the test set")
    return out


def model_scores(model, params, X: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """A model's positive-class probabilities and logits on ``X`` (the logits rank for AUC), or
    None when either is NaN/Inf (a diverged model: no number to report)."""
    probabilities, logits = model.predict_proba(params, X), model.decision(params, X)
    if not (np.isfinite(probabilities).all() and np.isfinite(logits).all()):
        return None
    return probabilities, logits
