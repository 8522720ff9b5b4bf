"""Split one pooled data set into simulated sites, and give sites their own scanners.

Real federations are rarely available, so experiments carve one data set into sites. The
partitions of the non-IID benchmarks are here, each a pure function of its input and seed:

* :func:`natural_partition`: the sites the data came from (a site column), the real thing;
* :func:`iid_partition`: the optimistic baseline;
* :func:`dirichlet_label_partition`: label skew (Hsu, Qi and Brown, 2019), ``alpha`` the dial:
  small ``alpha``, strong skew;
* :func:`quantity_skew_partition`: sites of very different sizes with the same label mix
  (Li, Diao, Chen and He, 2022, "Federated learning on non-IID data silos: an experimental
  study", NIID-Bench);
* :func:`feature_shift` with :func:`site_intensity_transforms`: feature shift for images,
  each site's intensities transformed as by its own scanner (gamma, gain, offset, blur,
  noise; NIID-Bench's noise-based feature imbalance, extended with the intensity changes
  that separate MRI scanners).

The same input and seed give the same result on every machine, and every index appears in
exactly one site. Each site's indices are returned in ascending order, so a site's rows keep
the order they had in the pooled data, as a real site's table would; consumers draw their
own random train/test split. A seed is an integer or a ``numpy.random.Generator`` (which
then advances).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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


@dataclass(frozen=True)
class LabelSplit:
    """A Dirichlet label split: each site's row indices, and how many rows :func:`_top_up`
    moved to sites below the minimum (0: a draw gave every site the minimum as drawn)."""

    parts: list[np.ndarray]
    moved: int


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
    change the skew the experiment asked for (:func:`dirichlet_label_split` with ``top_up``
    relaxes it, and says by how many rows).
    """
    return dirichlet_label_split(y, n_sites, alpha, seed, min_size, max_tries).parts


def dirichlet_label_split(
    y: Any,
    n_sites: int,
    alpha: float,
    seed: Seed,
    min_size: int = 10,
    max_tries: int = 100,
    top_up: bool = False,
) -> LabelSplit:
    """:func:`dirichlet_label_partition`, and with ``top_up`` a split up to the data's limit of
    ``len(y) // min_size`` sites: when no draw in ``max_tries`` gives every site ``min_size``
    rows (at 16 sites of breast-cancer's 569 rows with alpha 0.5 none in 100 does), one more
    draw is made and :func:`_top_up` moves the fewest rows that bring every site to the minimum.
    Any split that succeeds without it is unchanged, draw for draw."""
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
    floor = max(min_size, 1)
    if n < n_sites * floor:
        raise ConfigError(
            f"{n} samples cannot give n_sites={n_sites} sites of at least {floor} rows each; "
            f"at most {n // floor} sites (n // {floor}) keep that many"
        )
    classes, codes = np.unique(y, return_inverse=True)
    by_class = [np.flatnonzero(codes == c) for c in range(classes.size)]

    def draw() -> tuple[np.ndarray, np.ndarray]:
        owner = np.empty(n, dtype=np.int64)
        shares = np.empty((classes.size, n_sites))
        for c, idx in enumerate(by_class):
            idx = rng.permutation(idx)
            shares[c] = p = rng.dirichlet(np.full(n_sites, float(alpha)))
            cuts = (np.cumsum(p)[:-1] * idx.size).astype(np.int64)
            for k, part in enumerate(np.split(idx, cuts)):
                owner[part] = k
        return owner, shares

    for _ in range(int(max_tries)):
        owner, shares = draw()
        if np.bincount(owner, minlength=n_sites).min() >= floor:
            return LabelSplit([np.flatnonzero(owner == k).astype(np.int64) for k in range(n_sites)], 0)
    if top_up:
        owner, shares = draw()
        owner, moved = _top_up(owner, codes, shares, floor)
        return LabelSplit([np.flatnonzero(owner == k).astype(np.int64) for k in range(n_sites)], moved)
    raise ConfigError(
        f"no Dirichlet label partition with alpha={alpha} gave all n_sites={n_sites} sites at "
        f"least {floor} of the {n} samples in {max_tries} tries; use a larger alpha "
        "or fewer sites"
    )


