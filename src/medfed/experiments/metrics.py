"""The survey's metrics (§6.2) and the decision threshold they are read at.

Binary: ACC, SEN (true-positive rate), SPE (true-negative rate), AUC, balanced accuracy
(the mean of SEN and SPE) and F1 (of the positive class). A metric that is undefined on a test
set (SEN with no positives, SPE with no negatives, AUC with one class present, F1 with no
positive case and none predicted) is returned as ``None`` with the reason, never a made-up
number. Computed in numpy (agreement with scikit-learn is a test) to keep start-up fast.

Multiclass (:func:`multiclass_metrics`): accuracy, balanced accuracy, macro-F1, macro one-vs-rest
AUC, and each class's sensitivity and specificity (keys ``sen:<class>``, ``spe:<class>``).
Regression (:func:`regression_metrics`): MAE, RMSE, R², Pearson r.
Multilabel (:func:`multilabel_metrics`): each label's AUC (keys ``auc:<label>``), their macro
mean and subset accuracy.
Segmentation (:func:`segmentation_metrics`): Dice and IoU per foreground class (``dice:<class>``,
``iou:<class>``) and their mean, and the 95th-percentile Hausdorff distance, per test image and
averaged over the site's images, as MONAI computes them.

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
MULTICLASS = MetricSet("multiclass", ("acc", "balanced_acc", "macro_f1", "macro_auc"),
                       ("acc", "balanced_acc", "macro_f1", "macro_auc"))
REGRESSION = MetricSet("regression", ("mae", "rmse", "r2", "pearson_r"), ("mae", "rmse", "r2", "pearson_r"))
MULTILABEL = MetricSet("multilabel", ("macro_auc", "subset_acc"), ("macro_auc", "subset_acc"))
SEGMENTATION = MetricSet("segmentation", ("dice", "iou", "hd95"), ("dice", "iou", "hd95"))
METRIC_SETS = {m.task: m for m in (BINARY, MULTICLASS, REGRESSION, MULTILABEL, SEGMENTATION)}
METRIC_LABELS = {"acc": "ACC", "sen": "SEN", "spe": "SPE", "auc": "AUC", "balanced_acc": "BACC", "f1": "F1",
                 "macro_f1": "macro-F1", "macro_auc": "macro-AUC", "mae": "MAE", "rmse": "RMSE", "r2": "R2",
                 "pearson_r": "Pearson r", "subset_acc": "subset ACC", "dice": "Dice", "iou": "IoU", "hd95": "HD95"}
PER_CLASS = ("sen", "spe")  # a multiclass row's per-class metrics, keyed "sen:<class>"
PER_LABEL = ("auc",)  # a multilabel row's per-label metrics, keyed "auc:<label>"
PER_MASK_CLASS = ("dice", "iou")  # a segmentation row's per-class metrics, keyed "dice:<class>" (foreground)
PER_OUTPUT = {MULTICLASS.task: PER_CLASS, MULTILABEL.task: PER_LABEL, SEGMENTATION.task: PER_MASK_CLASS}
"""Each task's metrics per class (multiclass) or per label (multilabel), beside its set."""

# errors: a better model has less of them (every other metric grows as a model gets better)
LOWER_IS_BETTER = frozenset({"mae", "rmse", "hd95"})


def lower_is_better(key: str) -> bool:
    """Whether metric ``key`` (or a per-class ``key:<class>``) falls as a model gets better."""
    return key.split(":", 1)[0] in LOWER_IS_BETTER


THRESHOLD_RULES = ("0.5", "youden", "prevalence")
DEFAULT_THRESHOLD = "0.5"
# the metrics a decision threshold decides (AUC ranks and does not)
THRESHOLDED = ("acc", "sen", "spe", "balanced_acc", "f1")


def metric_set(task: str | None = None) -> MetricSet:
    """The metric set of ``task`` (a results document's ``task``; older documents are binary)."""
    return METRIC_SETS[task or BINARY.task]


