"""Federated ComBat: site effects removed from per-site sufficient statistics, never pooled rows.

ComBat (Johnson, Li & Rabinovic, 2007; for neuroimaging Fortin et al., 2017/2018) models a
feature ``g`` of row ``j`` at site ``i`` as ``y_ijg = a_g + C_ij b_g + gamma_ig + sqrt(delta_ig)
e_ijg`` and replaces each site's location ``gamma_ig`` and scale ``delta_ig`` by the pooled
ones, keeping the effect ``b_g`` of covariates to preserve (age, sex, ...). Chen et al. (2022,
NeuroImage, "Privacy-preserving harmonization via distributed ComBat") show that the same
estimates follow from per-site statistics; this module is that exchange:

1. each site sends :class:`CombatDesignStats` -- ``Z^T Z`` and ``Z^T Y`` of its own design
   ``Z = [1, C]`` (an intercept and its covariates): the blocks of the pooled design
   ``[site indicators, covariates]``'s normal equations;
2. the coordinator solves them (:func:`fit_location`) and sends each site the
   :class:`CombatLocation`: grand mean ``a``, covariate effects ``b`` and the site rows of
   the least-squares fit;
3. each site sends :class:`CombatResidualStats`: its residual sum of squares and the mean
   and centred sum of squares of ``y - a - C b``, per feature;
4. the coordinator pools the variance, standardizes the sites' moments into ``gamma_hat``,
   ``delta_hat``, sets each site's empirical-Bayes priors and solves for ``gamma*``, ``delta*``
   (:func:`fit_combat`): the :class:`CombatModel`;
5. each site adjusts its own rows (:meth:`CombatModel.apply`).

A federation of one site (under leave-one-site-out, the other of two) is its own reference:
its rows stay as they are, and an unseen site can still adapt to it.

Nothing but these summaries leaves a site. A site the fit never saw can estimate its own
location and scale from its own unlabeled rows against the federation's reference
(:func:`adapt_site`), sending nothing.

Where this follows the reference implementation rather than the paper's words: the paper
iterates the empirical-Bayes equations "until convergence"; like the authors' code (R sva's
``it.sol``, neuroCombat's ``it_sol``) the iteration stops when the largest relative change
``|new - old| / old`` of ``gamma*`` and ``delta*`` is at most 1e-4 -- with ``old`` not in absolute
value, so a feature whose ``gamma*`` is negative never holds the iteration back; kept, so that
results equal the reference's. Where the reference departs from the paper, this follows the paper:
neuroCombat casts covariates to float32 when it builds the design (a covariate's value is
rounded to 7 digits); here they stay float64.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfed.errors import ConfigError, DataError
from medfed.wiretypes import wire_type

MIN_SITE_ROWS = 2  # a site's variance of standardized residuals (ddof 1) needs two rows
EB_TOLERANCE = 1e-4  # the reference's stopping rule of the empirical-Bayes iteration
EB_MAX_ITERATIONS = 10_000  # the reference has no cap; a cap turns a runaway loop into an error


@dataclass(frozen=True)
class SiteRows:
    """One site's rows as ComBat sees them: features ``X`` (n, d) and covariates ``C`` (n, k)."""

    name: str
    X: np.ndarray
    C: np.ndarray


@wire_type
@dataclass(frozen=True)
class CombatDesignStats:
    """Step 1, site -> coordinator: ``Z^T Z`` and ``Z^T Y`` of the site's design ``Z = [1, C]``.

    Row/column 0 is the intercept: ``ztz[0, 0]`` is the row count, ``ztz[0, 1:]`` the
    covariates' sums, ``zty[0]`` the features' sums.
    """

    site: str
    covariates: tuple[str, ...]
    ztz: np.ndarray  # (k + 1, k + 1)
    zty: np.ndarray  # (k + 1, d)