def _top_up(owner: np.ndarray, codes: np.ndarray, shares: np.ndarray, min_size: int) -> tuple[np.ndarray, int]:
    """Bring every site to ``min_size`` rows, one row at a time: the smallest site takes, from
    the largest, a row of the class its own Dirichlet share favours most among those the
    largest holds (so the skew drawn for it is kept as far as rows allow), the last such row in
    index order. Returns the new owners and the number of rows moved. Needs
    ``owner.size >= n_sites * min_size``: then the largest site is above the minimum whenever
    the smallest is below it."""
    owner = owner.copy()
    counts = np.zeros(shares.shape, dtype=np.int64)  # (class, site)
    np.add.at(counts, (codes, owner), 1)
    moved = 0
    while True:
        sizes = counts.sum(axis=0)
        k = int(np.argmin(sizes))
        if sizes[k] >= min_size:
            return owner, moved
        j = int(np.argmax(sizes))
        c = int(np.argmax(np.where(counts[:, j] > 0, shares[:, k], -1.0)))
        row = np.flatnonzero((owner == j) & (codes == c))[-1]
        owner[row] = k
        counts[c, j] -= 1
        counts[c, k] += 1
        moved += 1


def natural_partition(site_values: Any) -> dict[str, np.ndarray]:
    """The real sites: row indices of each distinct value of a site column (names as text).

    Sites come in order of first appearance, as :func:`medfed.data.tables.load_table` and
    the image manifest order them. Missing values (None, NaN, empty text) are refused, as a
    row without a site cannot be placed.
    """
    values = np.asarray(site_values, dtype=object)
    if values.ndim != 1:
        raise ConfigError(f"site_values must be one-dimensional, got shape {values.shape}")
    if values.size == 0:
        raise ConfigError("site_values is empty; there are no rows to partition")
    names = []
    for i, v in enumerate(values.tolist()):
        if v is None or (isinstance(v, float) and math.isnan(v)) or str(v).strip() == "":
            raise ConfigError(f"site_values[{i}] is missing ({v!r}); every row needs a site")
        names.append(str(v).strip())
    codes = np.asarray(names, dtype=object)
    return {name: np.flatnonzero(codes == name).astype(np.int64) for name in dict.fromkeys(names)}