def metric_keys(task: str, classes: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Every metric a row of ``task`` holds: the task's set, then each class's sensitivity and
    specificity (multiclass), each label's AUC (multilabel) or each foreground class's Dice and IoU
    (segmentation: ``classes[0]`` is the background)."""
    if task == SEGMENTATION.task:
        classes = classes[1:]
    return metric_set(task).keys + tuple(f"{m}:{c}" for m in PER_OUTPUT.get(task, ()) for c in classes)


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


# --- multiclass and regression --------------------------------------------------------------


def task_scores(model, params, X: np.ndarray) -> np.ndarray | None:
    """A multiclass model's class probabilities ``(n, K)``, a multilabel model's label probabilities
    ``(n, K)`` or a regression model's predictions ``(n,)`` on ``X`` (``model.predict``), or None when any is NaN/Inf (a diverged model)."""
    scores = model.predict(params, X)
    return scores if np.isfinite(scores).all() else None


def multiclass_metrics(y_true: np.ndarray, probabilities: np.ndarray, classes: tuple[str, ...]) -> dict[str, Metric]:
    """Every multiclass metric of class ``probabilities`` ``(n, K)`` for labels ``y_true`` (indices
    into ``classes``); a row is predicted its most probable class (the first on ties).

    As scikit-learn computes them on the same predictions: balanced accuracy is the mean recall
    over the classes in the test set; macro-F1 the mean F1 over the classes that occur in the test
    set or the predictions; macro-AUC the mean one-vs-rest AUC of each class's probability over
    the classes in the test set (scikit-learn's ``roc_auc_score(multi_class="ovr")`` when every
    class is present; with a class absent it refuses, we average the classes that are, and
    need two). Per class: sensitivity (recall) and specificity (one-vs-rest true-negative rate).
    """
    y = np.asarray(y_true).astype(np.intp)
    K = len(classes)
    predicted = np.argmax(probabilities, axis=1)
    n = y.size
    true_counts = np.bincount(y, minlength=K)
    pred_counts = np.bincount(predicted, minlength=K)
    tp = np.bincount(y[predicted == y], minlength=K)
    present = np.flatnonzero(true_counts)
    out = {"acc": Metric(float(tp.sum() / n)) if n else Metric(None, "empty test set")}
    out["balanced_acc"] = Metric(float(np.mean(tp[present] / true_counts[present]))) if n else Metric(
        None, "empty test set")
    occurring = np.flatnonzero(true_counts + pred_counts)
    f1 = 2 * tp[occurring] / (true_counts[occurring] + pred_counts[occurring])
    out["macro_f1"] = Metric(float(f1.mean())) if n else Metric(None, "empty test set")
    if present.size >= 2:
        aucs = [roc_auc(y == k, probabilities[:, k]) for k in present]
        out["macro_auc"] = Metric(float(np.mean(aucs)))
    else:
        out["macro_auc"] = Metric(None, "macro AUC needs at least 2 classes in the test set")
    for k, name in enumerate(classes):
        negatives = n - true_counts[k]
        out[f"sen:{name}"] = (Metric(float(tp[k] / true_counts[k])) if true_counts[k]
                              else Metric(None, f"no {name!r} rows in the test set"))
        out[f"spe:{name}"] = (Metric(float((negatives - (pred_counts[k] - tp[k])) / negatives)) if negatives
                              else Metric(None, f"every test row is {name!r}"))
    return out


def regression_metrics(y_true: np.ndarray, predictions: np.ndarray) -> dict[str, Metric]:
    """MAE, RMSE, R² (``1 - SS_res / SS_tot``, scikit-learn's ``r2_score``) and Pearson r of
    ``predictions``; R² is undefined on a constant test target, r also on constant predictions."""
    y, p = np.asarray(y_true, dtype=np.float64), np.asarray(predictions, dtype=np.float64)
    if not y.size:
        return {m: Metric(None, "empty test set") for m in REGRESSION.keys}
    r = p - y
    out = {"mae": Metric(float(np.mean(np.abs(r)))), "rmse": Metric(float(np.sqrt(np.mean(r * r))))}
    dy, dp = y - y.mean(), p - p.mean()
    ss_tot = float(dy @ dy)
    out["r2"] = Metric(1.0 - float(r @ r) / ss_tot) if ss_tot > 0 else Metric(
        None, "R2 is undefined with a constant target in the test set")
    spread = np.sqrt(ss_tot * float(dp @ dp))
    out["pearson_r"] = Metric(float(dy @ dp) / spread) if spread > 0 else Metric(
        None, "Pearson r is undefined with a constant target or constant predictions")
    return out


def multilabel_metrics(y_true: np.ndarray, probabilities: np.ndarray, labels: tuple[str, ...]) -> dict[str, Metric]:
    """Every multilabel metric of label ``probabilities`` ``(n, K)`` for 0/1 targets ``y_true``
    ``(n, K)``: each label's AUC (``auc:<label>``; undefined where the test set holds one value
    of the label), ``macro_auc`` their mean over the labels where it is defined (scikit-learn's
    ``roc_auc_score(average="macro")`` when it is defined for all; with one undefined it refuses,
    we average the others), and ``subset_acc`` the fraction of rows whose every label is
    predicted right at probability 0.5 (scikit-learn's ``accuracy_score`` on label indicators)."""
    y = np.asarray(y_true).astype(bool)
    p = np.asarray(probabilities)
    n = y.shape[0]
    if not n:
        return {m: Metric(None, "empty test set") for m in metric_keys(MULTILABEL.task, labels)}
    out = {"subset_acc": Metric(float(np.mean(((p >= 0.5) == y).all(axis=1))))}
    aucs = {}
    for k, name in enumerate(labels):
        positives = int(y[:, k].sum())
        aucs[name] = (Metric(roc_auc(y[:, k], p[:, k])) if 0 < positives < n
                      else Metric(None, f"label {name!r} is {'1' if positives else '0'} in every test row"))
    defined = [m.value for m in aucs.values() if m.value is not None]
    out["macro_auc"] = Metric(float(np.mean(defined))) if defined else Metric(
        None, "macro AUC needs a label with both values in the test set")
    return out | {f"auc:{name}": m for name, m in aucs.items()}


def _overlaps(predicted: np.ndarray, masks: np.ndarray, K: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image and foreground class 1..K-1, ``(n, K-1)``: pixels in both the predicted and the
    true mask, in the predicted, in the true."""
    n = masks.shape[0]
    p, t = predicted.reshape(n, -1), masks.reshape(n, -1)
    k = np.arange(1, K)[None, :, None]
    pk, tk = p[:, None, :] == k, t[:, None, :] == k
    return (pk & tk).sum(axis=2), pk.sum(axis=2), tk.sum(axis=2)


def _site_mean(values: np.ndarray, reason: str) -> Metric:
    """The mean over the defined (non-NaN) entries, MONAI's ``reduction="mean"``; None where none is."""
    defined = values[np.isfinite(values)]
    return Metric(float(defined.mean())) if defined.size else Metric(None, reason)


def hausdorff95(predicted: np.ndarray, masks: np.ndarray, K: int) -> np.ndarray:
    """``(n, K-1)`` 95th-percentile Hausdorff distances in pixels per image and foreground class:
    MONAI's ``compute_hausdorff_distance(include_background=False, percentile=95)`` on one-hot
    masks (Euclidean, the boundary pixels' distances); NaN where the true or the predicted mask
    of the class is empty (MONAI returns NaN or inf there: no distance to a missing surface)."""
    import warnings

    import torch
    from monai.metrics import compute_hausdorff_distance

    def one_hot(m: np.ndarray) -> torch.Tensor:
        m = torch.as_tensor(np.asarray(m, dtype=np.int64))
        return torch.nn.functional.one_hot(m, K).movedim(-1, 1)

    with warnings.catch_warnings():  # MONAI warns on every empty mask; they are NaN below
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(one_hot(predicted), one_hot(masks), include_background=False,
                                        percentile=95).double().numpy()
    _, in_pred, in_true = _overlaps(predicted, masks, K)
    return np.where((in_pred > 0) & (in_true > 0), hd, np.nan)


def segmentation_metrics(masks: np.ndarray, probabilities: np.ndarray, classes: tuple[str, ...]) -> dict[str, Metric]:
    """Every segmentation metric of per-pixel class ``probabilities`` ``(n, K, *spatial)`` against
    the true ``masks`` ``(n, *spatial)``; a pixel is predicted its most probable class.

    Per image and foreground class (``classes[1:]``; the background ``classes[0]`` is left out,
    MONAI's ``include_background=False``): Dice ``2|P∩T| / (|P| + |T|)``, IoU ``|P∩T| / |P∪T|``,
    undefined where the true mask holds none of the class (MONAI's ``ignore_empty=True``: an
    image without a lesion has no lesion Dice), and HD95 (:func:`hausdorff95`). ``dice:<class>``
    and ``iou:<class>`` are each class's mean over the images where defined (MONAI's
    ``"mean_batch"``), ``dice``, ``iou`` and ``hd95`` the mean over every defined (image, class)
    (MONAI's ``"mean"``). Tests check them against ``DiceMetric``, ``MeanIoU`` and
    ``compute_hausdorff_distance``.
    """
    y = np.asarray(masks).astype(np.int64)
    K = len(classes)
    if not y.shape[0]:
        return {m: Metric(None, "empty test set") for m in metric_keys(SEGMENTATION.task, classes)}
    predicted = np.argmax(probabilities, axis=1)
    both, in_pred, in_true = _overlaps(predicted, y, K)
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(in_true > 0, 2 * both / (in_pred + in_true), np.nan)
        iou = np.where(in_true > 0, both / (in_pred + in_true - both), np.nan)
    none = "no test image holds the class"
    out = {"dice": _site_mean(dice, none), "iou": _site_mean(iou, none),
           "hd95": _site_mean(hausdorff95(predicted, y, K), "HD95 needs an image where the class is both true and "
                                                             "predicted")}
    for k, name in enumerate(classes[1:]):
        out[f"dice:{name}"] = _site_mean(dice[:, k], f"no test image holds {name!r}")
        out[f"iou:{name}"] = _site_mean(iou[:, k], f"no test image holds {name!r}")
    return out


def task_metrics(task: str, y_true: np.ndarray, scores: np.ndarray, classes: tuple[str, ...] = ()) -> dict[str, Metric]:
    """The metrics of a multiclass, multilabel or regression task's :func:`task_scores` (binary
    goes through :func:`thresholded_metrics`, with its decision threshold)."""
    if task == MULTICLASS.task:
        return multiclass_metrics(y_true, scores, classes)
    if task == MULTILABEL.task:
        return multilabel_metrics(y_true, scores, classes)
    if task == SEGMENTATION.task:
        return segmentation_metrics(y_true, scores, classes)
    return regression_metrics(y_true, scores)