@wire_type
@dataclass(frozen=True)
class CombatLocation:
    """Step 2, coordinator -> sites: the pooled least-squares fit of the features on
    ``[site indicators, covariates]``; ``site_mean[i]`` is site ``sites[i]``'s coefficient row."""

    sites: tuple[str, ...]
    covariates: tuple[str, ...]
    grand_mean: np.ndarray  # (d,): the sites' coefficients weighted by their row counts
    covariate_effect: np.ndarray  # (k, d)
    site_mean: np.ndarray  # (S, d)


@wire_type
@dataclass(frozen=True)
class CombatResidualStats:
    """Step 3, site -> coordinator, per feature: ``sse`` = sum of squared residuals of the
    pooled fit; ``mean``, ``m2`` = mean and centred sum of squares of ``y - a - C b``."""

    site: str
    n: int
    sse: np.ndarray
    mean: np.ndarray
    m2: np.ndarray


@wire_type
@dataclass(frozen=True)
class EbPrior:
    """A site's empirical-Bayes hyperparameters, by the method of moments over its features:
    ``gamma ~ N(gamma_bar, tau2)``, ``delta ~ InverseGamma(a, b)``."""

    gamma_bar: float
    tau2: float
    a: float
    b: float


@wire_type
@dataclass(frozen=True)
class SiteEffect:
    """A site's location/scale in standardized units: the moment estimates (``*_hat``) and the
    ones used to adjust (``*_star``: empirical-Bayes posteriors, or the moments with eb off)."""

    site: str
    n: int
    gamma_hat: np.ndarray
    delta_hat: np.ndarray
    gamma_star: np.ndarray
    delta_star: np.ndarray
    prior: EbPrior | None = None
    iterations: int = 0  # of the empirical-Bayes solution
    adapted: bool = False  # estimated by the site from its own unlabeled rows (adapt_site)


@wire_type
@dataclass(frozen=True)
class CombatModel:
    """A fitted ComBat: the federation's reference (grand mean, covariate effects, pooled
    variance) and each site's effect. :meth:`apply` harmonizes rows of a known site."""

    features: tuple[str, ...]
    covariates: tuple[str, ...]
    eb: bool
    grand_mean: np.ndarray  # (d,)
    covariate_effect: np.ndarray  # (k, d)
    var_pooled: np.ndarray  # (d,)
    sites: tuple[SiteEffect, ...]

    def site(self, name: str) -> SiteEffect:
        for s in self.sites:
            if s.site == name:
                return s
        raise DataError(f"ComBat was not fitted on site {name!r}; its sites are {[s.site for s in self.sites]}")

    def apply(self, site: str, X: np.ndarray, C: np.ndarray) -> np.ndarray:
        """``site``'s rows with its location and scale replaced by the federation's."""
        effect = self.site(site)
        X, C = _check_rows(SiteRows(site, X, C), self.features, self.covariates, min_rows=1)
        mean = self.grand_mean + C @ self.covariate_effect
        sd = np.sqrt(self.var_pooled)
        s = (X - mean) / sd
        return (s - effect.gamma_star) / np.sqrt(effect.delta_star) * sd + mean

    def to_json(self) -> dict:
        """The fitted parameters by name (what ``combat.json`` holds)."""
        def site(e: SiteEffect) -> dict:
            out = {"n": e.n, "adapted": e.adapted,
                   "location": dict(zip(self.features, e.gamma_star.tolist())),
                   "scale": dict(zip(self.features, e.delta_star.tolist())),
                   "location_moments": dict(zip(self.features, e.gamma_hat.tolist())),
                   "scale_moments": dict(zip(self.features, e.delta_hat.tolist()))}
            if e.prior is not None:
                out["prior"] = {"gamma_bar": e.prior.gamma_bar, "tau2": e.prior.tau2, "a": e.prior.a,
                                "b": e.prior.b, "iterations": e.iterations}
            return out

        return {
            "method": "combat",
            "reference": "Johnson et al., 2007; Fortin et al., 2017/2018; distributed as in Chen et al., 2022",
            "empirical_bayes": self.eb,
            "features": list(self.features),
            "covariates": list(self.covariates),
            "units": "location and scale are in standardized units (divided by the pooled standard deviation)",
            "grand_mean": dict(zip(self.features, self.grand_mean.tolist())),
            "covariate_effect": {c: dict(zip(self.features, row.tolist()))
                                 for c, row in zip(self.covariates, self.covariate_effect)},
            "var_pooled": dict(zip(self.features, self.var_pooled.tolist())),
            "sites": {e.site: site(e) for e in self.sites},
        }


