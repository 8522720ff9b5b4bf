"""Load a user's table (one row per subject) into a :class:`~medfed.data.federation.Federation`.

The loader is the boundary between files people export from spreadsheets, R or hospital
systems and the numeric arrays the rest of medfed trusts. Everything that can be wrong with
such a file is checked here, once, and reported as a single :class:`~medfed.errors.DataError`
that names the file, the column or site and what would be accepted; nothing deeper in the
stack has to guess what a pandas or numpy exception meant.

pandas is imported inside :func:`load_table` only: importing this module is part of the
command line's cold start, and most commands never read a table.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfed.data.categorical import CategoricalColumn, one_hot
from medfed.data.federation import MIN_SITE_SAMPLES, Federation, Site
from medfed.data.hints import flag, setting
from medfed.data.tasks import check_task, class_order, infer_task
from medfed.errors import ConfigError, DataError

CSV_EXTENSIONS = (".csv", ".tsv", ".txt")
PARQUET_EXTENSIONS = (".parquet", ".pq")
ALLOWED_EXTENSIONS = CSV_EXTENSIONS + PARQUET_EXTENSIONS
IMPUTE_CHOICES = ("mean", "median")
SPLIT_VALUES = ("train", "test")

# Delimiters tried, in order of preference, when a text file's delimiter is not implied by
# its extension (or a .csv file turns out to use another one, as European exports often do).
_DELIMITERS = (",", "\t", ";", "|")
_MAX_LISTED = 10


def load_table(
    path: str | os.PathLike,
    *,
    site_column: str,
    label_column: str | None = None,
    split_column: str | None = None,
    features: Sequence[str] | None = None,
    impute: str | None = None,
    positive_label: Any = None,
    exclude: Sequence[str] | None = None,
    categorical: Sequence[str] | None = None,
    name: str | None = None,
    covariates: Sequence[str] | None = None,
    task: str | None = None,
    label_columns: Sequence[str] | None = None,
    unlabeled_value: str | None = None,
    label_column_site: Mapping[str, str] | None = None,
) -> Federation:
    """Read a CSV or Parquet table with one row per subject into a federation of sites.

    Sites are the distinct values of ``site_column`` in order of first appearance, so a
    table written site by site keeps its order in reports. The label column's ``task``
    (:mod:`medfed.data.tasks`) is given, or inferred where the values leave no doubt (0/1:
    binary; 3 to 20 names or whole numbers: multiclass, classes in sorted order; numbers with a
    fraction: regression). ``positive_label`` binarizes (that value against all others); two
    values other than 0/1 need it, since the loader never guesses which class is positive: a
    silently flipped label inverts every metric.

    ``label_columns`` (instead of ``label_column``) names the K >= 2 columns of a ``multilabel``
    task, each 0/1 with both values in the file; their names become the federation's
    ``classes`` in the order given.

    Features are ``features`` if given, else every column but the site, label and split
    columns and those in ``exclude``. A column without a header name (pandas writes its row
    index that way) is refused as a feature unless excluded or named in ``features``.
    ``categorical`` columns are one-hot encoded: one indicator feature ``column=level`` per
    level in the file; which levels a repeat's models may use is decided from that repeat's
    training rows only (:mod:`medfed.data.categorical`).

    Missing feature values are an error unless ``impute`` is ``"mean"`` or ``"median"``; then
    they stay NaN here and are filled later from each site's *training* rows only, so that
    test rows never leak into the statistics.

    A site whose training rows hold one class is accepted: label skew is common in medicine
    and the federation can still learn from such a site.

    ``covariates`` are numeric columns each site's rows carry beside the features
    (``Site.covariates``), for harmonization to preserve: never features, never the label, and
    given for every row (:mod:`medfed.data.harmonize`).

    A row whose ``label_column`` cell is empty, or holds ``unlabeled_value`` (compared as text),
    is an unlabeled row (``Site.unlabeled``): a training row without a target. The task, its
    classes and a binary label's two values are read from the labeled rows only; a site with
    fewer than two labeled rows is refused. A multilabel task's label columns must all be given.

    ``label_column_site`` (site -> column) gives sites their own target (a multi-task study:
    ``medfed.methods.multitask``); the others read ``label_column``. Every column named is left
    out of the features, each is read over its own sites' rows and all must read as one task
    (the same classes; binary columns by the same rule, ``positive_label`` for all). The
    federation's ``info["site_targets"]`` records each site's column.

    Every problem found with the file is reported at once, in one :class:`DataError`.
    """
    if unlabeled_value is not None and label_columns is not None:
        raise ConfigError(f"{flag('unlabeled_value')} marks rows of one label column; a multilabel task's "
                          f"{flag('label_columns')} must each hold 0/1")
    label_columns = _label_columns(label_column, label_columns, task, positive_label)
    site_columns = _site_label_columns(label_column_site, label_columns, site_column, split_column)
    _check_parameters(site_column, label_column or (label_columns or site_columns)[0], split_column, features,
                      impute, exclude, categorical, covariates, label_columns)
    path = Path(path)
    df = read_frame(path)
    columns = [str(c) for c in df.columns]
    df.columns = columns
    if len(df) == 0:
        raise DataError(f"{path} holds no data rows (only a header, or nothing at all)")
    problems = _Problems(path)
    categorical = list(categorical or [])

    named = [(site_column, "site_column")] + [(c, "label_columns" if label_columns else "label_column")
                                              for c in label_columns or (label_column,) if c is not None]
    named += [(c, "label_column_site") for c in site_columns]
    named += [(split_column, "split_column")] if split_column else []
    named += [(c, key) for key, cols in (("features", features), ("exclude", exclude), ("categorical", categorical),
                                         ("covariates", covariates)) for c in cols or []]
    absent = list(dict.fromkeys((c, key) for c, key in named if c not in columns))
    if absent:
        which = ", ".join(f"{c!r} ({flag(key)})" for c, key in absent)
        problems.add(
            f"column{'s' if len(absent) > 1 else ''} {which} {'are' if len(absent) > 1 else 'is'} not in the file; "
            f"available columns: {_list(columns, limit=40)}"
        )

    reserved = {site_column, label_column, *(label_columns or ()), *site_columns, split_column, *(covariates or ())}
    if features is None:
        feature_names = [c for c in columns if c not in reserved and c not in set(exclude or ())]
        if not feature_names:
            problems.add(
                "no feature columns besides the site, label and split columns"
                + (f" and those excluded ({flag('exclude')})" if exclude else "")
            )
        for c in feature_names:
            problem = _unnamed_column(df[c], c, columns.index(c))
            if problem:
                problems.add(problem)
    else:
        feature_names = [c for c in features if c in columns]

    site_arr = None
    if site_column in columns:
        row_sites = problems.attempt(site_values, df[site_column], site_column, path)
        if row_sites is not None:
            site_arr = np.asarray(row_sites, dtype=object)
            problems.add(_small_sites(row_sites, site_column))
    site_order = [] if site_arr is None else list(dict.fromkeys(site_arr.tolist()))

    split = None
    if split_column in columns:
        split = problems.attempt(split_values, df[split_column], split_column, path)
        if split is not None and site_arr is not None:
            problems.add(_sites_without_split_rows(split, site_arr, site_order, split_column))

    labels = None
    unlabeled = np.zeros(len(df), dtype=bool)
    targets = None  # site -> its label column, with label_column_site
    label_cells = df[label_column] if label_column in columns else None
    if label_column_site:
        targets = problems.attempt(site_targets, label_column_site, label_column, site_order, site_column, path)
        label_cells = None
        if targets is not None and site_arr is not None and all(c in columns for c in targets.values()):
            label_cells = site_label_cells(df, site_arr, targets)
            problems.attempt(check_site_targets, label_cells, site_arr, targets, task, positive_label, unlabeled_value,
                             path)
    if label_columns:
        if all(c in columns for c in label_columns):
            labels = problems.attempt(multilabel_labels, df, label_columns, path, site_arr)
    elif label_cells is not None:
        label_name = label_column if targets is None else "per site (--label-column-site)"
        unlabeled = unlabeled_rows(label_cells, unlabeled_value)
        if site_arr is not None:
            problems.add(sites_without_labels(unlabeled, site_arr, site_order, label_name, unlabeled_value))
        if not unlabeled.all():
            known = site_arr[~unlabeled] if site_arr is not None else None
            labels = problems.attempt(task_labels, label_cells[~unlabeled].reset_index(drop=True), label_name,
                                      task, positive_label, path, known)
            if labels is not None and unlabeled.any():
                labels = labels.scattered(~unlabeled)

    X, names, encoded = _feature_matrix(df, feature_names, categorical, impute, site_arr, problems)
    covariate_columns = {c: problems.attempt(covariate_values, df[c], c, path, site_arr)
                         for c in covariates or () if c in columns}
    problems.raise_if_any()

    sites = []
    for s in site_order:
        rows = site_arr == s
        sites.append(Site(name=s, X=X[rows], y=labels.y[rows], split=None if split is None else split[rows],
                          covariates={c: v[rows] for c, v in covariate_columns.items()}, task=labels.task,
                          unlabeled=unlabeled[rows]))
    info = {
        "source": str(path),
        "site_column": site_column,
        "label_column": label_column,
        **({"label_columns": list(label_columns)} if label_columns else {}),
        **({"site_targets": targets} if targets else {}),
        "split_column": split_column,
        "features_selected_by": "all" if features is None else "list",
    }
    if unlabeled.any():
        info["unlabeled_rows"] = int(unlabeled.sum())
        if unlabeled_value is not None:
            info["unlabeled_value"] = unlabeled_value
    if exclude:
        info["excluded"] = list(exclude)
    if covariates:
        info["covariates"] = list(covariates)
    if encoded:
        info["categorical_levels"] = {c.name: list(c.levels) for c in encoded}
    return Federation(
        name=name or path.stem,
        sites=tuple(sites),
        feature_names=tuple(names),
        description=(
            f"table {path.name}: {len(df)} subjects at {len(sites)} sites, {len(names)} features"
            + (f" ({', '.join(c.name for c in encoded)} one-hot encoded)" if encoded else "")
        ),
        attribution="",
        positive_label=labels.positive,
        impute=impute,
        info=info,
        categorical=tuple(encoded),
        task=labels.task,
        classes=labels.classes,
        task_source=labels.source,
    )


def _feature_matrix(df, columns: list[str], categorical: list[str], impute, sites, problems: _Problems):
    """The feature matrix, its column names and the one-hot encoded columns; problems recorded."""
    blocks, names, encoded = [], [], []
    numeric: list[int] = []  # positions (in X) of the numeric columns, checked for missing values
    for col in columns:
        start = len(names)
        if col in categorical:
            block = problems.attempt(_one_hot_column, df[col], col, problems.path)
            if block is not None:
                encoded.append(CategoricalColumn(col, block[1], start))
                blocks.append(block[0])
                names += encoded[-1].feature_names
            continue
        values = problems.attempt(_numeric_column, df[col], col, problems.path)
        if values is not None:
            numeric.append(start)
            blocks.append(values[:, None])
            names.append(col)
    X = np.concatenate(blocks, axis=1) if blocks else np.empty((len(df), 0))
    for problem in _missing_problems(X[:, numeric], [names[j] for j in numeric], impute, sites):
        problems.add(problem)
    return X, names, encoded


@dataclass(frozen=True)
class ScoringRows:
    """A table's rows as a trained model sees them (:func:`read_scoring_rows`)."""

    X: np.ndarray  # (n, d) in the model's feature order; NaN where a numeric value is missing
    y: np.ndarray | None  # 0/1 labels, when the table has the label column
    ids: list[str] | None  # the id column's values, when one was named
    # categorical column -> level the model never had -> rows (encoded as all-zero indicators)
    new_levels: dict[str, dict[str, int]]


