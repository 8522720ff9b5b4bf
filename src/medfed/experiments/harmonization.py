"""Harmonization in the experiment: per repeat, a setup exchange of statistics among the sites.

With ``[harmonize] method = "combat"`` each repeat fits federated ComBat
(:mod:`medfed.data.harmonize`) on the training rows of the sites that train -- every site, or
all but the held-out one under ``--loso`` -- from their statistics alone, and each site adjusts
its own training and test rows. Single, Cross and Mix use the same fit as the federation, so
every setting sees the same features. A held-out site is scored as it comes (``"loso"``) and,
harmonized by itself from its own unlabeled training-split rows against the federation's
reference, as ``"loso+adapt"`` (test-time adaptation without labels, nothing sent).
``method = "frequency"`` (images; :mod:`medfed.data.frequency`) is the same shape: the sites'
mean low-band amplitude spectra of their training images make the reference, each site moves
its images toward it, and a held-out site adapts by doing the same to its own images.

The site effect before and after (:func:`site_effect`) is measured on every site's test rows,
which the repeat's fit never saw: per feature, the share of variance between site means, and
the cross-validated AUC of a classifier that predicts the site from the features (0.5: the
site is no longer visible). Not on the training rows: there ComBat makes the site means equal
by construction, and a cross-validated classifier then scores below chance (adni-like: AUC
0.32 on the training rows, 0.50 on the test rows, 0.97 before harmonization). Images are
summarized first (:func:`image_summary`: intensity quantiles per channel).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from medfed.data.frequency import AmplitudeStats, FrequencyModel, amplitude_stats, federated_frequency
from medfed.data.harmonize import CombatDesignStats, CombatModel, SiteRows, adapt_site, design_stats, federated_combat
from medfed.data.preprocess import Moments
from medfed.errors import ConfigError

SITE_AUC_FOLDS = 5
SUMMARY_QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)


def check_harmonized_data(config, federation) -> None:
    """A harmonization the rows cannot serve (a covariate they lack, ComBat on images, frequency
    on a table), refused before any training: by the simulation, and by each deployed site of
    its own file."""
    spec, covariates = config.harmonize, tuple(config.data.covariates or ())
    missing = [c for c in covariates if c not in federation.covariate_names]
    if missing:
        have = ", ".join(federation.covariate_names) or "none"
        raise ConfigError(f"--covariates: {federation.name!r} has no covariate {', '.join(map(repr, missing))}; "
                          f"its rows carry: {have}")
    if spec.method == "combat" and federation.is_image:
        raise ConfigError("--harmonize combat adjusts feature tables; this federation holds images "
                          "(use --harmonize frequency)")
    if spec.method == "frequency" and not federation.is_image:
        raise ConfigError("--harmonize frequency adjusts images' amplitude spectra; this federation holds a feature "
                          "table (use --harmonize combat)")


def check_harmonization(config, federation) -> None:
    """A harmonization the data cannot serve, refused before any training."""
    check_harmonized_data(config, federation)
    if config.harmonize.method == "none":
        return
    flag = f"--harmonize {config.harmonize.method}"
    if len(federation.sites) < 2:
        raise ConfigError(f"{flag} removes differences between sites; {federation.name!r} has one")
    if config.save_model:
        raise ConfigError(f"--save-model with {flag} is not available yet: a saved model does not carry "
                          "the fit its rows were adjusted with")


class Harmonizer:
    """A repeat's fits (by the sites that fit them) and the harmonized sites they give; a
    method says how it fits (:meth:`_fit`) and how a site adjusts its rows (:meth:`_apply`)."""

    def __init__(self, sites) -> None:
        self.sites = sites
        self._fits: dict[tuple[int, ...], Any] = {}
        self._views: dict[tuple, list] = {}

    def fit(self, reference: tuple[int, ...]):
        """The fit from the training rows of the sites in ``reference`` (their statistics only)."""
        if reference not in self._fits:
            self._fits[reference] = self._fit([self.sites[i] for i in reference])
        return self._fits[reference]

    def __call__(self, reference: tuple[int, ...], adapt: bool = False) -> list:
        """Every site of the repeat harmonized by the fit of ``reference``; a site outside it
        stays as it is, or with ``adapt`` harmonizes itself against the fit's reference."""
        key = (reference, adapt)
        if key not in self._views:
            model = self.fit(reference)
            out = []
            for i, s in enumerate(self.sites):
                if i not in reference and not adapt:
                    out.append(s)
                    continue
                X_train, X_test = self._apply(model, s, adapted=i not in reference)
                out.append(dataclasses.replace(s, X_train=X_train, X_test=X_test, moments=Moments.of(X_train)))
            self._views[key] = out
        return self._views[key]

    def _fit(self, sites: list):
        raise NotImplementedError

    def _apply(self, model, site, adapted: bool) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def repeat_report(self, reference: tuple[int, ...]) -> dict:
        """What a repeat's ``harmonization`` record carries about the fit of ``reference``."""
        return {}


