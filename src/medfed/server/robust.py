"""Byzantine-robust aggregation and outlier suppression (survey §3.3).

Each factory returns a *reducing* :class:`~medfed.server.aggregate.Aggregator` step: it takes
the round's :class:`~medfed.server.aggregate.StackedUploads` (leading site axis ``K``) and
returns one aggregated update with the global shapes, plus a small report saying what the
defense did (sites selected, per-site weights, or how often each site's value was cut).
Use it where :func:`~medfed.server.aggregate.weighted_mean` would go, e.g.
``chain(median(), apply_delta())``.

Coordinate-wise rules (:func:`median`, :func:`trimmed_mean`) work array by array; rules that
need distances between sites (:func:`krum`, :func:`multikrum`, :func:`bulyan`, :func:`dos`)
flatten each site's payload into one vector. Definitions follow Flower 1.42's
``flwr.server.strategy.aggregate`` (checked in ``tests/test_flower_agreement_robust.py``);
where they differ from Flower or from the paper, the function's docstring says so.

Every rule here except :func:`multikrum` ignores the example counts: a Byzantine site could
claim any count. Each rule states its assumption on the number of sites ``K``; a round that
violates it raises :class:`~medfed.errors.ConfigError`, and :func:`assumption_violations`
lists the violations ahead of time, e.g. for a robustness audit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

from medfed.errors import ConfigError, DataError
from medfed.server.aggregate import Aggregator, StackedUploads

__all__ = [
    "ROBUST_AGGREGATORS",
    "assumption_violations",
    "bulyan",
    "copod_scores",
    "dos",
    "krum",
    "krum_scores",
    "median",
    "multikrum",
    "pairwise_distances",
    "site_requirement",
    "trimmed_mean",
]


# --------------------------------------------------------------------------- site-count requirements


def _trim_count(beta: float, n_sites: int) -> int:
    # int() truncates like scipy.stats.trim_mean and Flower's _trim_mean: cut conservatively.
    return int(beta * n_sites)


def _requirement(method: str, n_sites: int, f: int = 0, beta: float = 0.0, m: int = 0) -> str | None:
    """The hard assumption of ``method`` on the number of sites, or None when it holds."""
    if n_sites < 1:
        return f"{method} needs at least one site, got K={n_sites}"
    if method == "trimmed_mean":
        k = _trim_count(beta, n_sites)
        if n_sites - 2 * k < 1:
            return f"trimmed_mean needs K - 2*int(beta*K) >= 1; K={n_sites}, beta={beta} cuts {2 * k}"
    elif method in ("krum", "multikrum"):
        if n_sites <= 2 * f + 2:
            return f"{method} needs K > 2f + 2 sites; K={n_sites}, f={f} needs K >= {2 * f + 3}"
        if method == "multikrum" and m > n_sites:
            return f"multikrum keeps m updates, at most K; K={n_sites}, m={m}"
    elif method == "bulyan" and n_sites < 4 * f + 3:
        return f"bulyan needs K >= 4f + 3 sites; K={n_sites}, f={f} needs K >= {4 * f + 3}"
    return None


def _require(method: str, n_sites: int, **options) -> None:
    problem = _requirement(method, n_sites, **options)
    if problem is not None:
        raise ConfigError(problem)


def _check_finite(method: str, stack: StackedUploads) -> None:
    """Orderings and distances are meaningless with NaN: say which sites sent them."""
    K = len(stack.sites)
    ok = np.ones(K, dtype=bool)
    for v in stack.payload.values():
        ok &= np.isfinite(np.reshape(v, (K, -1))).all(axis=1)
    if not ok.all():
        bad = [s for s, good in zip(stack.sites, ok) if not good]
        raise DataError(
            f"{method}: updates from {bad} hold NaN or infinite values; robust aggregation needs "
            "finite updates (screen such sites out before this step)"
        )


# --------------------------------------------------------------------------- pure helpers


def _site_matrix(stack: StackedUploads) -> np.ndarray:
    """Each site's payload flattened into one row: (K, P)."""
    K = len(stack.sites)
    return np.concatenate(
        [np.asarray(v, dtype=np.float64).reshape(K, -1) for v in stack.payload.values()], axis=1
    )