# --------------------------------------------------------------------------- checks


def _check_rows(rows: SiteRows, features: Sequence[str], covariates: Sequence[str],
                min_rows: int = MIN_SITE_ROWS) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(rows.X, dtype=np.float64)
    C = np.asarray(rows.C, dtype=np.float64).reshape(X.shape[0] if X.ndim else 0, -1)
    if X.ndim != 2 or X.shape[1] != len(features):
        raise DataError(f"site {rows.name!r}: ComBat needs a feature matrix with {len(features)} columns, "
                        f"got shape {X.shape}")
    if C.shape != (X.shape[0], len(covariates)):
        raise DataError(f"site {rows.name!r}: {C.shape[1]} covariate columns for covariates {list(covariates)}")
    if X.shape[0] < min_rows:
        raise DataError(f"site {rows.name!r} has {X.shape[0]} row(s); ComBat needs at least {min_rows} per site "
                        "(its within-site variance)")
    for values, names, what in ((C, covariates, "covariate"), (X, features, "feature")):
        bad = ~np.isfinite(values)
        if bad.any():
            j = int(np.argmax(bad.sum(axis=0)))
            raise DataError(
                f"site {rows.name!r}: {what} {names[j]!r} is missing (or not finite) in {int(bad[:, j].sum())} "
                f"row(s); ComBat needs every {what} of every row"
                + (" (covariates are used to adjust test rows too)" if what == "covariate" else ""))
    return X, C


def check_covariates(covariates: Sequence[str], features: Sequence[str], label: str | None = None) -> tuple[str, ...]:
    """Covariate names that ComBat may preserve: distinct, not a feature and never the label
    (unknown for the rows a model scores, so it cannot adjust them)."""
    covariates = tuple(covariates)
    twice = sorted({c for c in covariates if covariates.count(c) > 1})
    if twice:
        raise ConfigError(f"--covariates lists {twice[0]!r} twice; name each covariate once")
    if label is not None and label in covariates:
        raise ConfigError(f"--covariates: {label!r} is the label; the label is unknown for the rows a model "
                          "scores, so it cannot be a covariate to adjust them")
    both = [c for c in covariates if c in set(features)]
    if both:
        raise ConfigError(f"--covariates: {both[0]!r} is also a feature; a covariate is preserved, not harmonized: "
                          "leave it out of --features")
    return covariates


# --------------------------------------------------------------------------- the exchange


def design_stats(rows: SiteRows, features: Sequence[str], covariates: Sequence[str]) -> CombatDesignStats:
    """Step 1 at a site: ``Z^T Z`` and ``Z^T Y`` of ``Z = [1, C]``."""
    X, C = _check_rows(rows, features, covariates)
    Z = np.column_stack([np.ones(X.shape[0]), C])
    return CombatDesignStats(rows.name, tuple(covariates), Z.T @ Z, Z.T @ X)


def fit_location(stats: Sequence[CombatDesignStats]) -> CombatLocation:
    """Step 2 at the coordinator: the pooled normal equations of ``[site indicators, C]``
    assembled from the sites' blocks, and solved."""
    if not stats:
        raise DataError("ComBat needs the statistics of at least one site")
    names = [s.site for s in stats]
    if len(set(names)) != len(names):
        raise DataError(f"ComBat: duplicate site names {names}")
    covariates = stats[0].covariates
    if any(s.covariates != covariates for s in stats):
        raise DataError("ComBat: the sites' statistics name different covariates")
    S, k = len(stats), len(covariates)
    n = np.array([s.ztz[0, 0] for s in stats])
    A = np.zeros((S + k, S + k))
    rhs = np.zeros((S + k, stats[0].zty.shape[1]))
    for i, s in enumerate(stats):
        A[i, i] = s.ztz[0, 0]
        A[i, S:] = A[S:, i] = s.ztz[0, 1:]
        A[S:, S:] += s.ztz[1:, 1:]
        rhs[i] = s.zty[0]
        rhs[S:] += s.zty[1:]
    _check_design(A, stats, covariates)
    B = np.linalg.solve(A, rhs)
    return CombatLocation(tuple(names), covariates, (n / n.sum()) @ B[:S], B[S:], B[:S])


