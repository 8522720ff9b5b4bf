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
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medfed.data.federation import MIN_SITE_SAMPLES, Federation, Site
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
    label_column: str,
    split_column: str | None = None,
    features: Sequence[str] | None = None,
    impute: str | None = None,
    positive_label: Any = None,
    name: str | None = None,
) -> Federation:
    """Read a CSV or Parquet table with one row per subject into a federation of sites.

    Sites are the distinct values of ``site_column`` in order of first appearance, so a
    table written site by site keeps its order in reports. Labels must already be binary
    (0/1) unless ``positive_label`` says which value is the positive class; the loader never
    guesses, because a silently flipped label inverts every metric.

    Missing feature values are an error unless ``impute`` is ``"mean"`` or ``"median"``; then
    they stay NaN here and are filled later from each site's *training* rows only, so that
    test rows never leak into the statistics.

    A site whose training rows hold one class is accepted: label skew is common in medicine
    and the federation can still learn from such a site.
    """
    _check_parameters(site_column, label_column, split_column, features, impute)
    path = Path(path)
    df = read_frame(path)
    columns = [str(c) for c in df.columns]
    df.columns = columns
    if len(df) == 0:
        raise DataError(f"{path} holds no data rows (only a header, or nothing at all)")

    wanted = [site_column, label_column] + ([split_column] if split_column else [])
    wanted += list(features or [])
    for col in wanted:
        if col not in columns:
            raise DataError(
                f"column {col!r} is not in {path}; available columns: "
                f"{_list(columns, limit=40)}"
            )

    reserved = {site_column, label_column, split_column}
    if features is None:
        feature_names = [c for c in columns if c not in reserved]
        if not feature_names:
            raise DataError(
                f"{path} has no feature columns besides the site, label and split columns"
            )
    else:
        feature_names = list(features)

    row_sites = site_values(df[site_column], site_column, path)
    site_order = list(dict.fromkeys(row_sites))
    counts = {s: 0 for s in site_order}
    for s in row_sites:
        counts[s] += 1
    small = [f"{s!r} ({counts[s]} rows)" for s in site_order if counts[s] < MIN_SITE_SAMPLES]
    if small:
        raise DataError(
            f"{path}: site {', '.join(small)} in column {site_column!r} has fewer than "
            f"{MIN_SITE_SAMPLES} rows; every site needs at least {MIN_SITE_SAMPLES} for a "
            "train/test split (merge or drop small sites)"
        )
    position = {s: i for i, s in enumerate(site_order)}
    site_index = np.array([position[s] for s in row_sites])
    site_arr = np.asarray(row_sites, dtype=object)

    split = None
    if split_column:
        split = split_values(df[split_column], split_column, path)
        for s in site_order:
            rows = split[site_arr == s]
            if rows.all() or not rows.any():
                missing = "test" if rows.all() else "train"
                raise DataError(
                    f"{path}: site {s!r} has no {missing} rows in split column {split_column!r}; "
                    "every site needs both train and test rows"
                )

    y, positive = binary_labels(df[label_column], label_column, positive_label, path, site_arr)

    X = np.empty((len(df), len(feature_names)), dtype=np.float64)
    for j, col in enumerate(feature_names):
        X[:, j] = _numeric_column(df[col], col, path)
    _check_missing(X, feature_names, impute, path, site_arr)

    sites = []
    for i, s in enumerate(site_order):
        rows = site_index == i
        sites.append(
            Site(name=s, X=X[rows], y=y[rows], split=None if split is None else split[rows])
        )
    return Federation(
        name=name or path.stem,
        sites=tuple(sites),
        feature_names=tuple(feature_names),
        description=(
            f"table {path.name}: {len(df)} subjects at {len(sites)} sites, "
            f"{len(feature_names)} features"
        ),
        attribution="",
        positive_label=positive,
        impute=impute,
        info={
            "source": str(path),
            "site_column": site_column,
            "label_column": label_column,
            "split_column": split_column,
            "features_selected_by": "all" if features is None else "list",
        },
    )


# --------------------------------------------------------------------------- parameters


