"""Sites and federations: the data each participant holds, and nothing about training."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from medfed.data.categorical import CategoricalColumn
from medfed.data.hints import setting
from medfed.data.tasks import SUPPORTED_TASKS, n_outputs, presence
from medfed.errors import DataError

MIN_SITE_SAMPLES = 10


class SingleClassSiteWarning(UserWarning):
    """A site's training rows hold one class only (legal: label skew is common in medicine)."""


@dataclass(frozen=True)
class Site:
    """One participant: its samples, targets, optionally a predefined split.

    ``y`` holds the targets of ``task`` (:mod:`medfed.data.tasks`): 0/1 (``binary``, int8),
    class indices 0..K-1 (``multiclass``, int64), finite reals (``regression``, float64) or
    K labels of 0/1 per row (``multilabel``, int8, shape ``(n, K)``), or a mask of class indices
    per image on the image's grid (``segmentation``, int64, shape ``(n, *spatial)``).

    ``X`` is a feature matrix ``(n, d)`` (float64) or a stack of images ``(n, C, H, W)`` /
    ``(n, C, D, H, W)`` (float32: what convolutional models consume, at half the memory).
    ``split`` is ``None`` or a boolean array, ``True`` for training rows. ``covariates`` maps
    a name (``age``, ``sex``) to one finite number per row: what harmonization preserves, known
    for every row and never a feature (:mod:`medfed.data.harmonize`). A feature matrix
    may hold NaN for missing values only when the federation names an imputation strategy;
    imputation happens per split, from the site's training rows (``medfed.data.preprocess``).

    ``unlabeled`` is ``None`` (every row has its target) or a boolean array, ``True`` for a row
    whose label is unknown (an empty label cell, or the table's ``unlabeled_value``): its ``y``
    is a placeholder (0) that nothing may read. Such a row is a training row without a target,
    never a test row; class counts, strata and inference see the labeled rows only.
    """

    name: str
    X: np.ndarray
    y: np.ndarray
    split: np.ndarray | None = None
    covariates: dict[str, np.ndarray] = field(default_factory=dict)
    task: str = "binary"
    unlabeled: np.ndarray | None = None

    def __post_init__(self) -> None:
        raw = np.asarray(self.X)
        if raw.ndim not in (2, 4, 5):
            raise DataError(
                f"site {self.name!r}: samples must be a feature matrix (n, d) or images (n, C, H, W) / "
                f"(n, C, D, H, W), got shape {raw.shape}"
            )
        X = np.ascontiguousarray(raw, dtype=np.float64 if raw.ndim == 2 else np.float32)
        y = np.asarray(self.y)
        if X.ndim > 2 and np.isnan(X).any():
            raise DataError(f"site {self.name!r}: images contain NaN values")
        if self.task == "segmentation":
            if y.shape != (X.shape[0], *X.shape[2:]) or X.ndim < 4:
                raise DataError(f"site {self.name!r}: a segmentation task takes one mask per image on the image's "
                                f"grid, shape {(X.shape[0], *X.shape[2:])}; got masks of shape {y.shape} for images "
                                f"of shape {X.shape}")
        elif y.shape[:1] != (X.shape[0],) or y.ndim != (2 if self.task == "multilabel" else 1):
            raise DataError(
                f"site {self.name!r}: {y.shape[0] if y.ndim else 0} labels for {X.shape[0]} rows"
                + (f" (a {self.task} task takes {'a row of K 0/1 labels' if self.task == 'multilabel' else 'one'} "
                   f"per row, got shape {y.shape})" if y.shape[:1] == (X.shape[0],) else "")
            )
        y = _targets(self.name, self.task, y)
        if np.isinf(X).any():
            raise DataError(f"site {self.name!r}: features contain infinite values")
        if X.shape[0] < MIN_SITE_SAMPLES:
            raise DataError(
                f"site {self.name!r} has {X.shape[0]} samples; at least {MIN_SITE_SAMPLES} are needed "
                "for a train/test split"
            )
        object.__setattr__(self, "X", X)
        object.__setattr__(self, "y", y)
        if self.split is not None:
            split = np.asarray(self.split, dtype=bool)
            if split.shape != y.shape[:1]:
                raise DataError(f"site {self.name!r}: split has {split.size} entries for {y.shape[0]} rows")
            if not split.any() or split.all():
                raise DataError(
                    f"site {self.name!r}: the predefined split must hold both train and test rows"
                )
            object.__setattr__(self, "split", split)
        self._check_unlabeled(y.shape[0])
        covariates = {}
        for name, values in self.covariates.items():
            values = np.asarray(values, dtype=np.float64)
            if values.shape != y.shape[:1] or not np.isfinite(values).all():
                raise DataError(f"site {self.name!r}: covariate {name!r} needs one finite number per row "
                                f"({y.shape[0]} rows)")
            covariates[name] = values
        object.__setattr__(self, "covariates", covariates)

    def _check_unlabeled(self, n: int) -> None:
        """``unlabeled`` as a boolean mask (None when every row is labeled); a site needs two
        labeled rows (one to test on, one to train on), labeled test rows in its predefined split."""
        if self.unlabeled is None:
            return
        unlabeled = np.asarray(self.unlabeled, dtype=bool)
        if unlabeled.shape != (n,):
            raise DataError(f"site {self.name!r}: unlabeled has {unlabeled.size} entries for {n} rows")
        labeled = int(n - unlabeled.sum())
        if labeled < 2:
            raise DataError(f"site {self.name!r} has {labeled} labeled row(s) of {n}; a site needs at least 2 "
                            "(unlabeled rows train, but are never test rows)")
        if self.split is not None and not (~self.split & ~unlabeled).any():
            raise DataError(f"site {self.name!r}: every test row of the predefined split is unlabeled; a site "
                            "needs labeled test rows")
        object.__setattr__(self, "unlabeled", unlabeled if unlabeled.any() else None)

    @property
    def n(self) -> int:
        return int(self.X.shape[0])

    @property
    def labeled(self) -> np.ndarray:
        """True for each row whose target is known."""
        return np.ones(self.n, dtype=bool) if self.unlabeled is None else ~self.unlabeled

    @property
    def n_unlabeled(self) -> int:
        return 0 if self.unlabeled is None else int(self.unlabeled.sum())

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.X.shape[1:])