# above this many (pair, entry) terms scipy's C loop beats the numpy one by more than its 0.2 s
# import (about 15 ms a call here); below it the import would be most of a small run's cost
_PDIST_FROM = 2_000_000


def squared_distances(X: np.ndarray) -> np.ndarray:
    """(K, K) squared euclidean distances between the rows of ``X``, bit-identical to
    ``scipy.spatial.distance.pdist(X, "sqeuclidean")``: each pair's squared differences summed
    left to right over the entries, as pdist's loop does. A sum over the first axis of a 2-D
    array adds its rows in order (numpy's pairwise summation runs along the contiguous axis only),
    so each pass sums the site's differences to itself and every later site, (P, K - i); the
    zero column of the site itself keeps the array 2-D for the last pair."""
    K, P = X.shape
    if K * (K - 1) // 2 * P > _PDIST_FROM:
        from scipy.spatial.distance import pdist, squareform  # imported when used: slow to load

        return squareform(pdist(X, "sqeuclidean"))
    columns = np.ascontiguousarray(X.T)
    S = np.zeros((K, K))
    for i in range(K - 1):
        diff = columns[:, i:] - columns[:, i : i + 1]
        diff *= diff
        S[i, i + 1 :] = diff.sum(axis=0)[1:]
    return S + S.T


def pairwise_distances(X: np.ndarray, metric: str = "euclidean") -> np.ndarray:
    """(K, K) distances between the rows of ``X``: ``"euclidean"``, ``"sqeuclidean"`` or ``"cosine"``.

    Euclidean distances subtract the rows (:func:`squared_distances`, scipy's ``pdist`` to the
    bit: no Gram-matrix cancellation when updates are close to each other). Cosine distance
    is ``1 - cos(angle)``; a zero row has no direction, so its cosine distance to every other
    row is defined as 1 (orthogonal) instead of NaN. The diagonal is exactly 0.
    """
    X = np.asarray(X, dtype=np.float64)
    if metric == "sqeuclidean":
        return squared_distances(X)
    if metric == "euclidean":
        return np.sqrt(squared_distances(X))
    if metric == "cosine":
        norms = np.linalg.norm(X, axis=1)
        unit = X / np.where(norms > 0, norms, 1.0)[:, None]
        D = np.clip(1.0 - unit @ unit.T, 0.0, 2.0)
        np.fill_diagonal(D, 0.0)
        return D
    raise ConfigError(f"pairwise_distances: metric must be 'euclidean', 'sqeuclidean' or 'cosine', got {metric!r}")


def krum_scores(sq_dist: np.ndarray, f: int) -> np.ndarray:
    """Krum scores (Blanchard et al., 2017) from a (K, K) matrix of squared distances.

    ``score_i`` is the sum of the squared distances from site i to its ``K - f - 2`` nearest
    other sites. As in Flower's ``aggregate_krum`` the neighbour count is clamped to at least
    1 (Bulyan runs Krum on shrinking sets where ``K - f - 2`` drops below 1); with K = 1 the
    score is 0.
    """
    K = sq_dist.shape[0]
    n_closest = max(1, K - f - 2)
    others = sq_dist[~np.eye(K, dtype=bool)].reshape(K, K - 1)
    return np.sort(others, axis=1)[:, :n_closest].sum(axis=1)


def max_ranks(X: np.ndarray) -> np.ndarray:
    """Each entry's rank in its column, ties sharing the largest (``#{column <= x}``, 1..n):
    ``scipy.stats.rankdata(X, method="max", axis=0)`` in numpy, which spares DOS's first round
    the 0.5 s import of ``scipy.stats``. In each sorted column the entries of a run of equal
    values all take the position of the run's last one."""
    n = X.shape[0]
    order = np.argsort(X, axis=0, kind="stable")
    ordered = np.take_along_axis(X, order, axis=0)
    last = np.ones(ordered.shape, dtype=bool)  # the last entry of its run of ties
    last[:-1] = ordered[1:] != ordered[:-1]
    position = np.where(last, np.arange(1, n + 1)[:, None], n)
    run_end = np.minimum.accumulate(position[::-1], axis=0)[::-1]
    ranks = np.empty(X.shape, dtype=np.int64)
    np.put_along_axis(ranks, order, run_end, axis=0)
    return ranks