def _check_parameters(site_column, label_column, split_column, features, impute) -> None:
    """Reject bad arguments before touching the file, so the message blames the option."""
    for opt, value in (("site_column", site_column), ("label_column", label_column)):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{opt} must be a column name, got {value!r}")
    if split_column is not None and (not isinstance(split_column, str) or not split_column):
        raise ConfigError(f"split_column must be a column name or None, got {split_column!r}")
    roles = {"site_column": site_column, "label_column": label_column}
    if split_column:
        roles["split_column"] = split_column
    seen: dict[str, str] = {}
    for role, col in roles.items():
        if col in seen:
            raise ConfigError(f"{seen[col]} and {role} are both {col!r}; they must differ")
        seen[col] = role
    if impute is not None and impute not in IMPUTE_CHOICES:
        raise ConfigError(f"impute must be 'mean', 'median' or None, got {impute!r}")
    if features is not None:
        if isinstance(features, str) or not isinstance(features, Sequence):
            raise ConfigError(
                f"features must be a list of column names, got {features!r}"
            )
        if not features:
            raise ConfigError("features is an empty list; name at least one column (or pass None for all)")
        bad = [f for f in features if not isinstance(f, str) or not f]
        if bad:
            raise ConfigError(f"features must be column names (strings), got {bad[0]!r}")
        dup = sorted({f for f in features if list(features).count(f) > 1})
        if dup:
            raise ConfigError(f"features lists {_list(dup)} more than once")
        clash = [f"{f!r} (the {seen[f].removesuffix('_column')} column)" for f in features if f in seen]
        if clash:
            raise ConfigError(f"features must not include {', '.join(clash)}")


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
        dup = sorted({c for c in header if header.count(c) > 1})
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


def binary_labels(col, name: str, positive_label: Any, path: Path, sites: np.ndarray) -> tuple[np.ndarray, str]:
    """Binary labels from a 0/1 column, or from ``positive_label`` compared as text."""
    values = col.tolist()
    missing = _missing_mask(col)
    if missing.any():
        raise DataError(
            f"{path}: label column {name!r} has {int(missing.sum())} missing values "
            f"({_per_site(missing, sites)}); every subject needs a label"
        )
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
            "pass --positive-label VALUE (positive_label=) to say which value is the positive "
            "class, all others becoming 0"
        )
    if y.all() or not y.any():
        raise DataError(
            f"{path}: every row of label column {name!r} is "
            f"{'the positive' if y.all() else 'a negative'} class; both classes are needed"
        )
    return y, positive


def _numeric_column(col, name: str, path: Path) -> np.ndarray:
    """Float values of a feature column, NaN where missing; booleans count as 0/1."""
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
            raise DataError(
                f"{path}: feature column {name!r} is not numeric (e.g. {str(col.iloc[i]).strip()!r} "
                f"at data row {i + 1}); features must be numbers or booleans; name the numeric "
                "columns explicitly (features=) to leave this one out"
            )
    inf = np.isinf(out)
    if inf.any():
        i = int(np.argmax(inf))
        raise DataError(
            f"{path}: feature column {name!r} holds infinite values ({int(inf.sum())}, first at "
            f"data row {i + 1}); replace them with numbers or leave the cells empty"
        )
    return out


def _spells_nan(v: Any) -> bool:
    return isinstance(v, str) and v.lower() in ("nan", "-nan", "+nan")


def _check_missing(X: np.ndarray, names: list[str], impute: str | None, path: Path, sites: np.ndarray) -> None:
    nan = np.isnan(X)
    per_col = nan.sum(axis=0)
    empty = [names[j] for j in range(len(names)) if per_col[j] == X.shape[0]]
    if empty:
        raise DataError(
            f"{path}: feature column {_list(empty)} has no values at all; leave it out "
            "by naming the feature columns explicitly (features=)"
        )
    if impute is not None or not per_col.any():
        return
    cols = [j for j in range(len(names)) if per_col[j]]
    j = cols[0]
    others = ""
    if len(cols) > 1:
        others = f"; {len(cols) - 1} other feature column(s) also have missing values: {_list([names[k] for k in cols[1:]])}"
    raise DataError(
        f"{path}: feature column {names[j]!r} has {int(per_col[j])} missing values "
        f"({_per_site(nan[:, j], sites)}){others}; pass --impute mean|median (impute=) to fill "
        "them from each site's training rows"
    )


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


def one_line(exc: BaseException) -> str:
    """An exception from a third-party reader as one short line for an error message."""
    text = " ".join(str(exc).split())
    return (text[:300] + "...") if len(text) > 300 else text or type(exc).__name__
