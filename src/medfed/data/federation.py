"""Sites and federations: the data each participant holds, and nothing about training."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from medfed.errors import DataError

MIN_SITE_SAMPLES = 10


class SingleClassSiteWarning(UserWarning):
    """A site's training rows hold one class only (legal: label skew is common in medicine)."""


@dataclass(frozen=True)
class Site:
    """One participant: a feature matrix, binary labels, optionally a predefined split.

    ``split`` is ``None`` or a boolean array, ``True`` for training rows. ``X`` may hold NaN
    for missing values only when the federation names an imputation strategy; imputation
    happens per split, from the site's training rows (``medfed.data.preprocess``).
    """

    name: str
    X: np.ndarray
    y: np.ndarray
    split: np.ndarray | None = None

    def __post_init__(self) -> None:
        X = np.ascontiguousarray(self.X, dtype=np.float64)
        y = np.asarray(self.y)
        if X.ndim != 2:
            raise DataError(f"site {self.name!r}: features must be a 2-D array, got shape {X.shape}")
        if y.shape != (X.shape[0],):
            raise DataError(
                f"site {self.name!r}: {y.shape[0] if y.ndim else 0} labels for {X.shape[0]} rows"
            )
        if not np.isin(y, (0, 1)).all():
            raise DataError(f"site {self.name!r}: labels must be 0 or 1, got {sorted(set(y.tolist()))[:5]}")
        if np.isinf(X).any():
            raise DataError(f"site {self.name!r}: features contain infinite values")
        if X.shape[0] < MIN_SITE_SAMPLES:
            raise DataError(
                f"site {self.name!r} has {X.shape[0]} samples; at least {MIN_SITE_SAMPLES} are needed "
                "for a train/test split"
            )
        object.__setattr__(self, "X", X)
        object.__setattr__(self, "y", y.astype(np.int8))
        if self.split is not None:
            split = np.asarray(self.split, dtype=bool)
            if split.shape != y.shape:
                raise DataError(f"site {self.name!r}: split has {split.size} entries for {y.size} rows")
            if not split.any() or split.all():
                raise DataError(
                    f"site {self.name!r}: the predefined split must hold both train and test rows"
                )
            object.__setattr__(self, "split", split)

    @property
    def n(self) -> int:
        return int(self.X.shape[0])


@dataclass(frozen=True)
class Federation:
    """An ordered set of sites sharing one feature space.

    ``description`` and ``attribution`` travel into results so a report says what data it
    is about and whom to credit.
    """

    name: str
    sites: tuple[Site, ...]
    feature_names: tuple[str, ...]
    description: str = ""
    attribution: str = ""
    positive_label: str = "1"
    impute: str | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        sites = tuple(self.sites)
        if not sites:
            raise DataError(f"federation {self.name!r} has no sites")
        names = [s.name for s in sites]
        if len(set(names)) != len(names):
            raise DataError(f"federation {self.name!r}: duplicate site names {names}")
        d = len(self.feature_names)
        for s in sites:
            if s.X.shape[1] != d:
                raise DataError(
                    f"site {s.name!r} has {s.X.shape[1]} features; the federation has {d}"
                )
        if self.impute not in (None, "mean", "median"):
            raise DataError(f"impute must be 'mean', 'median' or None, got {self.impute!r}")
        if self.impute is None:
            for s in sites:
                missing = np.isnan(s.X).sum(axis=0)
                if missing.any():
                    j = int(np.argmax(missing))
                    raise DataError(
                        f"site {s.name!r}: column {self.feature_names[j]!r} has {int(missing[j])} "
                        "missing values; choose an imputation (impute = 'mean' or 'median')"
                    )
        object.__setattr__(self, "sites", sites)
        object.__setattr__(self, "feature_names", tuple(self.feature_names))

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]

    @property
    def has_predefined_split(self) -> bool:
        return all(s.split is not None for s in self.sites)

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise DataError(f"no site {name!r}; sites are {self.site_names}")