def read_scoring_rows(
    path: str | os.PathLike,
    *,
    feature_names: Sequence[str],
    categorical: Sequence[CategoricalColumn] = (),
    impute: str | None,
    model: str,
    label_column: str | None = None,
    positive_label: str = "1",
    require_label: bool = False,
    id_column: str | None = None,
) -> ScoringRows:
    """Read new rows for a model trained on ``feature_names`` (``column=level`` indicators for the
    ``categorical`` columns), with the checks :func:`load_table` makes: the file is read the same
    way, a column the model needs and the file lacks, a non-numeric or infinite value, and (when
    the model was trained without ``impute``) a missing value are each a problem, all reported in
    one :class:`DataError` that names ``model`` (the model file). A categorical value is one-hot
    encoded over the model's levels; a level the model never had becomes all-zero indicators and
    is counted in ``new_levels``. ``label_column``, when present (it must be, with
    ``require_label``), is read as labels: ``positive_label`` is the positive class, other values
    negative; with ``"1"`` (0/1 labels) only 0 and 1 are allowed. ``id_column`` must be present.
    Unlike :func:`load_table`, one class, few rows or no site column
    are fine: these rows are scored, not split.
    """
    path = Path(path)
    df = read_frame(path)
    df.columns = columns = [str(c) for c in df.columns]
    if len(df) == 0:
        raise DataError(f"{path} holds no data rows (only a header, or nothing at all)")
    problems = _Problems(path)
    starts = {c.start: c for c in categorical}
    inside = {j for c in categorical for j in range(c.start, c.start + len(c.levels))}
    needed = [starts[j].name if j in starts else name for j, name in enumerate(feature_names)
              if j in starts or j not in inside]
    absent = [c for c in needed if c not in columns]
    for name, what in ((id_column, "--id-column"), (label_column if require_label else None, "--label-column")):
        if name is not None and name not in columns:
            problems.add(f"column {name!r} ({what}) is not in the file; available columns: {_list(columns, limit=40)}")
    if absent:
        problems.add(
            f"column{'s' if len(absent) > 1 else ''} {_list(absent)} {'are' if len(absent) > 1 else 'is'} not in "
            f"the file, but the model {model} was trained on {'them' if len(absent) > 1 else 'it'} "
            f"(its columns: {_list(needed, limit=40)})"
        )
    X = np.full((len(df), len(feature_names)), np.nan)
    new_levels: dict[str, dict[str, int]] = {}
    numeric = [j for j, name in enumerate(feature_names) if j not in inside and name in columns]
    for j in numeric:
        values = problems.attempt(_numeric_column, df[feature_names[j]], feature_names[j], path,
                                  f"the model {model} was trained on numbers in this column")
        if values is not None:
            X[:, j] = values
    for c in categorical:
        if c.name not in columns:
            continue
        encoded = problems.attempt(_one_hot_column, df[c.name], c.name, path)
        if encoded is None:
            continue
        block, levels = encoded
        where = {level: k for k, level in enumerate(levels)}
        X[:, c.indicators] = 0.0
        for k, level in enumerate(c.levels):
            if level in where:
                X[:, c.start + k] = block[:, where[level]]
        new = {level: int(block[:, k].sum()) for level, k in where.items() if level not in c.levels}
        if new:
            new_levels[c.name] = new
    if impute is None:
        nan = np.isnan(X[:, numeric])
        if nan.any():
            j = int(np.argmax(nan.any(axis=0)))
            problems.add(
                f"feature column {feature_names[numeric[j]]!r} has {int(nan[:, j].sum())} missing values (first at "
                f"data row {int(np.argmax(nan[:, j])) + 1}); the model {model} was trained without imputation, "
                "so it needs every value"
            )
    y = None
    if label_column is not None and label_column in columns:
        y = problems.attempt(_scoring_labels, df[label_column], label_column, positive_label, path)
    ids = None
    if id_column is not None and id_column in columns:
        ids = [_text(v) for v in df[id_column].fillna("").tolist()]
    problems.raise_if_any()
    return ScoringRows(X, y, ids, new_levels)