def _check_design(A: np.ndarray, stats: Sequence[CombatDesignStats], covariates: tuple[str, ...]) -> None:
    """A design whose normal equations cannot be solved, said in its users' words."""
    for j, c in enumerate(covariates):
        # the covariate's sum of squares within sites: zero when it takes one value per site
        within = sum(s.ztz[j + 1, j + 1] - s.ztz[0, j + 1] ** 2 / s.ztz[0, 0] for s in stats)
        total = sum(s.ztz[j + 1, j + 1] for s in stats)
        if within <= 1e-12 * max(total, 1.0):
            raise DataError(f"covariate {c!r} takes one value per site (or is constant): ComBat cannot tell its "
                            "effect from the sites'; leave it out of --covariates")
    scale = np.sqrt(np.diag(A))
    if np.linalg.cond(A / np.outer(scale, scale)) > 1e12:
        raise DataError(f"covariates {list(covariates)} are collinear with each other or with the sites; "
                        "ComBat cannot separate their effects: leave one out of --covariates")


def residual_stats(rows: SiteRows, location: CombatLocation, features: Sequence[str]) -> CombatResidualStats:
    """Step 3 at a site: its residual moments under the pooled fit."""
    X, C = _check_rows(rows, features, location.covariates)
    i = location.sites.index(rows.name)
    r = X - location.grand_mean - C @ location.covariate_effect
    resid = r - (location.site_mean[i] - location.grand_mean)
    mean = r.mean(axis=0)
    return CombatResidualStats(rows.name, X.shape[0], np.einsum("ij,ij->j", resid, resid), mean,
                               np.einsum("ij,ij->j", r - mean, r - mean))


def fit_combat(location: CombatLocation, residuals: Sequence[CombatResidualStats], features: Sequence[str],
               *, eb: bool = True) -> CombatModel:
    """Step 4 at the coordinator: pooled variance, each site's standardized location/scale and,
    with ``eb``, its empirical-Bayes priors and posteriors."""
    features = tuple(features)
    by_site = {r.site: r for r in residuals}
    if sorted(by_site) != sorted(location.sites):
        raise DataError(f"ComBat: residual statistics of sites {sorted(by_site)} for a fit on {sorted(location.sites)}")
    ordered = [by_site[s] for s in location.sites]
    var_pooled = sum(r.sse for r in ordered) / sum(r.n for r in ordered)
    constant = np.flatnonzero(var_pooled <= 1e-24 * np.maximum(1.0, location.grand_mean**2))
    if constant.size:
        raise DataError(
            f"feature(s) {', '.join(repr(features[j]) for j in constant[:5])} do not vary beyond the sites and "
            "covariates (constant in the training rows): ComBat would divide by a zero pooled variance; "
            "leave them out with --features")
    if len(ordered) == 1:  # a lone site is its own reference (a one-site federation under --loso)
        lone = ordered[0]
        gamma_hat, delta_hat = lone.mean / np.sqrt(var_pooled), lone.m2 / (lone.n - 1) / var_pooled
        effects = (SiteEffect(lone.site, lone.n, gamma_hat, delta_hat, np.zeros_like(gamma_hat),
                              np.ones_like(delta_hat)),)
    else:
        effects = tuple(site_effect(r, var_pooled, eb, features) for r in ordered)
    return CombatModel(features, location.covariates, eb, location.grand_mean, location.covariate_effect, var_pooled,
                       effects)


