"""What a target is: the task of a federation, and how a label column's values say which.

``binary`` (labels 0/1, today's default), ``multiclass`` (K named classes stored as indices
0..K-1 into the federation's ``classes``), ``regression`` (a real value per row), ``multilabel``
(K binary targets per row, an ``(n, K)`` array of 0/1 whose columns the federation's ``classes``
name; from a table's several label columns), ``segmentation`` (an integer mask per image on the
image's grid, ``(n, *spatial)`` of class indices 0..K-1 into ``classes``, 0 the background).

Inference (:func:`infer_task`) is used only where the values leave no doubt, and what it
decided is printed and recorded in ``results.json``; a label column it cannot read as one
task is an error that says which ``--task`` to pass, never a silent coercion.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medfed.data.hints import setting
from medfed.data.preprocess import Moments, Standardizer
from medfed.errors import DataError

TASKS = ("binary", "multiclass", "regression", "multilabel", "segmentation")
"""Every task name."""
SUPPORTED_TASKS = TASKS
CLASSIFICATION = ("binary", "multiclass")

# more distinct values than this are not inferred to be classes (an ID, an age in whole years):
# the user says what they are with --task
MAX_INFERRED_CLASSES = 20
# a regression target split into this many quantile bins for stratified train/test splits
REGRESSION_STRATA = 5


def check_task(task: str | None, where: str = "--task") -> str | None:
    """``task`` if medfed can run it (None: infer from the labels), else a DataError naming ``where``."""
    if task is None or task in SUPPORTED_TASKS:
        return task
    if task in TASKS:
        raise DataError(f"{where} {task!r} is reserved but not implemented yet; available: {', '.join(SUPPORTED_TASKS)}")
    raise DataError(f"{where} {task!r} is not a task; available: {', '.join(SUPPORTED_TASKS)}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def infer_task(distinct: Sequence[str]) -> tuple[str, str]:
    """The task a label column's values imply, and why (the line the CLI prints).

    ``distinct`` are the column's distinct values as text (integers without ``.0``), in order
    of first appearance. Exactly the values 0 and 1: binary. More than two
    values that are names or whole numbers, at most :data:`MAX_INFERRED_CLASSES`: multiclass.
    Numbers with a fraction: regression. Anything else (two values other than 0/1, which of
    them is positive being the user's to say; a mix of names and numbers; many whole numbers)
    is ambiguous: a DataError (without the file and column, which the caller adds) saying which
    flag decides it.
    """
    if sorted(distinct) == ["0", "1"]:
        return "binary", "the label column holds 0 and 1"
    numeric = [_is_number(v) for v in distinct]
    if all(numeric):
        whole = all(float(v).is_integer() for v in distinct)
        if not whole:
            return "regression", f"the label column holds {len(distinct)} distinct numbers, not all whole"
        if 2 < len(distinct) <= MAX_INFERRED_CLASSES:
            return "multiclass", f"the label column holds {len(distinct)} whole numbers, read as classes"
    elif not any(numeric) and 2 < len(distinct) <= MAX_INFERRED_CLASSES:
        return "multiclass", f"the label column holds {len(distinct)} class names"
    kind = "one value only" if len(distinct) == 1 else f"{len(distinct)} distinct values"
    shown = ", ".join(repr(v) for v in list(distinct)[:10])
    if len(distinct) > 10:
        shown += f", ... ({len(distinct) - 10} more)"
    raise DataError(
        f"is not 0/1 (it holds {kind}: {shown}); pass {setting('positive_label')} to say which value is the "
        f"positive class, all others becoming 0, or {setting('task')}"
    )


def class_order(distinct: Sequence[str]) -> tuple[str, ...]:
    """The classes of a multiclass label column in a fixed order: numerically when every class
    is a number, else as text, so the class index does not depend on the order rows appear."""
    if all(_is_number(v) for v in distinct):
        return tuple(sorted(distinct, key=float))
    return tuple(sorted(distinct))


def strata(task: str, y: np.ndarray) -> np.ndarray:
    """What a stratified split keeps in proportion: the class (classification); for a
    regression target its quantile bin among ``REGRESSION_STRATA`` (ties stay in one bin); for
    multi-label targets the row's combination of labels (the label powerset), the combinations
    that occur once pooled into one stratum, so that a rare combination is still split rather
    than kept whole in the training rows. Segmentation: the combination of classes an image's
    mask holds (images with and without a lesion kept in proportion), pooled likewise."""
    if task == "segmentation":
        y = presence(y)
    if task in ("multilabel", "segmentation"):
        _, pattern, counts = np.unique(y, axis=0, return_inverse=True, return_counts=True)
        pattern = pattern.reshape(-1)
        return np.where(counts[pattern] > 1, pattern, -1)
    if task != "regression":
        return y
    edges = np.quantile(y, np.linspace(0.0, 1.0, REGRESSION_STRATA + 1)[1:-1])
    return np.searchsorted(edges, y, side="right")


def presence(masks: np.ndarray) -> np.ndarray:
    """``(n, K)`` 0/1: which classes 0..K-1 (K = the largest index + 1) each mask holds."""
    flat = np.asarray(masks).reshape(len(masks), -1)
    K = int(flat.max()) + 1 if flat.size else 1
    return (flat[:, :, None] == np.arange(K)).any(axis=1).astype(np.int8)


def n_outputs(task: str, classes: Sequence[str]) -> int | None:
    """K for a classification task (2 for binary), the number of labels for multilabel, None
    for regression: what a model's head is sized by."""
    return {"binary": 2, "multiclass": len(classes), "multilabel": len(classes),
            "segmentation": len(classes)}.get(task)


def merged_classes(task: str, held: Sequence[Sequence[str]]) -> tuple[str, ...]:
    """The classes of a federation whose sites hold ``held`` (each site's class names), in the
    order a loader gives the pooled data: multiclass by :func:`class_order` of the union;
    segmentation ``background`` first, then the stored mask values in numeric order (as
    :func:`medfed.data.images.load_image_manifest` names them); multilabel the label columns,
    which every site names alike. A deployed study's sites code their labels against these."""
    union = list(dict.fromkeys(c for classes in held for c in classes))
    if task == "multiclass":
        return class_order(union)
    if task == "segmentation":
        return ("background", *sorted((c for c in union if c != "background"), key=int))
    if task == "multilabel":
        return tuple(held[0]) if held else ()
    return ()


@dataclass(frozen=True, slots=True)
class TargetScale:
    """How a regression model sees its target: ``(y - mean) / std``, and back.

    A zero-initialised head would otherwise have to learn a bias of the target's size (70 years
    of age) before it learns anything else. ``mean`` and ``std`` are those of the training rows
    of the sites a model trains on, pooled from each site's moments (n, sum y, sum y^2): the same
    summaries, and the same arithmetic, as the feature standardization of ``scaling = "global"``
    (:meth:`Standardizer.from_moments`; a constant target keeps ``std`` 1). It is applied outside
    the model's parameters, so aggregation and DP noise never touch it.
    """

    mean: float
    std: float

    @classmethod
    def of(cls, moments: Sequence[Moments]) -> TargetScale:
        pooled = Standardizer.from_moments(moments)
        return cls(float(pooled.mean[0]), float(pooled.scale[0]))

    def forward(self, y: np.ndarray) -> np.ndarray:
        """Targets on the scale the model trains on."""
        return (y - self.mean) / self.std

    def inverse(self, z: np.ndarray) -> np.ndarray:
        """A model's outputs on the target's own scale, where every metric is computed."""
        return z * self.std + self.mean


UNSCALED = TargetScale(0.0, 1.0)
"""Targets as they are: ``[data] standardize_target = false``."""


def target_moments(y: np.ndarray) -> Moments:
    """A site's shareable summary of its regression targets: n, sum y, sum y^2 (one column)."""
    return Moments.of(np.asarray(y, dtype=np.float64).reshape(-1, 1))