def _scoring_labels(col, name: str, positive: str, path: Path) -> np.ndarray:
    """0/1 labels of rows to score: ``positive`` is class 1; with ``"1"``, only 0 and 1 may occur."""
    missing = _missing_mask(col)
    if missing.any():
        raise DataError(
            f"{path}: label column {name!r} has {int(missing.sum())} missing values, first at data row "
            f"{int(np.argmax(missing)) + 1}; leave the column out to score rows without labels"
        )
    keys = [_text(v) for v in col.tolist()]
    if positive == "1":
        other = list(dict.fromkeys(k for k in keys if k not in ("0", "1")))
        if other:
            raise DataError(
                f"{path}: label column {name!r} holds {_list(other)}; the model was trained on 0/1 labels"
            )
    return np.array([k == positive for k in keys], dtype=np.int8)


class _Problems:
    """Everything wrong with one table, collected so that one run reports all of it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.items: list[str] = []

    def add(self, problem: str | None) -> None:
        if problem:
            self.items.append(problem.removeprefix(f"{self.path}: "))

    def attempt(self, check, *args):
        """``check(*args)``, or None with its DataError recorded."""
        try:
            return check(*args)
        except DataError as exc:
            self.add(str(exc))
            return None

    def raise_if_any(self) -> None:
        if len(self.items) == 1:
            raise DataError(f"{self.path}: {self.items[0]}")
        if self.items:
            listed = "; ".join(f"({i}) {p}" for i, p in enumerate(self.items, 1))
            raise DataError(f"{self.path}: {len(self.items)} problems: {listed}")


# --------------------------------------------------------------------------- parameters


def _label_columns(label_column, label_columns, task, positive_label) -> tuple[str, ...] | None:
    """``label_columns`` checked against the other label settings (a multilabel task reads
    several 0/1 columns, a single label column any other task), before touching the file."""
    if label_columns is None:
        if task == "multilabel":
            raise ConfigError(f"a multilabel task reads several 0/1 label columns: name them with "
                              f"{setting('label_columns')} instead of {flag('label_column')}")
        return None
    if label_column is not None:
        raise ConfigError(f"give {flag('label_column')} (one label) or {flag('label_columns')} (a multilabel task), "
                          "not both")
    columns = _column_list("label_columns", label_columns, {})
    if len(columns) < 2:
        raise ConfigError(f"{flag('label_columns')} names one column ({columns[0]!r}): a single 0/1 label is a binary "
                          f"task, give it with {flag('label_column')}")
    if task not in (None, "multilabel"):
        raise ConfigError(f"{flag('label_columns')} makes a multilabel task; {flag('task')} says {task!r}")
    if positive_label is not None:
        raise ConfigError(f"{flag('positive_label')} binarizes one label column; each of {flag('label_columns')} "
                          "must hold 0/1 already")
    return columns


def _site_label_columns(label_column_site, label_columns, site_column, split_column) -> tuple[str, ...]:
    """The distinct columns ``label_column_site`` names, checked before touching the file."""
    if not label_column_site:
        return ()
    if label_columns is not None:
        raise ConfigError(f"{flag('label_column_site')} gives each site one label column; a multilabel task's "
                          f"{flag('label_columns')} are the same for every site")
    for site, column in label_column_site.items():
        if not isinstance(column, str) or not column:
            raise ConfigError(f"{flag('label_column_site')} {site}=...: give a column name, got {column!r}")
        if column in (site_column, split_column):
            role = "site_column" if column == site_column else "split_column"
            raise ConfigError(f"{flag('label_column_site')} {site}={column}: {column!r} is the {flag(role)}")
    return tuple(dict.fromkeys(label_column_site.values()))


def _check_parameters(site_column, label_column, split_column, features, impute, exclude=None, categorical=None,
                      covariates=None, label_columns=None) -> None:
    """Reject bad arguments before touching the file, so the message blames the option."""
    for key, value in (("site_column", site_column), ("label_column", label_column)):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{setting(key)} must be a column name, got {value!r}")
    if split_column is not None and (not isinstance(split_column, str) or not split_column):
        raise ConfigError(f"{setting('split_column')} must be a column name or left out, got {split_column!r}")
    roles = [("site_column", site_column)]
    roles += [("label_columns", c) for c in label_columns] if label_columns else [("label_column", label_column)]
    if split_column:
        roles.append(("split_column", split_column))
    seen: dict[str, str] = {}
    for role, col in roles:
        if col in seen:
            raise ConfigError(f"{flag(seen[col])} and {flag(role)} are both {col!r}; they must differ")
        seen[col] = role
    if impute is not None and impute not in IMPUTE_CHOICES:
        raise ConfigError(f"{flag('impute')} must be mean or median (or left out), got {impute!r}")
    if covariates is not None:
        from medfed.data.harmonize import check_covariates

        check_covariates(_column_list("covariates", covariates, {}), features or (), label=label_column)
    lists = {key: _column_list(key, value, seen) for key, value in
             (("features", features), ("exclude", exclude), ("categorical", categorical), ("covariates", covariates))}
    both = [c for c in lists["exclude"] or () if c in (lists["features"] or ()) + (lists["categorical"] or ())]
    if both:
        where = flag("features") if both[0] in (lists["features"] or ()) else flag("categorical")
        raise ConfigError(f"{flag('exclude')} and {where} both name {both[0]!r}; a column is either dropped or used")
    if lists["features"] is not None:
        unlisted = [c for c in lists["categorical"] or () if c not in lists["features"]]
        if unlisted:
            raise ConfigError(
                f"{flag('categorical')} names {_list(unlisted)}, which {flag('features')} does not list; "
                f"a categorical column is a feature: add it to {flag('features')} as well"
            )


def _column_list(key: str, value, roles: dict[str, str]) -> tuple[str, ...] | None:
    """``features``, ``exclude`` or ``categorical`` as a tuple of names, checked; None stays None."""
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ConfigError(f"{setting(key)} must be a list of column names, got {value!r}")
    if not value:
        what = " (or leave it out for all)" if key == "features" else ""
        raise ConfigError(f"{flag(key)} is an empty list; name at least one column{what}")
    bad = [f for f in value if not isinstance(f, str) or not f]
    if bad:
        raise ConfigError(f"{flag(key)} must list column names (strings), got {bad[0]!r}")
    dup = sorted({f for f in value if list(value).count(f) > 1})
    if dup:
        raise ConfigError(f"{flag(key)} lists {_list(dup)} more than once")
    clash = [f"{f!r} (the {roles[f].removesuffix('_columns').removesuffix('_column')} column)" for f in value if f in roles]
    if clash:
        raise ConfigError(f"{flag(key)} must not include {', '.join(clash)}")
    return tuple(value)


# --------------------------------------------------------------------------- reading


def read_frame(path: Path):
    """Read the file into a DataFrame; text files as strings so conversion stays ours."""
    suffix = path.suffix.lower()
    if suffix not in ALLOWED_EXTENSIONS:
        raise DataError(
            f"{path}: unsupported file type {path.suffix or '(no extension)'!r}; "
            f"allowed: {', '.join(ALLOWED_EXTENSIONS)}"
        )
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if not path.is_file():
        raise DataError(f"{path} is not a file")

    import pandas as pd

    if suffix in PARQUET_EXTENSIONS:
        try:
            return pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises many types; the user needs one line
            raise DataError(f"{path} could not be read as Parquet: {one_line(exc)}") from None

    sep, header = _sniff(path, suffix)
    if header is not None:
        # blank names are not duplicates: pandas reads them as 'Unnamed: N', refused later as features
        dup = sorted({c for c in header if c and header.count(c) > 1})
        if dup:
            raise DataError(f"{path}: column {_list(dup)} appears more than once in the header")
    try:
        with warnings.catch_warnings():
            # pandas only warns when a row has more fields than the header, then drops them
            warnings.simplefilter("error", pd.errors.ParserWarning)
            return pd.read_csv(
                path,
                sep=sep,
                dtype=str,
                encoding="utf-8-sig",
                skipinitialspace=True,
                index_col=False,
                engine="python" if sep == r"\s+" else "c",
            )
    except pd.errors.ParserWarning:
        raise DataError(
            f"{path}: some rows have more fields than the header ({len(header or [])} columns); "
            "check the delimiter and quoting"
        ) from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty") from None
    except Exception as exc:
        raise DataError(f"{path} could not be read as a table: {one_line(exc)}") from None


def _sniff(path: Path, suffix: str) -> tuple[str, list[str] | None]:
    """Pick the delimiter from the header line, which is simple, deterministic and explainable."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            first = fh.readline()
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; save it as UTF-8 CSV") from None
    except OSError as exc:
        raise DataError(f"{path} could not be opened: {one_line(exc)}") from None
    line = first.rstrip("\r\n")
    if not line.strip():
        raise DataError(f"{path} is empty or starts with a blank line; the first line must be the header")
    if suffix == ".tsv":
        sep = "\t"
    elif suffix == ".csv" and "," in line:
        sep = ","
    else:
        counts = {d: line.count(d) for d in _DELIMITERS}
        best = max(_DELIMITERS, key=lambda d: counts[d])
        if counts[best]:
            sep = best
        elif suffix == ".txt" and len(line.split()) > 1:
            return r"\s+", None
        else:
            sep = ","
    header = next(csv.reader([line], delimiter=sep))
    return sep, [h.strip() for h in header]


