"""Per-split preprocessing that never pools rows: imputation and standardization.

Both use statistics of training rows only. Global standardization is assembled from
per-site sufficient statistics (row count, sum, sum of squares): those three summaries are
all that would leave a site, and the result equals the pooled mean and standard deviation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medfed.data.hints import setting
from medfed.errors import DataError


@dataclass(frozen=True, slots=True)
class Imputer:
    """Fills NaN with per-column values (mean or median) of one site's training rows.

    The values are a site's shareable summary, like :class:`Moments`; a saved model records
    each site's, so that new rows are filled the way that site's test rows were.
    """

    strategy: str
    values: np.ndarray

    @classmethod
    def fit(cls, X_train: np.ndarray, strategy: str, *, site: str, feature_names: Sequence[str]) -> Imputer:
        observed = ~np.isnan(X_train)
        empty = np.flatnonzero(~observed.any(axis=0))
        if empty.size:
            cols = ", ".join(repr(feature_names[j]) for j in empty)
            raise DataError(
                f"site {site!r}: column(s) {cols} have no observed value in the site's training rows, "
                f"so they cannot be imputed there; leave them out with {setting('exclude')}"
            )
        stat = np.nanmean(X_train, axis=0) if strategy == "mean" else np.nanmedian(X_train, axis=0)
        return cls(strategy, stat)

    def __call__(self, X: np.ndarray) -> np.ndarray:
        return np.where(np.isnan(X), self.values, X)


@dataclass(frozen=True, slots=True)
class Moments:
    """A site's shareable summary of its training rows: count, column sums, sums of squares."""

    n: int
    total: np.ndarray
    total_sq: np.ndarray

    @classmethod
    def of(cls, X: np.ndarray) -> Moments:
        """Column moments of a feature matrix; for images ``(n, C, ...)``, per-channel moments
        over every pixel (``n`` counts pixels), so standardizing normalizes intensities."""
        if X.ndim > 2:
            channels = np.moveaxis(X, 1, -1).reshape(-1, X.shape[1]).astype(np.float64)
            return cls(channels.shape[0], channels.sum(axis=0), np.einsum("ij,ij->j", channels, channels))
        return cls(X.shape[0], X.sum(axis=0), np.einsum("ij,ij->j", X, X))

    def __add__(self, other: Moments) -> Moments:
        return Moments(self.n + other.n, self.total + other.total, self.total_sq + other.total_sq)


@dataclass(frozen=True, slots=True)
class Standardizer:
    """``(X - mean) / scale``; constant columns get scale 1 so they map to zero, not NaN."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def from_moments(cls, moments: Sequence[Moments]) -> Standardizer:
        total = moments[0]
        for m in moments[1:]:
            total = total + m
        mean = total.total / total.n
        var = np.maximum(total.total_sq / total.n - mean**2, 0.0)
        scale = np.sqrt(var)
        scale[scale < 1e-12 * np.maximum(1.0, np.abs(mean))] = 1.0
        return cls(mean, scale)

    @classmethod
    def identity(cls, n_features: int) -> Standardizer:
        return cls(np.zeros(n_features), np.ones(n_features))

    def _broadcast(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if X.ndim <= 2:
            return self.mean, self.scale
        shape = (1, -1) + (1,) * (X.ndim - 2)  # per channel
        return self.mean.reshape(shape).astype(X.dtype), self.scale.reshape(shape).astype(X.dtype)

    def __call__(self, X: np.ndarray) -> np.ndarray:
        mean, scale = self._broadcast(X)
        return (X - mean) / scale