def _targets(site: str, task: str, y: np.ndarray) -> np.ndarray:
    """``y`` in the dtype of ``task``, or a DataError naming the site and what it takes."""
    if task not in SUPPORTED_TASKS:
        raise DataError(f"site {site!r}: task {task!r}; available: {', '.join(SUPPORTED_TASKS)}")
    if task in ("binary", "multilabel"):
        if not np.isin(y, (0, 1)).all():
            raise DataError(f"site {site!r}: labels must be 0 or 1, got {sorted(set(np.ravel(y).tolist()))[:5]}")
        return y.astype(np.int8)
    if task in ("multiclass", "segmentation"):
        if y.dtype.kind not in "iub" and not (y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all()):
            raise DataError(f"site {site!r}: {task} labels must be class indices 0..K-1, got dtype {y.dtype}")
        if y.size and y.min() < 0:
            raise DataError(f"site {site!r}: {task} labels must be class indices 0..K-1, got {int(y.min())}")
        return y.astype(np.int64)
    y = np.asarray(y, dtype=np.float64)
    if not np.isfinite(y).all():
        raise DataError(f"site {site!r}: regression targets must be finite numbers")
    return y


@dataclass(frozen=True)
class Federation:
    """An ordered set of sites sharing one feature space (or one image shape).

    ``description`` and ``attribution`` travel into results so a report says what data it
    is about and whom to credit. For images, ``feature_names`` names the channels.
    ``categorical`` lists the one-hot encoded columns of a feature table (their indicators are
    features named ``column=level``); which levels a repeat may use is decided from its
    training rows (:mod:`medfed.data.categorical`). ``task`` is what every site's targets are
    (:mod:`medfed.data.tasks`); a ``multiclass`` federation names its ``classes`` (index k of a
    label is ``classes[k]``; a site may lack some of them). ``task_source`` says how the task
    was decided (``"given"``, or the inference's reason), for the report.
    """

    name: str
    sites: tuple[Site, ...]
    feature_names: tuple[str, ...]
    description: str = ""
    attribution: str = ""
    positive_label: str = "1"
    impute: str | None = None
    info: dict = field(default_factory=dict)
    categorical: tuple[CategoricalColumn, ...] = ()
    task: str = "binary"
    classes: tuple[str, ...] = ()
    task_source: str = "given"

    def __post_init__(self) -> None:
        sites = tuple(self.sites)
        if not sites:
            raise DataError(f"federation {self.name!r} has no sites")
        for s in sites:
            if s.task != self.task:
                raise DataError(f"site {s.name!r} holds {s.task} targets; federation {self.name!r} is {self.task}")
        classes = tuple(str(c) for c in self.classes)
        if self.task in ("multiclass", "segmentation"):
            if len(classes) < 2 or len(set(classes)) != len(classes):
                raise DataError(f"federation {self.name!r}: a {self.task} task needs at least 2 distinct class names, "
                                f"got {list(classes)}")
            for s in sites:
                if s.y.size and s.y.max() >= len(classes):
                    raise DataError(f"site {s.name!r}: class index {int(s.y.max())} but only {len(classes)} classes "
                                    f"{list(classes)}")
        elif self.task == "multilabel":
            if len(classes) < 2 or len(set(classes)) != len(classes):
                raise DataError(f"federation {self.name!r}: a multilabel task needs at least 2 distinct label names, "
                                f"got {list(classes)}")
            for s in sites:
                if s.y.shape[1] != len(classes):
                    raise DataError(f"site {s.name!r}: {s.y.shape[1]} labels per row but {len(classes)} label names "
                                    f"{list(classes)}")
        elif classes:
            raise DataError(f"federation {self.name!r}: class names belong to a multiclass, multilabel or segmentation task, "
                            f"not {self.task}")
        object.__setattr__(self, "classes", classes)
        names = [s.name for s in sites]
        if len(set(names)) != len(names):
            raise DataError(f"federation {self.name!r}: duplicate site names {names}")
        shape = sites[0].sample_shape
        for s in sites:
            if s.sample_shape != shape:
                raise DataError(
                    f"site {s.name!r} has samples of shape {s.sample_shape}; site {sites[0].name!r} has {shape}"
                )
        d = len(self.feature_names)
        if shape[0] != d:
            what = "features" if len(shape) == 1 else "channels"
            raise DataError(f"federation {self.name!r}: samples have {shape[0]} {what}, {d} names were given")
        if len(shape) > 1 and self.impute is not None:
            raise DataError(f"federation {self.name!r}: imputation applies to feature tables, not images")
        if self.impute not in (None, "mean", "median"):
            raise DataError(f"impute must be 'mean', 'median' or None, got {self.impute!r}")
        if self.impute is None and len(shape) == 1:
            for s in sites:
                missing = np.isnan(s.X).sum(axis=0)
                if missing.any():
                    j = int(np.argmax(missing))
                    raise DataError(
                        f"site {s.name!r}: column {self.feature_names[j]!r} has {int(missing[j])} "
                        f"missing values; choose an imputation: {setting('impute')}"
                    )
        covariates = set(sites[0].covariates)
        for s in sites:
            if set(s.covariates) != covariates:
                raise DataError(f"site {s.name!r} has covariates {sorted(s.covariates)}; site {sites[0].name!r} "
                                f"has {sorted(covariates)}")
        for c in self.categorical:
            if len(shape) > 1 or tuple(self.feature_names[c.indicators]) != c.feature_names:
                raise DataError(
                    f"federation {self.name!r}: categorical column {c.name!r} does not match the "
                    f"feature names at positions {c.start}..{c.start + len(c.levels) - 1}"
                )
        object.__setattr__(self, "sites", sites)
        object.__setattr__(self, "feature_names", tuple(self.feature_names))
        object.__setattr__(self, "categorical", tuple(self.categorical))

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]

    @property
    def covariate_names(self) -> tuple[str, ...]:
        """The covariates every site's rows carry (``Site.covariates``), in the first site's order."""
        return tuple(self.sites[0].covariates)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """``(d,)`` for a feature table, ``(C, H, W)`` or ``(C, D, H, W)`` for images."""
        return self.sites[0].sample_shape

    @property
    def is_image(self) -> bool:
        return len(self.sample_shape) > 1

    @property
    def has_predefined_split(self) -> bool:
        return all(s.split is not None for s in self.sites)

    @property
    def n_classes(self) -> int | None:
        """K for a classification task (2 for binary), the number of labels for multilabel, None
        for regression."""
        return n_outputs(self.task, self.classes)

    @property
    def has_unlabeled(self) -> bool:
        return any(s.unlabeled is not None for s in self.sites)

    def site_summaries(self) -> list[dict]:
        """Each site's name and row counts (binary: all rows, positives, negatives; multiclass:
        rows per class, a class the site lacks counted 0; regression: rows and the target's
        range; multilabel: positive rows per label): what a report shows and what a deployed site
        shares at setup. Targets are counted over labeled rows; with unlabeled rows anywhere, each
        site also says how many rows are labeled and unlabeled."""
        return [{**_summary(self.task, self.classes, s), **({"n_labeled": s.n - s.n_unlabeled,
                                                              "n_unlabeled": s.n_unlabeled} if self.has_unlabeled else {})}
                for s in self.sites]

    def missing_classes(self) -> dict[str, list[str]]:
        """Multiclass: each site lacking some class, with the classes it lacks (legal, reported)."""
        if self.task != "multiclass":
            return {}
        out = {}
        for s in self.sites:
            counts = np.bincount(s.y[s.labeled], minlength=len(self.classes))
            if not counts.all():
                out[s.name] = [c for c, k in zip(self.classes, counts) if not k]
        return out

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise DataError(f"no site {name!r}; sites are {self.site_names}")



def _summary(task: str, classes: tuple[str, ...], site: Site) -> dict:
    """One site's row count and the counts of its labeled rows' targets (:meth:`Federation.site_summaries`)."""
    y = site.y[site.labeled]
    if task == "multilabel":
        return {"name": site.name, "n": site.n, "label_positives": dict(zip(classes, y.sum(axis=0).tolist()))}
    if task == "segmentation":  # images whose mask holds each class
        return {"name": site.name, "n": site.n, "images_with": dict(zip(classes, presence_counts(y, len(classes))))}
    if task == "multiclass":
        return {"name": site.name, "n": site.n, "class_counts": dict(zip(
            classes, np.bincount(y, minlength=len(classes)).tolist()))}
    if task == "regression":
        return {"name": site.name, "n": site.n, "target_min": float(y.min()), "target_max": float(y.max())}
    return {"name": site.name, "n": site.n, "n_positive": int(y.sum()), "n_negative": int(y.size - y.sum())}


def presence_counts(masks: np.ndarray, K: int) -> list[int]:
    """How many of ``masks`` hold each class 0..K-1."""
    counts = presence(masks).sum(axis=0).tolist()
    return [int(c) for c in counts[:K]] + [0] * (K - len(counts))