# --------------------------------------------------------------------------- columns


def _missing_mask(col) -> np.ndarray:
    """True where a cell is NA/None/NaN or blank text (pandas already read blanks as NA)."""
    import pandas as pd

    mask = np.array(col.isna(), dtype=bool)
    if col.dtype == object or pd.api.types.is_string_dtype(col.dtype):
        blank = col.map(lambda v: isinstance(v, str) and not v.strip()).to_numpy(dtype=bool)
        mask = mask | blank
    return mask


def _text(v: Any) -> str:
    """Canonical text of a cell, so 1, 1.0, "1" and " 1 " name the same site or label."""
    if isinstance(v, (bool, np.bool_)):
        return "1" if v else "0"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return str(int(f)) if f.is_integer() else repr(f)
    s = str(v).strip()
    low = s.lower()
    if low in ("true", "false"):
        return "1" if low == "true" else "0"
    try:
        f = float(s)
    except ValueError:
        return s
    if math.isfinite(f) and f.is_integer() and s.lstrip("+-").replace(".", "", 1).isdigit():
        return str(int(f))
    return s


def site_values(col, name: str, path: Path) -> list[str]:
    values = col.tolist()
    missing = np.flatnonzero(_missing_mask(col))
    if missing.size:
        raise DataError(
            f"{path}: site column {name!r} has {missing.size} missing values "
            f"(first at data row {missing[0] + 1}); every row needs a site"
        )
    out = []
    for v in values:
        if isinstance(v, (bool, np.bool_)):
            out.append(str(bool(v)))
        elif isinstance(v, (float, np.floating)) and float(v).is_integer():
            out.append(str(int(v)))
        else:
            out.append(str(v).strip())
    return out


