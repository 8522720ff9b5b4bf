"""UCI Heart Disease: a real federation of four hospitals, shipped with medfed.

The same 14 attributes were recorded independently at Cleveland, Budapest (Hungary),
Zurich/Basel (Switzerland) and Long Beach (VA), so the sites differ the way real sites do:
in label balance, in case mix and in what was measured. See
``files/uci-heart-disease/README.md`` for the provenance and checksums.

The files are read with the standard library and numpy only; pandas would add about a
second to a command's start for 920 rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.resources import files

import numpy as np

from medfed.data.datasets.options import names_list
from medfed.data.federation import Federation, Site
from medfed.data.hints import flag, setting
from medfed.errors import ConfigError, DataError

COLUMNS = (
    "age", "sex", "cp", "trestbps", "chol", "fbs", "restecg",
    "thalach", "exang", "oldpeak", "slope", "ca", "thal", "num",
)
FEATURES = COLUMNS[:-1]
# slope, ca and thal are dropped by default: outside Cleveland they are mostly missing
# (ca: 291/294 rows at Hungary, 118/123 at Switzerland, 198/200 at VA; thal: 266/294 at
# Hungary, 166/200 at VA), and imputing a column that a site barely measured invents data.
DEFAULT_FEATURES = FEATURES[:10]
SITES = (
    ("Cleveland", "processed.cleveland.data"),
    ("Hungary", "processed.hungarian.data"),
    ("Switzerland", "processed.switzerland.data"),
    ("VA", "processed.va.data"),
)
POSITIVE_LABEL = "disease (num>0)"
ATTRIBUTION = (
    'UCI Machine Learning Repository, "Heart Disease" (Janosi, Steinbrunn, Pfisterer, Detrano, '
    "1988), CC BY 4.0. Principal investigators: Andras Janosi, M.D. (Hungarian Institute of "
    "Cardiology, Budapest); William Steinbrunn, M.D. (University Hospital, Zurich); Matthias "
    "Pfisterer, M.D. (University Hospital, Basel); Robert Detrano, M.D., Ph.D. (V.A. Medical "
    "Center, Long Beach, and Cleveland Clinic Foundation)."
)


def load_heart_disease(
    features: Sequence[str] | None = None, impute: str | None = "median"
) -> Federation:
    """The four hospitals as sites; the target is any angiographic disease (num > 0).

    Positive rates differ sharply (Cleveland 139/303, Hungary 106/294, Switzerland 115/123,
    VA 149/200), which is the point: this is label skew that nobody simulated.

    ``features`` defaults to the ten columns age..oldpeak; ``slope``, ``ca`` and ``thal``
    may be named too, but they are mostly missing outside Cleveland.

    Missing values (``?`` in the files) occur at Hungary, Switzerland and VA even among the
    default columns (e.g. trestbps, thalach, exang and oldpeak for 53-56 of VA's 200 rows),
    hence ``impute="median"`` by default; the medians come later from each site's training
    rows only. ``impute=None`` makes the federation refuse the missing values instead.

    ``chol`` is 0 for every Switzerland row and for 49 VA rows: that is how the original
    records code "not measured". It is kept as recorded, not turned into a missing value,
    so results stay comparable with the literature; a model can learn that 0 means unknown.
    """
    names = _features(names_list(features))
    if isinstance(impute, str) and impute.lower() == "none":  # how a command line spells None
        impute = None
    if impute is not None and impute not in ("mean", "median"):
        raise ConfigError(
            f"{setting('impute')} must be mean or median (or --dataset-option impute=none to refuse "
            f"missing values), got {impute!r}"
        )
    cols = [FEATURES.index(f) for f in names]
    root = files("medfed.data.datasets") / "files" / "uci-heart-disease"
    sites = []
    for site, filename in SITES:
        data = _read(root / filename, filename)
        sites.append(Site(name=site, X=data[:, cols], y=(data[:, -1] > 0).astype(np.int8)))
    return Federation(
        name="heart-disease",
        sites=tuple(sites),
        feature_names=tuple(names),
        description=(
            "UCI Heart Disease, four hospitals as sites (Cleveland, Hungary, Switzerland, VA); "
            "target: angiographic disease, num > 0"
        ),
        attribution=ATTRIBUTION,
        positive_label=POSITIVE_LABEL,
        impute=impute,
        info={
            "source": "embedded: medfed/data/datasets/files/uci-heart-disease",
            "features_selected_by": "default" if features is None else "list",
            "dropped_by_default": [f for f in FEATURES if f not in DEFAULT_FEATURES],
            "chol_zero_means": "not measured (Switzerland all rows, VA 49 rows); kept as recorded",
        },
    )


def _features(features: Sequence[str] | None) -> list[str]:
    if features is None:
        return list(DEFAULT_FEATURES)
    if isinstance(features, str) or not isinstance(features, Sequence):
        raise ConfigError(f"{setting('features')} must be a list of column names, got {features!r}")
    names = list(features)
    if not names:
        raise ConfigError(f"{flag('features')} is empty; choose from {', '.join(FEATURES)}")
    unknown = [f for f in names if f not in FEATURES]
    if unknown:
        extra = " (num is the target)" if "num" in unknown else ""
        raise ConfigError(
            f"no feature {unknown[0]!r}{extra} ({flag('features')}); choose from {', '.join(FEATURES)}"
        )
    dup = sorted({f for f in names if names.count(f) > 1})
    if dup:
        raise ConfigError(f"{flag('features')} lists {', '.join(dup)} more than once")
    return names


def _read(resource, filename: str) -> np.ndarray:
    """Parse one processed.*.data file; ``?`` becomes NaN."""
    rows = []
    for lineno, line in enumerate(resource.read_text(encoding="ascii").splitlines(), 1):
        if not line.strip():
            continue
        cells = line.split(",")
        if len(cells) != len(COLUMNS):
            raise DataError(
                f"embedded {filename}, line {lineno}: {len(cells)} fields, expected {len(COLUMNS)}"
            )
        try:
            rows.append([np.nan if c.strip() == "?" else float(c) for c in cells])
        except ValueError:
            raise DataError(f"embedded {filename}, line {lineno}: a field is not a number") from None
    return np.array(rows, dtype=np.float64)
