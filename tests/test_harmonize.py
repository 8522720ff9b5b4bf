"""Federated ComBat (medfed.data.harmonize): equal to neuroHarmonize on the pooled rows, to the
paper's formulas where neuroHarmonize departs from them, and its refusals of bad input."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from medfed.comm.wire import decode, encode
from medfed.data.harmonize import (
    SiteRows,
    adapt_site,
    check_covariates,
    design_stats,
    federated_combat,
    fit_combat,
    fit_location,
    residual_stats,
)
from medfed.errors import ConfigError, DataError

FEATURES = tuple(f"f{j}" for j in range(6))
SIZES = {"siteA": 40, "siteB": 75, "siteC": 120, "siteD": 23}


def _sites(seed: int = 1, quarter_years: bool = True) -> list[SiteRows]:
    """Four sites of unequal size with site-specific location and scale, age and sex effects.
    Ages in quarter years are exact in float32 (neuroCombat casts covariates to float32)."""
    rng = np.random.default_rng(seed)
    out = []
    d = len(FEATURES)
    loadings = rng.uniform(0.5, 2.0, d)
    for i, (name, n) in enumerate(SIZES.items()):
        age = rng.normal(70, 8, n)
        age = np.round(age * 4) / 4 if quarter_years else age
        sex = rng.integers(0, 2, n).astype(float)
        X = (5 + 0.1 * age[:, None] + 0.5 * sex[:, None] + (i - 1.5) * 0.7 * rng.uniform(0.5, 1.5, d)
             + rng.normal(0, 1 + 0.3 * i, (n, d)) * loadings)
        out.append(SiteRows(name, X, np.column_stack([age, sex])))
    return out


def _harmonized(model, sites) -> np.ndarray:
    return np.vstack([model.apply(s.name, s.X, s.C) for s in sites])


def _paper_combat(sites: list[SiteRows], eb: bool) -> np.ndarray:
    """Johnson et al. (2007) on the pooled rows in float64, written from the paper's equations:
    the least-squares fit on [site indicators, covariates], alpha = sum_i n_i/N gamma_i, the
    pooled variance with 1/N, per-site moments of the standardized data and, with eb, the
    method-of-moments priors and the iterative posterior means."""
    X = np.vstack([s.X for s in sites])
    C = np.vstack([s.C for s in sites])
    site = np.concatenate([np.full(s.X.shape[0], i) for i, s in enumerate(sites)])
    n = np.bincount(site)
    design = np.column_stack([np.eye(len(sites))[site], C])
    B = np.linalg.lstsq(design, X, rcond=None)[0]
    alpha = (n / n.sum()) @ B[: len(sites)]
    var = ((X - design @ B) ** 2).mean(axis=0)
    mean = alpha + C @ B[len(sites):]
    s = (X - mean) / np.sqrt(var)
    out = np.empty_like(X)
    for i in range(len(sites)):
        rows = s[site == i]
        g_hat, d_hat = rows.mean(axis=0), rows.var(axis=0, ddof=1)
        g, d = g_hat, d_hat
        if eb:
            g_bar, t2 = g_hat.mean(), g_hat.var(ddof=1)
            m, v = d_hat.mean(), d_hat.var(ddof=1)
            a, b = (2 * v + m**2) / v, (m * v + m**3) / v
            while True:
                g_new = (t2 * n[i] * g_hat + d * g_bar) / (t2 * n[i] + d)
                d_new = (0.5 * ((rows - g_new) ** 2).sum(axis=0) + b) / (n[i] / 2 + a - 1)
                change = max((abs(g_new - g) / g).max(), (abs(d_new - d) / d).max())
                g, d = g_new, d_new
                if change <= 1e-4:
                    break
        out[site == i] = (rows - g) / np.sqrt(d) * np.sqrt(var[None]) + mean[site == i]
    return out


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # neuroHarmonize's np.matrix
@pytest.mark.parametrize("eb", [True, False])
def test_equals_neuroharmonize_on_the_pooled_rows(eb):
    pd = pytest.importorskip("pandas")
    nh = pytest.importorskip("neuroHarmonize")
    sites = _sites()
    covars = pd.DataFrame({"SITE": np.concatenate([[s.name] * s.X.shape[0] for s in sites]),
                           "age": np.concatenate([s.C[:, 0] for s in sites]),
                           "sex": np.concatenate([s.C[:, 1] for s in sites])})
    reference_model, reference = nh.harmonizationLearn(np.vstack([s.X for s in sites]), covars, eb=eb)
    model = federated_combat(sites, FEATURES, ("age", "sex"), eb=eb)
    ours = _harmonized(model, sites)
    assert np.abs(ours - reference).max() < 1e-8
    assert np.abs(ours - np.vstack([s.X for s in sites])).max() > 0.1  # the site effects were real
    labels = list(reference_model["SITE_labels"])
    for effect in model.sites:
        i = labels.index(effect.site)
        np.testing.assert_allclose(effect.gamma_star, reference_model["gamma_star"][i], atol=1e-9)
        np.testing.assert_allclose(effect.delta_star, reference_model["delta_star"][i], atol=1e-9)
    np.testing.assert_allclose(model.var_pooled, reference_model["var_pooled"].ravel(), rtol=1e-10)


@pytest.mark.parametrize("eb", [True, False])
def test_float64_covariates_follow_the_paper(eb):
    # neuroCombat rounds covariates to float32 in its design; the federated fit keeps float64,
    # and equals the paper's equations on the pooled rows
    sites = _sites(seed=3, quarter_years=False)
    model = federated_combat(sites, FEATURES, ("age", "sex"), eb=eb)
    assert np.abs(_harmonized(model, sites) - _paper_combat(sites, eb)).max() < 1e-9


def test_the_fit_sees_statistics_only_and_site_order_does_not_matter():
    sites = _sites()
    stats = [design_stats(s, FEATURES, ("age", "sex")) for s in sites]
    location = fit_location(stats)
    # what crosses the network is wire bytes: the fit from decoded statistics is the same
    decoded = decode(encode([residual_stats(s, decode(encode(location)), FEATURES) for s in sites]))
    model = decode(encode(fit_combat(decode(encode(location)), decoded, FEATURES)))
    reordered = federated_combat(sites[::-1], FEATURES, ("age", "sex"))
    np.testing.assert_allclose(_harmonized(model, sites), _harmonized(reordered, sites), rtol=0, atol=1e-10)
    # each statistic is a fixed-size summary: no row of any site is in it
    sizes = {f.name: np.asarray(getattr(stats[0], f.name)).size for f in dataclasses.fields(stats[0])
             if isinstance(getattr(stats[0], f.name), np.ndarray)}
    assert sizes == {"ztz": 9, "zty": 3 * len(FEATURES)}


def test_without_eb_each_site_takes_the_pooled_location_and_scale():
    sites = _sites()
    model = federated_combat(sites, FEATURES, ("age", "sex"), eb=False)
    for s in sites:
        resid = model.apply(s.name, s.X, s.C) - model.grand_mean - s.C @ model.covariate_effect
        np.testing.assert_allclose(resid.mean(axis=0), 0, atol=1e-10)
        np.testing.assert_allclose(resid.var(axis=0, ddof=1), model.var_pooled, rtol=1e-10)


@pytest.mark.parametrize("eb", [True, False])
def test_an_unseen_site_estimates_itself_as_the_fit_would(eb):
    sites = _sites()
    model = federated_combat(sites, FEATURES, ("age", "sex"), eb=eb)
    new = SiteRows("new", sites[1].X, sites[1].C)  # the same rows as a fitted site: the same effect
    adapted = adapt_site(model, new)
    assert all(a is b for a, b in zip(adapted.sites, model.sites))  # the fitted sites are untouched
    np.testing.assert_allclose(adapted.site("new").gamma_star, model.site("siteB").gamma_star, atol=1e-12)
    np.testing.assert_allclose(adapted.site("new").delta_star, model.site("siteB").delta_star, atol=1e-12)
    assert adapted.site("new").adapted and not model.site("siteB").adapted


def test_refusals_are_one_line_and_name_what_is_wrong():
    sites = _sites()
    two = sites[:2]
    missing = two[0].C.copy()
    missing[3, 0] = np.nan
    with pytest.raises(DataError, match=r"site 'siteA': covariate 'age' is missing .* in 1 row"):
        federated_combat([SiteRows("siteA", two[0].X, missing), two[1]], FEATURES, ("age", "sex"))
    with pytest.raises(DataError, match=r"site 'tiny' has 1 row\(s\); ComBat needs at least 2"):
        federated_combat([two[0], SiteRows("tiny", two[1].X[:1], two[1].C[:1])], FEATURES, ("age", "sex"))
    constant = two[0].X.copy(), two[1].X.copy()
    constant[0][:, 2] = constant[1][:, 2] = 4.0
    with pytest.raises(DataError, match=r"feature\(s\) 'f2' do not vary .* zero pooled variance"):
        federated_combat([SiteRows(s.name, x, s.C) for s, x in zip(two, constant)], FEATURES, ("age", "sex"))
    per_site = [SiteRows(s.name, s.X, np.column_stack([s.C, np.full(len(s.X), float(i))])) for i, s in enumerate(two)]
    with pytest.raises(DataError, match=r"covariate 'field' takes one value per site"):
        federated_combat(per_site, FEATURES, ("age", "sex", "field"))
    with pytest.raises(ConfigError, match=r"needs at least 2; with one feature use --no-eb"):
        federated_combat([SiteRows(s.name, s.X[:, :1], s.C) for s in two], FEATURES[:1], ("age", "sex"))
    lone = federated_combat(two[:1], FEATURES, ("age", "sex"))  # one site is its own reference
    np.testing.assert_allclose(lone.apply("siteA", two[0].X, two[0].C), two[0].X, rtol=0, atol=1e-9)
    with pytest.raises(ConfigError, match=r"'AD' is the label"):
        check_covariates(("age", "AD"), FEATURES, label="AD")
    with pytest.raises(ConfigError, match=r"'f1' is also a feature"):
        check_covariates(("f1",), FEATURES)