def split_values(col, name: str, path: Path) -> np.ndarray:
    values = col.tolist()
    missing = int(_missing_mask(col).sum())
    if missing:
        raise DataError(
            f"{path}: split column {name!r} has {missing} missing values; "
            f"every row must be {' or '.join(SPLIT_VALUES)}"
        )
    norm = [str(v).strip().lower() for v in values]
    unknown = list(dict.fromkeys(str(v).strip() for v, n in zip(values, norm) if n not in SPLIT_VALUES))
    if unknown:
        raise DataError(
            f"{path}: split column {name!r} holds unknown values {_list(unknown)}; "
            f"allowed: {', '.join(SPLIT_VALUES)} (case-insensitive)"
        )
    return np.array([n == "train" for n in norm], dtype=bool)


@dataclass(frozen=True)
class Labels:
    """A label column read for its task: targets ``y`` (:class:`Site`'s dtype for ``task``),
    the class names of a multiclass task, the positive class of a binary one (``""`` otherwise)
    and ``source``: ``"given"`` or why the task was inferred."""

    y: np.ndarray
    task: str
    classes: tuple[str, ...] = ()
    positive: str = ""
    source: str = "given"

    def scattered(self, labeled: np.ndarray) -> Labels:
        """These labels (of the ``labeled`` rows) placed among every row, a placeholder 0 at the
        others (``Site.unlabeled`` marks them)."""
        y = np.zeros((labeled.size, *self.y.shape[1:]), dtype=self.y.dtype)
        y[labeled] = self.y
        return dataclasses.replace(self, y=y)