def quantity_skew_partition(
    n_or_y: int | Any,
    n_sites: int,
    seed: Seed,
    *,
    alpha: float | None = None,
    power: float | None = None,
    sizes: Any = None,
    min_size: int = 10,
) -> list[np.ndarray]:
    """Sites of unequal size (quantity skew, NIID-Bench: Li et al., 2022), the label mix kept.

    Give exactly one of: ``alpha``, site shares drawn from Dirichlet(alpha) as NIID-Bench
    does (small ``alpha``, very unequal sites; large ``alpha``, near-equal); ``power``,
    power-law shares ``∝ rank^-power`` assigned to the sites in random order (the size
    distribution of LEAF and FedProx's benchmarks); or ``sizes``, explicit row counts that
    sum to the number of rows, or shares that sum to 1. For ``alpha`` and ``power`` every
    site first receives ``min_size`` rows and the shares divide the rest (NIID-Bench sets
    no minimum; a site too small to split is no use to an experiment); explicit sizes must
    each be ≥ ``min_size``. Given labels instead of a count, every site's slice is
    stratified, so its class mix matches the pooled one: quantity skew without label skew.
    """
    _check_sites(n_sites)
    rng = _rng(seed)
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 1:
        raise ConfigError(f"min_size must be an integer ≥ 1, got {min_size!r}")
    given = [name for name, v in (("alpha", alpha), ("power", power), ("sizes", sizes)) if v is not None]
    if len(given) != 1:
        raise ConfigError(
            "quantity skew needs exactly one of alpha (Dirichlet shares), power (power-law shares) "
            f"or sizes (explicit); got {', '.join(given) or 'none'}"
        )
    if isinstance(n_or_y, (int, np.integer)) and not isinstance(n_or_y, (bool, np.bool_)):
        n, y = int(n_or_y), None
        if n < 0:
            raise ConfigError(f"number of samples must be ≥ 0, got {n}")
    else:
        y = _labels(n_or_y)
        n = y.size
    if sizes is not None:
        counts = _explicit_sizes(sizes, n, n_sites, int(min_size))
    else:
        if n < n_sites * min_size:
            raise ConfigError(
                f"{n} samples cannot give n_sites={n_sites} sites of at least min_size={min_size} rows each"
            )
        if alpha is not None:
            _check_positive("alpha", alpha)
            shares = rng.dirichlet(np.full(n_sites, float(alpha)))
        else:
            _check_positive("power", power, allow_zero=True)
            shares = rng.permutation(np.arange(1, n_sites + 1, dtype=float) ** -float(power))
            shares /= shares.sum()
        counts = min_size + _apportion(shares, n - n_sites * min_size)
    if y is None:
        order = rng.permutation(n)
    else:
        # Interleave the classes evenly (each row keyed by its random rank within its class,
        # as a fraction of the class size), so any contiguous slice carries the pooled mix.
        key = np.empty(n)
        for cls in np.unique(y):
            idx = np.flatnonzero(y == cls)
            key[idx] = (rng.permutation(idx.size) + rng.uniform(size=idx.size)) / idx.size
        order = np.argsort(key, kind="stable")
    # Slices are laid out in random site order, so that no site is always the first slice.
    layout = rng.permutation(n_sites)
    bounds = np.concatenate([[0], np.cumsum(counts[layout])])
    parts: list[np.ndarray] = [np.empty(0, np.int64)] * n_sites
    for j, k in enumerate(layout):
        parts[k] = np.sort(order[bounds[j] : bounds[j + 1]]).astype(np.int64)
    return parts


# Feature shift ----------------------------------------------------------------------------

def feature_shift(
    X: Any,
    *,
    gamma: float = 1.0,
    scale: float = 1.0,
    offset: float = 0.0,
    blur: float = 0.0,
    noise: float = 0.0,
    seed: Seed | None = None,
) -> np.ndarray:
    """One site's images as another scanner would give them (feature shift, Li et al., 2022).

    ``X`` is ``(n, C, H, W)`` or ``(n, C, D, H, W)``. In order, per image and channel, with
    ``lo``/``hi`` the image's own minimum and maximum (so each image is transformed on its
    own, whatever the other rows hold): gamma ``lo + (hi-lo)·((x-lo)/(hi-lo))^gamma``
    (contrast), Gaussian ``blur`` of that many pixels on the spatial axes (point spread),
    multiplicative ``scale`` (gain) plus ``offset·(hi-lo)``, and Gaussian ``noise`` of
    standard deviation ``noise·(hi-lo)`` (NIID-Bench's noise-based feature imbalance; needs
    ``seed``). The defaults leave ``X`` unchanged. Returns a new array of ``X``'s float type.
    """
    X = np.asarray(X)
    if X.ndim not in (4, 5) or not np.issubdtype(X.dtype, np.floating):
        raise ConfigError(
            f"X must be float images (n, C, H, W) or (n, C, D, H, W), got {X.dtype} of shape {X.shape}"
        )
    _check_positive("gamma", gamma)
    _check_positive("scale", scale)
    _check_finite("offset", offset)
    _check_positive("blur", blur, allow_zero=True)
    _check_positive("noise", noise, allow_zero=True)
    if noise > 0 and seed is None:
        raise ConfigError("feature_shift with noise > 0 needs a seed (an integer or a numpy Generator)")
    rng = _rng(seed) if seed is not None else None
    axes = tuple(range(2, X.ndim))
    out = X.astype(X.dtype, copy=True)
    lo = out.min(axis=axes, keepdims=True)
    span = out.max(axis=axes, keepdims=True) - lo
    if gamma != 1.0:
        safe = np.where(span > 0, span, 1)
        out = lo + span * np.clip((out - lo) / safe, 0, 1) ** gamma
    if blur > 0:
        from scipy import ndimage

        out = ndimage.gaussian_filter(out, (0, 0) + (float(blur),) * len(axes), mode="nearest")
    out = out * scale + offset * span
    if noise > 0:
        out = out + rng.normal(0.0, 1.0, out.shape) * (noise * span)
    return out.astype(X.dtype, copy=False)