class CombatHarmonizer(Harmonizer):
    """Federated ComBat per repeat; an unseen site estimates its own location and scale from
    its own unlabeled training-split rows (:func:`~medfed.data.harmonize.adapt_site`)."""

    def __init__(self, sites, features: Sequence[str], covariates: Sequence[str], eb: bool) -> None:
        super().__init__(sites)
        self.features, self.covariates, self.eb = tuple(features), tuple(covariates), eb

    def _fit(self, sites: list) -> CombatModel:
        rows = [SiteRows(s.name, s.X_train, s.C_train) for s in sites]
        return federated_combat(rows, self.features, self.covariates, eb=self.eb)

    def _apply(self, model: CombatModel, s, adapted: bool) -> tuple[np.ndarray, np.ndarray]:
        if adapted:
            model = adapt_site(model, SiteRows(s.name, s.X_train, s.C_train))  # no label is used
        return harmonized_rows(model, s)

    def repeat_report(self, reference: tuple[int, ...]) -> dict:
        return {"iterations": {e.site: e.iterations for e in self.fit(reference).sites}}


class FrequencyHarmonizer(Harmonizer):
    """Frequency-domain harmonization per repeat (:mod:`medfed.data.frequency`). Each image
    moves toward the reference by itself, so an unseen site adapts by applying the
    federation's reference to its own images: no label, no statistic of its own sent."""

    def __init__(self, sites, band: float, strength: float) -> None:
        super().__init__(sites)
        self.band, self.strength = band, strength

    def _fit(self, sites: list) -> FrequencyModel:
        return federated_frequency([(s.name, s.X_train) for s in sites], self.band, self.strength)

    def _apply(self, model: FrequencyModel, s, adapted: bool) -> tuple[np.ndarray, np.ndarray]:
        return harmonized_rows(model, s)


def harmonized_rows(model: CombatModel | FrequencyModel, s) -> tuple[np.ndarray, np.ndarray]:
    """A site's training and test rows (``s``: a :class:`~medfed.experiments.harness.SplitSite`
    or what a deployed site keeps) adjusted by a fit that knows the site: in simulation and at
    a deployed site alike."""
    if isinstance(model, CombatModel):
        return model.apply(s.name, s.X_train, s.C_train), model.apply(s.name, s.X_test, s.C_test)
    return model.apply(s.X_train, s.name), model.apply(s.X_test, s.name)


# -- deployed: the same exchange, each step where its rows are (medfed.deploy) ---------------------


def first_statistics(config, s, features: Sequence[str]) -> CombatDesignStats | AmplitudeStats:
    """What a site shares at setup for ``[harmonize]``: ComBat's design cross-products and
    per-feature sums, or its training images' mean low-band amplitudes."""
    if config.harmonize.method == "combat":
        return design_stats(SiteRows(s.name, s.X_train, s.C_train), features, tuple(config.data.covariates or ()))
    return amplitude_stats(s.name, s.X_train, config.harmonize.band)


def site_share(model: CombatModel | FrequencyModel, site: str) -> CombatModel | FrequencyModel:
    """What ``site`` needs of the federation's fit to adjust its own rows: ComBat's reference
    and its own location/scale (not the other sites'), or the reference amplitudes."""
    if isinstance(model, CombatModel):
        return dataclasses.replace(model, sites=(model.site(site),))
    return model


def deployed_report(model: CombatModel | FrequencyModel) -> dict:
    """A deployed repeat's ``harmonization`` record: the fit (no site effect: it is measured on
    every site's test rows together, which a deployment never has in one place)."""
    report = {"fit": model.to_json()}
    if isinstance(model, CombatModel):
        report["iterations"] = {e.site: e.iterations for e in model.sites}
    return report


def make_harmonizer(config, federation, sites) -> Harmonizer | None:
    """The repeat's harmonization (``[harmonize]``), or None when it is off."""
    spec = config.harmonize
    if spec.method == "combat":
        return CombatHarmonizer(sites, federation.feature_names, config.data.covariates or (), spec.eb)
    if spec.method == "frequency":
        return FrequencyHarmonizer(sites, spec.band, spec.strength)
    return None


def between_site_variance_ratio(blocks: Sequence[np.ndarray]) -> np.ndarray:
    """Per feature, the share of the pooled variance that lies between the sites' means
    (sum of squares between sites / total; 0 when every site has the same mean)."""
    X = np.vstack(blocks)
    mean = X.mean(axis=0)
    between = sum(b.shape[0] * (b.mean(axis=0) - mean) ** 2 for b in blocks)
    total = ((X - mean) ** 2).sum(axis=0)
    return np.divide(between, total, out=np.zeros_like(total), where=total > 0)