def unlabeled_rows(col, unlabeled_value: str | None) -> np.ndarray:
    """True where a label cell is empty or holds ``unlabeled_value`` (compared as canonical text,
    so ``-1`` also matches ``-1.0`` in a Parquet file)."""
    missing = _missing_mask(col)
    if unlabeled_value is None:
        return missing
    marker = _text(unlabeled_value)
    return missing | np.array([not m and _text(v) == marker for v, m in zip(col.tolist(), missing)], dtype=bool)


def sites_without_labels(unlabeled: np.ndarray, sites: np.ndarray, order: list[str], label_column: str,
                          unlabeled_value: str | None) -> str | None:
    """A problem naming each site with fewer than two labeled rows (one to train on, one to test on)."""
    lacking = [f"site {s!r} ({int((~unlabeled & (sites == s)).sum())} of {int((sites == s).sum())})" for s in order
               if (~unlabeled & (sites == s)).sum() < 2]
    if not lacking:
        return None
    marker = "empty" + (f" or {unlabeled_value!r}" if unlabeled_value is not None else "")
    return (f"label column {label_column!r}: {', '.join(lacking)} has fewer than 2 labeled rows ({marker} cells are "
            "unlabeled rows, which train but are never test rows); every site needs labeled rows to train and test on")

def site_targets(label_column_site: Mapping[str, str], label_column: str | None, order: list[str],
                 site_column: str, path: Path) -> dict[str, str]:
    """Each site's label column: its own from ``label_column_site``, else ``label_column``; a
    DataError for a site named that the file does not hold, or a site left without a column."""
    unknown = [s for s in label_column_site if s not in order]
    if unknown:
        raise DataError(f"{flag('label_column_site')} {unknown[0]}=...: no site {unknown[0]!r} in site column "
                        f"{site_column!r}; its sites: {_list(order)}")
    bare = [s for s in order if s not in label_column_site and label_column is None]
    if bare:
        raise DataError(f"site {bare[0]!r} has no label column: name it with {flag('label_column_site')} "
                        f"{bare[0]}=COL or give {flag('label_column')} for the sites not named")
    return {s: label_column_site.get(s, label_column) for s in order}


def site_label_cells(df, sites: np.ndarray, targets: Mapping[str, str]):
    """One label cell per row: the cell of the row's own site's label column."""
    cells = df[next(iter(targets.values()))].astype(object).copy()
    for site, column in targets.items():
        rows = sites == site
        cells[rows] = df[column][rows].astype(object)
    return cells


def check_site_targets(cells, sites: np.ndarray, targets: Mapping[str, str], task: str | None, positive_label: Any,
                       unlabeled_value: str | None, path: Path) -> None:
    """A DataError unless every per-site label column, read over its own sites' labeled rows,
    reads as the same task (binary with the same positive value, or the same classes, or regression)."""
    read: dict[str, tuple[list[str], str]] = {}
    for column in dict.fromkeys(targets.values()):
        own = [s for s, c in targets.items() if c == column]
        rows = np.isin(sites, own) & ~unlabeled_rows(cells, unlabeled_value)
        if not rows.any():
            continue  # sites_without_labels names them
        labels = task_labels(cells[rows].reset_index(drop=True), column, task, positive_label, path, sites[rows])
        kind = labels.task + (f" with positive {labels.positive!r}" if labels.positive else "") + (
            f" with classes {list(labels.classes)}" if labels.classes else "")
        read[column] = (own, kind)
    if len({kind for _, kind in read.values()}) > 1:
        each = "; ".join(f"site{'s' if len(own) > 1 else ''} {', '.join(map(repr, own))} column {c!r} reads as {kind}"
                         for c, (own, kind) in read.items())
        raise DataError(f"{flag('label_column_site')}: the sites' label columns read as different tasks ({each}); "
                        "every site's target must be one task kind with the same classes")


def task_labels(col, name: str, task: str | None, positive_label: Any, path: Path,
                sites: np.ndarray | None) -> Labels:
    """The label column as targets of ``task`` (None: inferred, :func:`medfed.data.tasks.infer_task`)."""
    task = check_task(task, "task")
    if task == "segmentation":
        raise DataError(f"{path}: label column {name!r} holds one value per row; a segmentation task reads a mask "
                        "per image (an image manifest's mask column, or mni-phantom --dataset-option task=segmentation)")
    if positive_label is not None and task not in (None, "binary"):
        raise DataError(f"{path}: {flag('positive_label')} makes label column {name!r} binary (that value against "
                        f"the others); it does not apply to task {task!r}")
    if positive_label is not None or task == "binary":
        y, positive = binary_labels(col, name, positive_label, path, sites)
        return Labels(y, "binary", positive=positive,
                      source="given" if task else f"{flag('positive_label')} {positive_label}")
    _no_missing_labels(col, name, path, sites)
    keys = [_text(v) for v in col.tolist()]
    distinct = list(dict.fromkeys(keys))
    source = "given"
    if task is None:
        try:
            task, source = infer_task(distinct)
        except DataError as exc:
            raise DataError(f"{path}: label column {name!r} {exc}") from None
        if task == "binary":
            y, positive = binary_labels(col, name, None, path, sites)
            return Labels(y, "binary", positive=positive, source=source)
    if task == "multiclass":
        classes = class_order(distinct)
        if len(classes) < 2:
            raise DataError(f"{path}: label column {name!r} holds one class only ({classes[0]!r}); "
                            "a multiclass task needs at least 2")
        index = {c: k for k, c in enumerate(classes)}
        return Labels(np.array([index[k] for k in keys], dtype=np.int64), task, classes, source=source)
    y = _numeric_column(col, name, path, fix=f"a regression target is a number; for classes use "
                        f"{setting('task', 'multiclass')}", what="label")
    if np.unique(y).size < 2:
        raise DataError(f"{path}: label column {name!r} holds one value only; a regression target must vary")
    return Labels(y, "regression", source=source)