def site_effect(stats: CombatResidualStats, var_pooled: np.ndarray, eb: bool, features: Sequence[str],
                adapted: bool = False) -> SiteEffect:
    """A site's ``gamma``/``delta`` from its residual moments: the moments themselves (``eb``
    off), or the empirical-Bayes posteriors under priors set from its features (``eb`` on)."""
    gamma_hat = stats.mean / np.sqrt(var_pooled)
    delta_hat = stats.m2 / (stats.n - 1) / var_pooled
    flat = np.flatnonzero(delta_hat <= 1e-24)
    if flat.size:
        raise DataError(f"site {stats.site!r}: feature(s) {', '.join(repr(features[j]) for j in flat[:5])} are "
                        "constant in its rows (after the covariates): ComBat cannot scale them; leave them out "
                        "with --features")
    if not eb:
        return SiteEffect(stats.site, stats.n, gamma_hat, delta_hat, gamma_hat, delta_hat, adapted=adapted)
    if gamma_hat.size < 2:
        raise ConfigError("empirical Bayes pools information across features and needs at least 2; "
                          "with one feature use --no-eb")
    m, s2 = delta_hat.mean(), delta_hat.var(ddof=1)
    prior = EbPrior(float(gamma_hat.mean()), float(gamma_hat.var(ddof=1)), (2 * s2 + m**2) / s2, (m * s2 + m**3) / s2)
    gamma_star, delta_star, iterations = _eb_solution(stats.n, gamma_hat, delta_hat, stats.m2 / var_pooled, prior,
                                                      stats.site)
    return SiteEffect(stats.site, stats.n, gamma_hat, delta_hat, gamma_star, delta_star, prior, iterations, adapted)