def site_intensity_transforms(n_sites: int, seed: Seed, strength: float = 1.0) -> list[dict[str, float]]:
    """Per-site :func:`feature_shift` parameters: each site a different scanner.

    Site ``k`` of ``K`` gets gamma and scale ``exp(U(±0.4)·strength)``, offset
    ``U(±0.1)·strength``, blur ``U(0, 1.5)·strength`` pixels and noise
    ``0.05·strength·(k+1)/K`` (NIID-Bench's ladder of noise levels, Li et al., 2022).
    ``strength`` 0 gives identity transforms. Use as ``feature_shift(X_k, **params[k], seed=...)``.
    """
    _check_sites(n_sites)
    _check_positive("strength", strength, allow_zero=True)
    rng = _rng(seed)
    s = float(strength)
    draws = rng.uniform(-1, 1, (n_sites, 4))
    return [
        {
            "gamma": float(np.exp(0.4 * s * draws[k, 0])),
            "scale": float(np.exp(0.4 * s * draws[k, 1])),
            "offset": float(0.1 * s * draws[k, 2]),
            "blur": float(1.5 * s * (draws[k, 3] + 1) / 2),
            "noise": float(0.05 * s * (k + 1) / n_sites),
        }
        for k in range(n_sites)
    ]


def _explicit_sizes(sizes: Any, n: int, n_sites: int, min_size: int) -> np.ndarray:
    try:
        values = np.asarray(sizes, dtype=float)
    except (TypeError, ValueError):
        raise ConfigError(f"sizes must be numbers, one per site, got {sizes!r}") from None
    if values.shape != (n_sites,):
        raise ConfigError(f"sizes must hold one value per site (n_sites={n_sites}), got {list(np.ravel(sizes))!r}")
    if not np.isfinite(values).all() or (values < 0).any():
        raise ConfigError(f"sizes must be finite and ≥ 0, got {values.tolist()}")
    if np.all(values == np.round(values)) and values.sum() == n:
        counts = values.astype(np.int64)
    elif abs(values.sum() - 1.0) < 1e-9:
        counts = _apportion(values, n)
    else:
        raise ConfigError(
            f"sizes must be row counts summing to the {n} samples or shares summing to 1, got {values.tolist()}"
        )
    if counts.min() < min_size:
        raise ConfigError(f"sizes give a site {int(counts.min())} rows; min_size={min_size}")
    return counts


def _apportion(shares: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total`` in proportion to ``shares`` (largest remainder)."""
    raw = np.asarray(shares, dtype=float) * total
    counts = np.floor(raw).astype(np.int64)
    short = total - int(counts.sum())
    counts[np.argsort(-(raw - counts), kind="stable")[:short]] += 1
    return counts


def _check_positive(name: str, value: Any, allow_zero: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
    if not ok or not math.isfinite(float(value)) or value < 0 or (value == 0 and not allow_zero):
        what = "≥ 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be a finite number {what}, got {value!r}")


def _check_finite(name: str, value: Any) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
    if not ok or not math.isfinite(float(value)):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")


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