def multilabel_labels(df, names: Sequence[str], path: Path, sites: np.ndarray | None) -> Labels:
    """The ``label_columns`` of a multilabel task: each a 0/1 column with both values (as
    :func:`binary_labels` reads one), stacked into ``(n, K)`` int8 targets named by the columns."""
    y = np.stack([binary_labels(df[c], c, None, path, sites)[0] for c in names], axis=1)
    return Labels(y, "multilabel", tuple(names), source="given")


def _no_missing_labels(col, name: str, path: Path, sites: np.ndarray | None) -> None:
    """A DataError when some row has no label (``sites``, when known, say where)."""
    missing = _missing_mask(col)
    if missing.any():
        where = "" if sites is None else f" ({_per_site(missing, sites)})"
        raise DataError(
            f"{path}: label column {name!r} has {int(missing.sum())} missing values{where}, first at "
            f"data row {int(np.argmax(missing)) + 1}; every subject needs a label"
        )


def binary_labels(col, name: str, positive_label: Any, path: Path, sites: np.ndarray | None) -> tuple[np.ndarray, str]:
    """Binary labels from a 0/1 column, or from ``positive_label`` compared as text.

    ``sites`` (each row's site, or None when unknown) only serves the message about missing labels.
    """
    values = col.tolist()
    _no_missing_labels(col, name, path, sites)
    keys = [_text(v) for v in values]
    distinct = list(dict.fromkeys(keys))
    if positive_label is not None:
        positive = _text(positive_label)
        if positive not in distinct:
            raise DataError(
                f"{path}: positive label {str(positive_label)!r} never occurs in label column "
                f"{name!r}; its values are {_list(distinct)}"
            )
        y = np.array([k == positive for k in keys], dtype=np.int8)
    elif sorted(distinct) == ["0", "1"]:
        positive = "1"
        y = np.array([k == "1" for k in keys], dtype=np.int8)
    else:
        kind = "one value only" if len(distinct) == 1 else f"{len(distinct)} distinct values"
        raise DataError(
            f"{path}: label column {name!r} is not 0/1 (it holds {kind}: {_list(distinct)}); "
            f"pass {setting('positive_label')} to say which value is the positive class, all "
            "others becoming 0"
        )
    if y.all() or not y.any():
        raise DataError(
            f"{path}: every row of label column {name!r} is "
            f"{'the positive' if y.all() else 'a negative'} class; both classes are needed"
        )
    return y, positive


def _numeric_column(col, name: str, path: Path, fix: str | None = None, what: str = "feature") -> np.ndarray:
    """Float values of a feature column, NaN where missing; booleans count as 0/1. ``fix`` is
    what the message about a non-numeric value suggests (default: how ``medfed run`` can use
    such a column); ``what`` names the column's role."""
    import pandas as pd

    dtype = col.dtype
    if pd.api.types.is_bool_dtype(dtype) or pd.api.types.is_numeric_dtype(dtype):
        out = col.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        missing = _missing_mask(col)
        text = col.astype(object).where(~missing, None).map(
            lambda v: None if v is None else (float(v) if isinstance(v, (bool, np.bool_)) else v)
        )
        text = text.map(lambda v: v.strip() if isinstance(v, str) else v)
        text = text.map(
            lambda v: {"true": 1.0, "false": 0.0}.get(v.lower(), v) if isinstance(v, str) else v
        )
        num = pd.to_numeric(text, errors="coerce")
        out = num.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = np.flatnonzero(np.isnan(out) & ~missing & ~text.map(_spells_nan).to_numpy(dtype=bool))
        if bad.size:
            i = int(bad[0])
            fix = fix or (
                f"one-hot encode it with {flag('categorical')} {_shell(name)}, leave it out "
                f"with {flag('exclude')} {_shell(name)}, or name the numeric columns with {setting('features')}"
            )
            raise DataError(
                f"{path}: {what} column {name!r} is not numeric ({bad.size} value(s), first "
                f"{str(col.iloc[i]).strip()!r} at data row {i + 1}); {what}s must be numbers or booleans: {fix}"
            )
    inf = np.isinf(out)
    if inf.any():
        i = int(np.argmax(inf))
        raise DataError(
            f"{path}: {what} column {name!r} holds infinite values ({int(inf.sum())}, first at "
            f"data row {i + 1}); replace them with numbers or leave the cells empty"
        )
    return out


