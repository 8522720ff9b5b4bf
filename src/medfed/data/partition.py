"""Split one pooled data set into simulated sites.

Real federations are rarely available, so experiments carve one data set into sites. The IID
split is the optimistic baseline; the Dirichlet label split (Hsu, Qi and Brown, 2019; the
partition most federated-learning benchmarks use) produces the label skew that makes
federated averaging hard, with ``alpha`` as the dial: small ``alpha``, strong skew.

Both functions are pure: the same input and seed give the same partition on every machine,
and every index appears in exactly one site. Each site's indices are returned in ascending
order, so a site's rows keep the order they had in the pooled data, as a real site's table
would; consumers draw their own random train/test split.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from medfed.errors import ConfigError

Seed = int | np.random.Generator


def iid_partition(n_or_y: int | Any, n_sites: int, seed: Seed) -> list[np.ndarray]:
    """Shuffle and deal rows to ``n_sites`` sites of near-equal size (sizes differ by ≤ 1).

    Given labels instead of a count, each class is dealt separately and in turn, so every
    site also receives near-equal counts of each class: the IID baseline should not carry
    label skew by chance on small data sets.
    """
    _check_sites(n_sites)
    rng = _rng(seed)
    if isinstance(n_or_y, (int, np.integer)) and not isinstance(n_or_y, (bool, np.bool_)):
        n = int(n_or_y)
        if n < 0:
            raise ConfigError(f"number of samples must be ≥ 0, got {n}")
        order = rng.permutation(n)
    else:
        y = _labels(n_or_y)
        n = y.size
        groups = []
        for cls in np.unique(y):
            idx = np.flatnonzero(y == cls)
            groups.append(rng.permutation(idx))
        order = np.concatenate(groups) if groups else np.empty(0, dtype=np.int64)
    if n < n_sites:
        raise ConfigError(f"n_sites={n_sites} exceeds the number of samples ({n}); every site needs rows")
    # Deal in turn from a random starting site, so that the sites holding one row more than
    # the others are not always the first ones.
    start = int(rng.integers(n_sites))
    owner = (np.arange(n) + start) % n_sites
    return [np.sort(order[owner == k]).astype(np.int64) for k in range(n_sites)]


def dirichlet_label_partition(
    y: Any,
    n_sites: int,
    alpha: float,
    seed: Seed,
    min_size: int = 10,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Label-skewed sites: each class's rows are shared out in proportions drawn from Dirichlet(alpha).

    A draw that leaves any site with fewer than ``min_size`` rows is redrawn (a site that
    small cannot be split into training and test rows); after ``max_tries`` failures the
    request is judged impossible rather than silently relaxed, since relaxing it would
    change the skew the experiment asked for.
    """
    _check_sites(n_sites)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)):
        raise ConfigError(f"alpha must be a positive number, got {alpha!r}")
    if not (math.isfinite(float(alpha)) and alpha > 0):
        raise ConfigError(f"alpha must be a finite number > 0, got {alpha!r}")
    for opt, value, low in (("min_size", min_size, 0), ("max_tries", max_tries, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ConfigError(f"{opt} must be an integer ≥ {low}, got {value!r}")
    rng = _rng(seed)
    y = _labels(y)
    n = y.size
    if n < n_sites * max(min_size, 1):
        raise ConfigError(
            f"{n} samples cannot give n_sites={n_sites} sites of at least {max(min_size, 1)} rows each; "
            "use fewer sites"
        )
    classes = np.unique(y)
    by_class = [np.flatnonzero(y == c) for c in classes]
    for _ in range(int(max_tries)):
        owner = np.empty(n, dtype=np.int64)
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(n_sites, float(alpha)))
            cuts = (np.cumsum(p)[:-1] * idx.size).astype(np.int64)
            for k, part in enumerate(np.split(idx, cuts)):
                owner[part] = k
        sizes = np.bincount(owner, minlength=n_sites)
        if sizes.min() >= max(min_size, 1):
            return [np.flatnonzero(owner == k).astype(np.int64) for k in range(n_sites)]
    raise ConfigError(
        f"no Dirichlet label partition with alpha={alpha} gave all n_sites={n_sites} sites at "
        f"least {max(min_size, 1)} of the {n} samples in {max_tries} tries; use a larger alpha "
        "or fewer sites"
    )


def _check_sites(n_sites: Any) -> None:
    if isinstance(n_sites, bool) or not isinstance(n_sites, (int, np.integer)) or n_sites < 1:
        raise ConfigError(f"n_sites must be an integer ≥ 1, got {n_sites!r}")


def _rng(seed: Seed) -> np.random.Generator:
    """A generator from an int seed, or the caller's own generator (then it advances)."""
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be an integer ≥ 0 or a numpy Generator, got {seed!r}")
    return np.random.default_rng(int(seed))


def _labels(y: Any) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ConfigError(f"labels for partitioning must be one-dimensional, got shape {y.shape}")
    return y