def site_auc(blocks: Sequence[np.ndarray], seed: int) -> float:
    """Cross-validated AUC of a logistic regression predicting each row's site from its features
    (one-vs-rest macro average with more than two sites); 0.5 = the site cannot be told."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X = np.vstack(blocks)
    site = np.concatenate([np.full(b.shape[0], i) for i, b in enumerate(blocks)])
    folds = StratifiedKFold(min(SITE_AUC_FOLDS, min(b.shape[0] for b in blocks)), shuffle=True, random_state=seed)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    proba = cross_val_predict(model, X, site, cv=folds, method="predict_proba")
    if len(blocks) == 2:
        return float(roc_auc_score(site, proba[:, 1]))
    return float(roc_auc_score(site, proba, multi_class="ovr", average="macro"))


def image_summary(X: np.ndarray) -> np.ndarray:
    """A cheap per-image summary for the site effect of images: each channel's intensity
    quantiles (``SUMMARY_QUANTILES``), one row per image. Not the low-band amplitudes that
    frequency harmonization sets: at strength 1 those are equal by construction."""
    pixels = np.asarray(X, dtype=np.float64).reshape(X.shape[0], X.shape[1], -1)
    return np.quantile(pixels, SUMMARY_QUANTILES, axis=-1).transpose(1, 2, 0).reshape(X.shape[0], -1)


def summary_names(federation) -> tuple[str, ...]:
    """The names of what the site effect is measured on: the features, or per channel the
    intensity quantiles of :func:`image_summary`."""
    if not federation.is_image:
        return tuple(federation.feature_names)
    return tuple(f"{c} q{round(100 * q):02d}" for c in federation.feature_names for q in SUMMARY_QUANTILES)


def site_effect(sites, seed: int) -> dict:
    """The site effect in ``sites``' test rows (images: in their :func:`image_summary`)."""
    blocks = [image_summary(s.X_test) if s.X_test.ndim > 2 else s.X_test for s in sites]
    ratio = between_site_variance_ratio(blocks)
    return {"variance_ratio": ratio.tolist(), "variance_ratio_mean": float(ratio.mean()),
            "site_auc": site_auc(blocks, seed)}


FITTED_ON = ("every training site's training rows, per repeat, from the sites' statistics only "
             "(under --loso: without the held-out site, which adapts itself in 'loso+adapt' rows)")


FITTED_DEPLOYED = "every joined site's training rows, once per deployed study, from the sites' statistics only"
SITE_EFFECT_DEPLOYED = ("not measured: the site effect is measured on every site's test rows together, which a "
                        "deployment never holds in one place")


def harmonization_document(config, federation, per_repeat: Sequence[dict]) -> dict | None:
    """``results.json``'s ``harmonization``: what was fitted, how, and the site effect before
    and after it (per feature the mean over repeats; AUC per repeat and its mean)."""
    spec = config.harmonize
    if spec.method == "none":
        return None
    if spec.method == "combat":
        doc = {"method": "combat", "empirical_bayes": spec.eb, "covariates": list(config.data.covariates or ()),
               "fitted_on": FITTED_ON, "site_effect_rows": "every site's test rows (never in the fit)",
               "reference": "Johnson et al., 2007; Fortin et al., 2017/2018; distributed as in Chen et al., 2022"}
    else:
        doc = {"method": "frequency", "band": spec.band, "strength": spec.strength,
               "shared": "per site: its training-image count and per channel the mean amplitude of their low band",
               "fitted_on": FITTED_ON, "site_effect_rows": "every site's test images (never in the fit), each "
               "summarized by its intensity quantiles per channel",
               "reference": "Liu et al., 2021 (FedDG); Jiang et al., 2022 (HarmoFL)"}
    if spec.method == "combat":
        doc["per_repeat_eb_iterations"] = [r["iterations"] for r in per_repeat]
    if per_repeat and "fit" in per_repeat[0]:  # deployed (deployed_report): the fit, no site effect
        doc["fitted_on"] = FITTED_DEPLOYED
        doc.pop("site_effect_rows")
        return doc | {"site_effect": SITE_EFFECT_DEPLOYED, "fit": per_repeat[0]["fit"]}
    names = summary_names(federation)
    for when in ("before", "after"):
        ratios = np.mean([r[when]["variance_ratio"] for r in per_repeat], axis=0)
        aucs = [r[when]["site_auc"] for r in per_repeat]
        doc[when] = {"variance_ratio_mean": float(ratios.mean()),
                     "variance_ratio": dict(zip(names, ratios.tolist())),
                     "site_auc_mean": float(np.mean(aucs)), "site_auc": aucs}
    return doc