def covariate_values(col, name: str, path: Path, sites: np.ndarray | None) -> np.ndarray:
    """A covariate column's numbers (booleans as 0/1); a missing value is refused, since
    harmonization adjusts every row, test rows included, by its covariates."""
    values = _numeric_column(col, name, path, fix="encode it as numbers (e.g. sex as 0/1)", what="covariate")
    missing = np.isnan(values)
    if missing.any():
        where = f" ({_per_site(missing, sites)})" if sites is not None else ""
        raise DataError(
            f"{path}: covariate column {name!r} has {int(missing.sum())} missing value(s){where}, first at data row "
            f"{int(np.argmax(missing)) + 1}; harmonization adjusts every row by its covariates: fill them in, "
            f"drop those rows, or leave {name!r} out of {flag('covariates')}")
    return values


def _spells_nan(v: Any) -> bool:
    return isinstance(v, str) and v.lower() in ("nan", "-nan", "+nan")


def _one_hot_column(col, name: str, path: Path) -> tuple[np.ndarray, tuple[str, ...]]:
    """Indicators of a categorical column, one per level in the file (sorted), and the levels."""
    missing = _missing_mask(col)
    if missing.any():
        raise DataError(
            f"{path}: categorical column {name!r} has {int(missing.sum())} missing values (first at "
            f"data row {int(np.argmax(missing)) + 1}); give them a level of their own, e.g. 'unknown'"
        )
    # text as written (stripped); numbers (Parquet) canonical, so 1.0 and 1 are one level
    values = [v.strip() if isinstance(v, str) else _text(v) for v in col.tolist()]
    levels = tuple(sorted(set(values)))
    return one_hot(values, levels), levels


def _missing_problems(X: np.ndarray, names: list[str], impute: str | None, sites: np.ndarray | None) -> list[str]:
    """Columns with no value at all, and (without ``impute``) missing values, as problems."""
    nan = np.isnan(X)
    per_col = nan.sum(axis=0)
    out = []
    empty = [names[j] for j in range(len(names)) if per_col[j] == X.shape[0]]
    if empty:
        out.append(
            f"feature column {_list(empty)} has no values at all; leave it out with "
            f"{flag('exclude')} {_shell(empty[0])}{',...' if len(empty) > 1 else ''}"
        )
    cols = [j for j in range(len(names)) if per_col[j] and names[j] not in empty]
    if impute is not None or not cols:
        return out
    j = cols[0]
    where = "" if sites is None else f" ({_per_site(nan[:, j], sites)})"
    others = ""
    if len(cols) > 1:
        others = f"; {len(cols) - 1} other feature column(s) also have missing values: {_list([names[k] for k in cols[1:]])}"
    out.append(
        f"feature column {names[j]!r} has {int(per_col[j])} missing values{where}{others}; pass "
        f"{setting('impute')} to fill them from each site's training rows"
    )
    return out


# pandas names a column whose header cell is blank "Unnamed: N" (N: its position)
_UNNAMED = re.compile(r"Unnamed: \d+")


def _unnamed_column(col, name: str, position: int) -> str | None:
    """A problem when a would-be feature has no header name (e.g. a row index pandas wrote)."""
    if name.strip() and not _UNNAMED.fullmatch(name):
        return None
    fix = f"leave it out with {flag('exclude')} {_shell(name)} or name it in the header"
    try:
        values = col.astype(float).to_numpy()
    except (TypeError, ValueError):
        values = None
    if position == 0 and values is not None and np.array_equal(values, np.arange(len(col))):
        return (
            f"the first column has no header name (read as {name!r}) and holds 0..{len(col) - 1}: a row index, "
            f"as pandas' to_csv writes by default; it is not a feature: {fix} "
            "(or re-save the file with index=False)"
        )
    return f"column {position + 1} has no header name (read as {name!r}); {fix}"


def _small_sites(row_sites: list[str], site_column: str) -> str | None:
    counts: dict[str, int] = {}
    for s in row_sites:
        counts[s] = counts.get(s, 0) + 1
    small = [f"{s!r} ({n} rows)" for s, n in counts.items() if n < MIN_SITE_SAMPLES]
    if not small:
        return None
    return (
        f"site {', '.join(small)} in column {site_column!r} has fewer than {MIN_SITE_SAMPLES} rows; "
        f"every site needs at least {MIN_SITE_SAMPLES} for a train/test split (merge or drop small sites)"
    )


def _sites_without_split_rows(split: np.ndarray, sites: np.ndarray, order: list[str], split_column: str) -> str | None:
    lacking = []
    for s in order:
        rows = split[sites == s]
        if rows.all() or not rows.any():
            lacking.append(f"site {s!r} has no {'test' if rows.all() else 'train'} rows")
    if not lacking:
        return None
    return f"{', '.join(lacking)} in split column {split_column!r}; every site needs both train and test rows"


# --------------------------------------------------------------------------- messages


def _per_site(mask: np.ndarray, sites: np.ndarray) -> str:
    parts = []
    for s in dict.fromkeys(sites[mask].tolist()):
        parts.append(f"site {s!r}: {int((mask & (sites == s)).sum())}")
    return ", ".join(parts)


def _list(items: Sequence[Any], limit: int = _MAX_LISTED) -> str:
    items = list(items)
    shown = ", ".join(repr(str(i)) for i in items[:limit])
    if len(items) > limit:
        shown += f", ... ({len(items) - limit} more)"
    return shown


def _shell(name: str) -> str:
    """A column name as a user would type it after a flag (quoted when it holds spaces)."""
    return f'"{name}"' if not re.fullmatch(r"[\w.=-]+", name) else name


def one_line(exc: BaseException) -> str:
    """An exception from a third-party reader as one short line for an error message."""
    text = " ".join(str(exc).split())
    return (text[:300] + "...") if len(text) > 300 else text or type(exc).__name__