def _eb_solution(n: int, gamma_hat: np.ndarray, delta_hat: np.ndarray, centred_ss: np.ndarray, prior: EbPrior,
                 site: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Johnson et al.'s (2007) iterative solution of the posterior means: ``gamma*`` given
    ``delta*``, then ``delta*`` from the site's sum of squares about ``gamma*`` -- which its
    moments give exactly: ``sum_j (s_j - g)^2 = centred_ss + n (gamma_hat - g)^2``."""
    g_old, d_old = gamma_hat, delta_hat
    for iteration in range(1, EB_MAX_ITERATIONS + 1):
        g_new = (prior.tau2 * n * gamma_hat + d_old * prior.gamma_bar) / (prior.tau2 * n + d_old)
        sum2 = centred_ss + n * (gamma_hat - g_new) ** 2
        d_new = (0.5 * sum2 + prior.b) / (n / 2.0 + prior.a - 1.0)
        change = max((np.abs(g_new - g_old) / g_old).max(), (np.abs(d_new - d_old) / d_old).max())
        g_old, d_old = g_new, d_new
        if not change > EB_TOLERANCE:  # NaN stops too, as in the reference's `while change > conv`
            return g_new, d_new, iteration
    raise DataError(f"site {site!r}: the empirical-Bayes iteration did not converge in {EB_MAX_ITERATIONS} steps; "
                    "use --no-eb")


def adapt_site(model: CombatModel, rows: SiteRows) -> CombatModel:
    """``model`` with one more site, estimated by that site alone from its own unlabeled rows
    against the federation's reference (grand mean, covariate effects, pooled variance): the
    test-time adaptation of an unseen site. Nothing leaves the site; the federation's fit is
    unchanged, and so are the other sites' effects."""
    if rows.name in {s.site for s in model.sites}:
        raise DataError(f"site {rows.name!r} is already in the ComBat fit")
    X, C = _check_rows(rows, model.features, model.covariates)
    r = X - model.grand_mean - C @ model.covariate_effect
    mean = r.mean(axis=0)
    stats = CombatResidualStats(rows.name, X.shape[0], np.zeros_like(mean), mean,
                                np.einsum("ij,ij->j", r - mean, r - mean))
    effect = site_effect(stats, model.var_pooled, model.eb, model.features, adapted=True)
    return CombatModel(model.features, model.covariates, model.eb, model.grand_mean, model.covariate_effect,
                       model.var_pooled, model.sites + (effect,))


def federated_combat(rows: Sequence[SiteRows], features: Sequence[str], covariates: Sequence[str] = (),
                     *, eb: bool = True) -> CombatModel:
    """The whole exchange in one process (simulation): every site's statistics, then the fit.

    Each site's rows enter only its own :func:`design_stats` and :func:`residual_stats`; the
    fit sees those summaries alone, as it would deployed."""
    features, covariates = tuple(features), tuple(covariates)
    location = fit_location([design_stats(r, features, covariates) for r in rows])
    return fit_combat(location, [residual_stats(r, location, features) for r in rows], features, eb=eb)


@dataclass(frozen=True)
class HarmonizedTable:
    """A table with its feature columns harmonized (``frame``, other columns as they were), the
    fitted model, and each site's rows before and after (for a report of the site effect)."""

    frame: Any  # pandas.DataFrame
    model: CombatModel
    before: dict[str, np.ndarray]
    after: dict[str, np.ndarray]


def harmonize_table(path: str | os.PathLike, *, site_column: str, covariates: Sequence[str] = (),
                    features: Sequence[str] | None = None, label_column: str | None = None,
                    eb: bool = True) -> HarmonizedTable:
    """Federated ComBat on a table with one row per subject, each site's rows on their own.

    Features are ``features``, or every column but the site, label and covariate columns; each
    must be numeric and complete. The label column (if named) is left as it is and may not be
    a covariate. The fit runs the sites' exchange of statistics (:func:`federated_combat`)."""
    from medfed.data.tables import (
        _numeric_column,
        covariate_values,
        read_frame,
        site_values,
    )

    path = Path(path)
    for flag, value in (("--site-column", site_column), ("--label-column", label_column)):
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"{flag} must be a column name, got {value!r}")
    covariates = tuple(covariates)
    df = read_frame(path)
    df.columns = [str(c) for c in df.columns]
    columns = list(df.columns)
    reserved = {site_column, label_column, *covariates}
    feature_names = tuple(c for c in columns if c not in reserved) if features is None else tuple(features)
    check_covariates(covariates, feature_names, label=label_column)
    if site_column in feature_names:
        raise ConfigError(f"--features must not include {site_column!r}, the site column")
    named = [(site_column, "--site-column")] + ([(label_column, "--label-column")] if label_column else [])
    named += [(c, "--covariates") for c in covariates] + [(c, "--features") for c in feature_names]
    absent = [f"{c!r} ({flag})" for c, flag in named if c not in columns]
    if absent:
        raise DataError(f"{path}: column(s) {', '.join(absent)} not in the file; its columns: {', '.join(columns)}")
    if not feature_names:
        raise DataError(f"{path}: no feature columns besides the site, label and covariate columns")
    if len(df) == 0:
        raise DataError(f"{path} holds no data rows")
    sites = np.asarray(site_values(df[site_column], site_column, path), dtype=object)
    X = np.column_stack([_numeric_column(df[c], c, path, fix="name the numeric feature columns with --features")
                         for c in feature_names])
    missing = np.isnan(X)
    if missing.any():
        j = int(np.argmax(missing.sum(axis=0)))
        raise DataError(f"{path}: feature column {feature_names[j]!r} has {int(missing[:, j].sum())} missing value(s); "
                        "ComBat needs every feature of every row: fill them in, drop those rows, or leave the column "
                        "out of --features")
    C = np.column_stack([covariate_values(df[c], c, path, sites) for c in covariates] or [np.empty((len(df), 0))])
    order = list(dict.fromkeys(sites.tolist()))
    if len(order) < 2:
        raise DataError(f"{path}: ComBat removes differences between sites; column {site_column!r} names "
                        f"{len(order)} site")
    rows = [SiteRows(s, X[sites == s], C[sites == s]) for s in order]
    model = federated_combat(rows, feature_names, covariates, eb=eb)
    after = {r.name: model.apply(r.name, r.X, r.C) for r in rows}
    frame = df.copy()
    harmonized = np.empty_like(X)
    for r in rows:
        harmonized[sites == r.name] = after[r.name]
    for j, c in enumerate(feature_names):
        frame[c] = harmonized[:, j]
    return HarmonizedTable(frame, model, {r.name: r.X for r in rows}, after)