def copod_scores(X: np.ndarray) -> np.ndarray:
    """COPOD outlier scores (Li et al., 2020, "COPOD: Copula-based outlier detection"), one per row.

    For each feature d the empirical left tail ``F_d(x) = #{X_d <= x} / n`` and right tail
    ``Fbar_d(x) = #{X_d >= x} / n`` give the copula observations ``U = F_d(x_id)`` and
    ``V = Fbar_d(x_id)``; the skewness-corrected one is ``W = U`` where the feature's sample
    skewness is negative, else ``V``. The score of row i is
    ``max(-sum_d log U, -sum_d log V, -sum_d log W)``: large when the row sits in the tails of
    many features. This is the paper's Algorithm 1; pyod's ``COPOD`` instead takes a
    per-feature ``max(-log W, (-log U - log V) / 2)`` before summing, so its scores differ.
    Ties share the largest rank (``#{<=}``), so tied rows get equal scores. Only the sign of the
    skewness matters, so it is the sign of the third central moment (no division by a
    possibly zero variance).

    ``X`` is an (n, d) array of finite numbers; returns an (n,) array of scores >= 0.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError(f"copod_scores: X must be a non-empty (n, d) array, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("copod_scores: X must hold finite numbers only")
    n = X.shape[0]
    neg_log_left = -np.log(max_ranks(X) / n)
    neg_log_right = -np.log(max_ranks(-X) / n)
    third_moment = np.mean((X - X.mean(axis=0)) ** 3, axis=0)
    neg_log_skew = np.where(third_moment < 0, neg_log_left, neg_log_right)
    tails = np.stack([neg_log_left.sum(axis=1), neg_log_right.sum(axis=1), neg_log_skew.sum(axis=1)])
    return tails.max(axis=0)


def _lowest(scores: np.ndarray, sites, count: int) -> np.ndarray:
    """Indices of the ``count`` lowest scores; exact ties go to the site name that sorts first.

    Ties are structural, not rare: with one neighbour (Bulyan's last Krum rounds, or Krum with
    K = 3, f = 0) two mutually nearest sites have the same score. Flower takes the first in
    its results list, which depends on arrival order; the name keeps the choice order-free and
    equals Flower's when results arrive sorted by name.
    """
    order = sorted(range(len(scores)), key=lambda i: (scores[i], sites[i]))
    return np.array(order[:count], dtype=int)


def _unflatten(row: np.ndarray, payload: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out, start = {}, 0
    for k, v in payload.items():
        shape = np.shape(v)[1:]
        size = math.prod(shape)
        out[k] = row[start : start + size].reshape(shape)
        start += size
    return out


def _stateless_init(global_params):
    return None


def _coordinate_trim(stack: StackedUploads, cut: int) -> tuple[dict[str, np.ndarray], dict]:
    """Per coordinate, drop the ``cut`` smallest and ``cut`` largest values and average the rest.

    One ``np.partition`` per array gives both the value (the same code as
    ``scipy.stats.trim_mean`` and Flower's ``_trim_mean``) and, for the report, how often each
    site's value fell outside the kept band (ties with the band's edge count as kept).
    """
    K = len(stack.sites)
    lo, hi = cut, K - cut - 1
    out: dict[str, np.ndarray] = {}
    n_cut = np.zeros(K)
    n_coords = 0
    for k, v in stack.payload.items():
        v = np.asarray(v, dtype=np.float64)
        part = np.partition(v, (lo, hi), axis=0)
        out[k] = part[lo : hi + 1].mean(axis=0)
        outside = (v < part[lo]) | (v > part[hi])
        n_cut += outside.reshape(K, -1).sum(axis=1)
        n_coords += math.prod(v.shape[1:])
    fraction = n_cut / max(n_coords, 1)
    return out, {"cut_fraction": {s: float(x) for s, x in zip(stack.sites, fraction)}}


# --------------------------------------------------------------------------- aggregators


def median() -> Aggregator:
    """Coordinate-wise median (Yin et al., 2018).

    Replaces the weighted mean by the per-coordinate median of the site updates, unweighted;
    each coordinate stays within the honest range while fewer than half the sites are corrupted.
    With an even K it is the mean of the two middle values (as ``np.median`` and Flower's
    ``FedMedian``). Report: ``cut_fraction`` per site, the share of coordinates where the
    site's value was not a middle value.
    """

    def apply(stack: StackedUploads, state, global_params, round_):
        K = len(stack.sites)
        _require("median", K)
        _check_finite("median", stack)
        value, report = _coordinate_trim(stack, (K - 1) // 2)
        return value, state, report

    return Aggregator(_stateless_init, apply, "median")


def trimmed_mean(beta: float = 0.1) -> Aggregator:
    """Coordinate-wise trimmed mean (Yin et al., 2018).

    Per coordinate, drops the ``int(beta * K)`` largest and smallest site values and averages
    the rest, unweighted; tolerates up to ``int(beta * K)`` corrupted sites. Same cut as
    ``scipy.stats.trim_mean`` and Flower's ``FedTrimmedAvg`` (whose default beta is 0.2; ours
    is 0.1). Requires ``0 <= beta < 0.5``. Report: ``cut_fraction`` per site.
    """
    def apply(stack: StackedUploads, state, global_params, round_):
        K = len(stack.sites)
        _require("trimmed_mean", K, beta=beta)
        _check_finite("trimmed_mean", stack)
        value, report = _coordinate_trim(stack, _trim_count(beta, K))
        return value, state, report

    return Aggregator(_stateless_init, apply, "trimmed_mean")


def _krum_apply(method: str, f: int, m: int | None):
    """Shared body of Krum (``m is None``) and Multi-Krum."""

    def apply(stack: StackedUploads, state, global_params, round_):
        K = len(stack.sites)
        keep = 1 if m is None else (K - f if m == 0 else m)
        _require(method, K, f=f, m=keep)
        _check_finite(method, stack)
        scores = krum_scores(pairwise_distances(_site_matrix(stack), "sqeuclidean"), f)
        report = {"scores": {s: float(x) for s, x in zip(stack.sites, scores)}}
        if m is None:
            best = _lowest(scores, stack.sites, 1)[0]
            report["selected"] = [stack.sites[best]]
            return {k: np.array(v[best], dtype=np.float64) for k, v in stack.payload.items()}, state, report
        kept = np.sort(_lowest(scores, stack.sites, keep))
        w = stack.weights[kept] / stack.weights[kept].sum()
        value = {
            k: (w @ np.asarray(v, dtype=np.float64)[kept].reshape(keep, -1)).reshape(np.shape(v)[1:])
            for k, v in stack.payload.items()
        }
        report["selected"] = [stack.sites[i] for i in kept]
        return value, state, report

    return apply


def krum(f: int = 1) -> Aggregator:
    """Krum (Blanchard et al., 2017): keep the one update closest to its neighbours.

    Scores each site by the summed squared Euclidean distance to its ``K - f - 2`` nearest
    other sites and returns the update with the lowest score (unweighted), tolerating ``f``
    Byzantine sites when ``K > 2f + 2``; Flower's ``Krum`` clamps the neighbour count to 1
    instead of requiring it, we raise ConfigError. Exact score ties go to the site whose name
    sorts first (Flower: first in arrival order). Report: ``selected`` and ``scores``.
    """
    return Aggregator(_stateless_init, _krum_apply("krum", f, None), "krum")


def multikrum(f: int = 1, m: int = 0) -> Aggregator:
    """Multi-Krum (Blanchard et al., 2017): average the ``m`` updates with the lowest Krum scores.

    ``m = 0`` keeps ``K - f``. The kept updates are averaged weighted by their example counts,
    as Flower's ``Krum(num_clients_to_keep=m)`` does (the paper averages them uniformly); note
    that in Flower ``num_clients_to_keep=0`` means plain Krum, here it means ``K - f``.
    Needs ``K > 2f + 2`` and ``m <= K``. Report: ``selected`` and ``scores``.
    """
    return Aggregator(_stateless_init, _krum_apply("multikrum", f, m), "multikrum")


def bulyan(f: int = 1) -> Aggregator:
    """Bulyan (El Mhamdi et al., 2018): Krum selection, then a coordinate-wise trimmed average.

    Picks ``theta = K - 2f`` updates by repeated Krum, then per coordinate averages the
    ``beta = theta - 2f`` picked values closest to their median; unweighted. Needs
    ``K >= 4f + 3``. Matches Flower's ``Bulyan`` with its default inner rule ``aggregate_krum``
    (``to_keep=0``): each Krum round runs on the sites not yet picked with Flower's neighbour
    count ``max(1, K' - f - 2)`` for K' remaining sites. With one neighbour, two mutually
    nearest sites tie; the tie goes to the site name that sorts first, where Flower takes the
    first in arrival order (so Flower's Bulyan depends on the order results arrive in).
    Report: ``selected``, in the order Krum picked them.
    """
    def apply(stack: StackedUploads, state, global_params, round_):
        K = len(stack.sites)
        _require("bulyan", K, f=f)
        _check_finite("bulyan", stack)
        sq = pairwise_distances(_site_matrix(stack), "sqeuclidean")
        theta, beta = K - 2 * f, K - 4 * f
        remaining = list(range(K))
        picked: list[int] = []
        for _ in range(theta):
            scores = krum_scores(sq[np.ix_(remaining, remaining)], f)
            picked.append(remaining.pop(_lowest(scores, [stack.sites[i] for i in remaining], 1)[0]))
        value = {}
        for k, v in stack.payload.items():
            chosen = np.asarray(v, dtype=np.float64)[picked]
            distance = np.abs(chosen - np.median(chosen, axis=0))
            closest = np.argpartition(distance, beta - 1, axis=0)[:beta]
            value[k] = np.take_along_axis(chosen, closest, axis=0).mean(axis=0)
        return value, state, {"selected": [stack.sites[i] for i in picked]}

    return Aggregator(_stateless_init, apply, "bulyan")


def dos(temperature: float = 1.0) -> Aggregator:
    """Distance-based Outlier Suppression (Alkhunaizi et al., 2022, MICCAI).

    Weights each site by ``softmax(-score / temperature)``, where ``score`` is the SUM of the
    COPOD outlier scores (:func:`copod_scores`) of the rows of the sites' pairwise Euclidean
    and cosine distance matrices; an outlying site gets a near-zero weight. The aggregate is
    the weighted sum of the updates; example counts are not used. Report: ``weights`` and
    ``scores`` (the summed score) per site.

    The sum follows the authors' code (github.com/Naiftt/SPAFD, ``main.py``
    ``abnormalCompute``: ``clf_cs.decision_function(D_cos) + clf_eu.decision_function(D_eu)``,
    then ``exp(alpha · s) / Σ exp(alpha · s)`` with ``alpha = -1``, i.e. ``temperature = 1``
    here). medfed used to average the two scores, which is this rule at twice the
    temperature. Two departures remain: the authors score with pyod's ``COPOD`` (a per-feature
    ``max(skewness tail, mean of both tails)``, see :func:`copod_scores`) where medfed uses the
    COPOD paper's Algorithm 1, and by default their distances are between the local models
    rather than their updates (identical Euclidean distances, since the common global model
    cancels; different cosine distances).
    """
    def apply(stack: StackedUploads, state, global_params, round_):
        K = len(stack.sites)
        _require("dos", K)
        _check_finite("dos", stack)
        X = _site_matrix(stack)
        # COPOD ranks each column, so the scores ignore a positive scale of the distances: measure
        # them on X / max|X|, where a huge but finite update (a boosted attack) cannot overflow them
        peak = float(np.abs(X).max())
        unit = X / peak if peak > 0 else X
        scores = copod_scores(pairwise_distances(unit, "euclidean")) + copod_scores(pairwise_distances(unit, "cosine"))
        logits = -scores / temperature
        w = np.exp(logits - logits.max())
        w /= w.sum()
        value = _unflatten(w @ X, stack.payload)
        report = {
            "weights": {s: float(x) for s, x in zip(stack.sites, w)},
            "scores": {s: float(x) for s, x in zip(stack.sites, scores)},
        }
        return value, state, report

    return Aggregator(_stateless_init, apply, "dos")


def site_requirement(name: str, n_sites: int, options: Mapping) -> str | None:
    """Why ``name`` (a robust rule) cannot run a round of ``n_sites`` uploads with the method's
    ``options`` (``f``, ``beta``, ``m``), or ``None``; what a round would raise, said ahead of time."""
    if name not in ROBUST_AGGREGATORS:
        return None
    f = int(options.get("f", 0))
    m = int(options.get("m", 0))
    return _requirement(
        name, n_sites, f=f, beta=float(options.get("beta", 0.0)), m=(n_sites - f if m == 0 else m)
    )


ROBUST_AGGREGATORS: dict[str, Callable[..., Aggregator]] = {
    "median": median,
    "trimmed_mean": trimmed_mean,
    "krum": krum,
    "multikrum": multikrum,
    "bulyan": bulyan,
    "dos": dos,
}


# --------------------------------------------------------------------------- audit

# Options each name accepts in assumption_violations: the method's hyperparameters plus ``f``,
# which for median, trimmed_mean and dos is the number of corrupted sites to tolerate.
_AUDIT_OPTIONS = {
    "median": {"f": 0},
    "trimmed_mean": {"beta": 0.1, "f": 0},
    "krum": {"f": 1},
    "multikrum": {"f": 1, "m": 0},
    "bulyan": {"f": 1},
    "dos": {"temperature": 1.0, "f": 0},
}


def assumption_violations(name: str, n_sites: int, **options) -> list[str]:
    """Human-readable notes on where ``name``'s assumptions fail with ``n_sites`` sites (empty if none).

    ``options`` are the method's hyperparameters (defaults as in its factory) and ``f``: for
    krum, multikrum and bulyan the f they are built with, for median, trimmed_mean and dos
    the number of corrupted sites the audit assumes (default 0). The first note, marked
    "required", appears when a round with that many sites would raise ConfigError; the others
    say where the robustness guarantee does not cover ``f`` corrupted sites. Unknown names
    and unknown options raise ConfigError; the values are taken as valid (the methods' option
    schemas in :mod:`medfed.methods` check them).
    """
    if name not in _AUDIT_OPTIONS:
        raise ConfigError(f"assumption_violations: unknown method {name!r}; known: {sorted(_AUDIT_OPTIONS)}")
    unknown = sorted(set(options) - set(_AUDIT_OPTIONS[name]))
    if unknown:
        raise ConfigError(f"{name}: unknown option(s) {unknown}; allowed: {sorted(_AUDIT_OPTIONS[name])}")
    K = n_sites
    opts = {**_AUDIT_OPTIONS[name], **options}
    f = int(opts["f"])
    notes: list[str] = []
    if name == "trimmed_mean":
        beta = float(opts["beta"])
        hard = _requirement(name, K, beta=beta)
        cut = _trim_count(beta, K)
        if hard is None and beta > 0 and cut == 0:
            notes.append(f"trimmed_mean with beta={beta} and K={K} trims nothing: it is the plain mean")
        if hard is None and cut < f:
            notes.append(f"trimmed_mean cuts int(beta*K)={cut} per side, fewer than f={f} corrupted sites")
    elif name == "multikrum":
        m = int(opts["m"])
        keep = K - f if m == 0 else m
        hard = _requirement(name, K, f=f, m=keep)
        if hard is None and keep > K - f:
            notes.append(f"multikrum keeps m={keep} > K - f = {K - f} updates, so a corrupted one may be averaged in")
    else:
        hard = _requirement(name, K, f=f)
        if name in ("median", "dos") and hard is None and f > 0 and 2 * f >= K:
            notes.append(f"{name} assumes corrupted sites are fewer than half; K={K}, f={f}")
        if name == "dos" and hard is None and K < 3:
            notes.append(f"dos with K={K} < 3 sites cannot single out an outlier: all weights are equal")
    if hard is not None:
        notes.insert(0, f"{hard} (required: a round with these sites raises ConfigError)")
    return notes
