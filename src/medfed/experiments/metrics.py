"""The survey's metrics (§6.2) and the decision threshold they are read at.

Binary: ACC, SEN (true-positive rate), SPE (true-negative rate), AUC, balanced accuracy
(the mean of SEN and SPE) and F1 (of the positive class). A metric that is undefined on a test
set (SEN with no positives, SPE with no negatives, AUC with one class present, F1 with no
positive case and none predicted) is returned as ``None`` with the reason, never a made-up
number. Computed in numpy (agreement with scikit-learn is a test) to keep start-up fast.

Each task declares its metric set once (:data:`METRIC_SETS`): every key ``results.json``,
the CSV and the Markdown carry, and the headline ones the terminal table shows.

**The decision threshold** (``[evaluation] threshold``, ``--threshold``) turns scores into the
predictions ACC, SEN, SPE, balanced accuracy and F1 count; AUC does not depend on it.

- ``"0.5"`` (default): a row is positive when its probability is at least 0.5;
- ``"youden"``: the threshold that maximizes TPR - FPR (Youden, 1950) on training rows;
- ``"prevalence"``: the threshold at which the fraction predicted positive on training rows
  equals their prevalence (the fraction of positive rows).

It is chosen on training rows only, never on the test rows it is applied to, per model and
per repeat (:func:`model_threshold`): a federated model's on each test site's own training rows
(a deployed site holds no other rows; the per-site offset of scanners or hospitals is what it
corrects), a centralized model's (Single, Cross, Mix) on the rows it was trained on, and a model
tested on a site it never saw (``loso``) on its training sites' pooled training rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class MetricSet:
    """What a task reports: ``keys``, every metric in ``results.json`` (and the CSV and
    Markdown), in order; ``screen``, the headline metrics the terminal table shows."""

    task: str
    keys: tuple[str, ...]
    screen: tuple[str, ...]


BINARY = MetricSet("binary", ("acc", "sen", "spe", "auc", "balanced_acc", "f1"), ("acc", "sen", "spe", "auc"))
METRIC_SETS = {m.task: m for m in (BINARY,)}
METRIC_LABELS = {"acc": "ACC", "sen": "SEN", "spe": "SPE", "auc": "AUC", "balanced_acc": "BACC", "f1": "F1"}

THRESHOLD_RULES = ("0.5", "youden", "prevalence")
DEFAULT_THRESHOLD = "0.5"
# the metrics a decision threshold decides (AUC ranks and does not)
THRESHOLDED = ("acc", "sen", "spe", "balanced_acc", "f1")


def metric_set(task: str | None = None) -> MetricSet:
    """The metric set of ``task`` (a results document's ``task``; older documents are binary)."""
    return METRIC_SETS[task or BINARY.task]


def metric_label(key: str) -> str:
    """How a table heads metric ``key``."""
    return METRIC_LABELS.get(key, key.upper())


@dataclass(frozen=True, slots=True)
class Metric:
    value: float | None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Threshold:
    """A decision threshold: its ``rule``, the value on the logit scale (``None`` where the rule
    is undefined, with the ``reason``). Rule ``"0.5"`` compares probabilities with 0.5, as
    every run before the rules existed did (logit 0 up to the sigmoid's rounding)."""

    rule: str
    logit: float | None
    reason: str | None = None

    @property
    def probability(self) -> float | None:
        """The threshold on the probability scale (what ``medfed predict``'s scores compare to)."""
        if self.rule == DEFAULT_THRESHOLD:
            return 0.5
        return None if self.logit is None else float(0.5 * (1.0 + np.tanh(0.5 * self.logit)))

    def predict(self, probabilities: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """Which rows are predicted positive."""
        if self.rule == DEFAULT_THRESHOLD:
            return np.asarray(probabilities) >= 0.5
        return np.asarray(logits) >= self.logit


HALF = Threshold(DEFAULT_THRESHOLD, 0.0)


def _groups(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct scores from highest to lowest and, predicting positive every row scoring at
    least each, the true and false positives."""
    order = np.argsort(-np.asarray(scores), kind="mergesort")
    s, y = np.asarray(scores)[order], np.asarray(y).astype(bool)[order]
    last_of_group = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]
    tps = np.cumsum(y)[last_of_group]
    return s[last_of_group], tps, (last_of_group + 1) - tps


def choose_threshold(rule: str, y_train: np.ndarray, logits: np.ndarray) -> Threshold:
    """The threshold ``rule`` picks on training rows (labels ``y_train``, the model's ``logits``).

    Candidates are the distinct training scores (a row is positive when it scores at least the
    threshold); the value returned is the midpoint between the chosen score and the next lower
    one, so a test row scoring between two training rows is not decided by which side it
    touches (the lowest score itself where it is chosen). ``youden``: the largest TPR - FPR,
    the highest such threshold on ties, at least one row predicted positive; ``prevalence``: the
    predicted-positive count nearest the positive count (exact without ties at the boundary),
    the higher threshold on ties. Undefined (``None`` with the reason) with one class among the
    training rows: neither rule is then a choice the data make.
    """
    if rule == DEFAULT_THRESHOLD:
        return HALF
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"threshold rule {rule!r}; allowed: {', '.join(THRESHOLD_RULES)}")
    y = np.asarray(y_train).astype(bool)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        return Threshold(rule, None, f"the {rule} threshold is undefined: the training rows it is chosen on "
                                     "hold one class only")
    values, tps, fps = _groups(y, logits)
    if rule == "youden":
        k = int(np.argmax(tps / n_pos - fps / (y.size - n_pos)))
    else:
        k = int(np.argmin(np.abs((tps + fps) - n_pos)))
    logit = values[k] if k + 1 == values.size else 0.5 * (values[k] + values[k + 1])
    if k + 1 < values.size and logit <= values[k + 1]:  # adjacent floats: no value lies between them
        logit = values[k]
    return Threshold(rule, float(logit))


def model_threshold(rule: str, model, params, X_train: np.ndarray, y_train: np.ndarray) -> Threshold:
    """The threshold ``rule`` picks for ``model`` at ``params`` on training rows ``X_train``."""
    if rule == DEFAULT_THRESHOLD:
        return HALF  # nothing to score: a 0.5 run computes what it always did
    logits = model.decision(params, X_train)
    if not np.isfinite(logits).all():
        return Threshold(rule, None, "the model's scores on the training rows are NaN/Inf")
    return choose_threshold(rule, y_train, logits)


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
    _, tps, fps = _groups(y, scores)
    tpr = np.r_[0.0, tps / max(y.sum(), 1)]
    fpr = np.r_[0.0, fps / max((~y).sum(), 1)]
    return fpr, tpr


def binary_metrics(y_true: np.ndarray, scores: np.ndarray, threshold: float = 0.5,
                   ranking: np.ndarray | None = None) -> dict[str, Metric]:
    """Every binary metric at ``threshold`` on the positive-class probability, and AUC of
    ``ranking`` (the model's logits, when given: they rank the rows as the probabilities do, but
    do not tie where the sigmoid rounds to exactly 0 or 1 -- a model with large logits would
    otherwise score an AUC of 0.5 however it ranks)."""
    return predicted_metrics(y_true, np.asarray(scores) >= threshold, scores if ranking is None else ranking)


def thresholded_metrics(y_true: np.ndarray, probabilities: np.ndarray, logits: np.ndarray,
                        threshold: Threshold) -> dict[str, Metric]:
    """Every binary metric of a model's scores at a chosen :class:`Threshold`; where the
    threshold is undefined, the metrics it decides are too (with its reason), AUC is not."""
    if threshold.logit is None:
        out = predicted_metrics(y_true, np.zeros(np.size(y_true), dtype=bool), logits)
        return {m: Metric(None, threshold.reason) if m in THRESHOLDED else v for m, v in out.items()}
    return predicted_metrics(y_true, threshold.predict(probabilities, logits), logits)


def predicted_metrics(y_true: np.ndarray, predicted: np.ndarray, ranking: np.ndarray) -> dict[str, Metric]:
    """Every binary metric of the ``predicted`` positives, and AUC of ``ranking``."""
    y = np.asarray(y_true).astype(bool)
    pred = np.asarray(predicted).astype(bool)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    tp = int((pred & y).sum())
    tn = int((~pred & ~y).sum())
    out = {"acc": Metric((tp + tn) / y.size) if y.size else Metric(None, "empty test set")}
    out["sen"] = Metric(tp / n_pos) if n_pos else Metric(None, "no positive cases in the test set")
    out["spe"] = Metric(tn / n_neg) if n_neg else Metric(None, "no negative cases in the test set")
    if n_pos and n_neg:
        out["auc"] = Metric(roc_auc(y, ranking))
        out["balanced_acc"] = Metric((out["sen"].value + out["spe"].value) / 2)
    else:
        out["auc"] = Metric(None, "AUC is undefined with one class in the test set")
        out["balanced_acc"] = Metric(None, "balanced accuracy needs both classes in the test set")
    wrong = (y.size - tp - tn)  # false positives and false negatives
    out["f1"] = Metric(2 * tp / (2 * tp + wrong)) if 2 * tp + wrong else Metric(
        None, "F1 is undefined with no positive case in the test set and none predicted")
    return out


def model_scores(model, params, X: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """A model's positive-class probabilities and logits on ``X`` (the logits rank for AUC), or
    None when either is NaN/Inf (a diverged model: no number to report)."""
    probabilities, logits = model.predict_proba(params, X), model.decision(params, X)
    if not (np.isfinite(probabilities).all() and np.isfinite(logits).all()):
        return None
    return probabilities, logits
