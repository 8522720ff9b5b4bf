"""Harmonization in the experiment: per repeat, a setup exchange of statistics among the sites.

With ``[harmonize] method = "combat"`` each repeat fits federated ComBat
(:mod:`medfed.data.harmonize`) on the training rows of the sites that train -- every site, or
all but the held-out one under ``--loso`` -- from their statistics alone, and each site adjusts
its own training and test rows. Single, Cross and Mix use the same fit as the federation, so
every setting sees the same features. A held-out site is scored as it comes (``"loso"``) and,
harmonized by itself from its own unlabeled training-split rows against the federation's
reference, as ``"loso+adapt"`` (test-time adaptation without labels, nothing sent).

The site effect before and after (:func:`site_effect`) is measured on every site's test rows,
which the repeat's fit never saw: per feature, the share of variance between site means, and
the cross-validated AUC of a classifier that predicts the site from the features (0.5: the
site is no longer visible). Not on the training rows: there ComBat makes the site means equal
by construction, and a cross-validated classifier then scores below chance (adni-like: AUC
0.32 on the training rows, 0.50 on the test rows, 0.97 before harmonization).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from medfed.data.harmonize import CombatModel, SiteRows, adapt_site, federated_combat
from medfed.data.preprocess import Moments
from medfed.errors import ConfigError

SITE_AUC_FOLDS = 5


def check_harmonization(config, federation) -> None:
    """A harmonization the data cannot serve, refused before any training."""
    spec, covariates = config.harmonize, tuple(config.data.covariates or ())
    missing = [c for c in covariates if c not in federation.covariate_names]
    if missing:
        have = ", ".join(federation.covariate_names) or "none"
        raise ConfigError(f"--covariates: {federation.name!r} has no covariate {', '.join(map(repr, missing))}; "
                          f"its rows carry: {have}")
    if spec.method == "none":
        return
    if federation.is_image:
        raise ConfigError("--harmonize combat adjusts feature tables; this federation holds images")
    if len(federation.sites) < 2:
        raise ConfigError(f"--harmonize combat removes differences between sites; {federation.name!r} has one")
    if config.save_model:
        raise ConfigError("--save-model with --harmonize combat is not available yet: a saved model does not carry "
                          "the ComBat fit its rows were adjusted with")
    if config.executor == "flower":
        raise ConfigError("--harmonize combat runs in simulation only for now (--executor inprocess or process)")


class Harmonizer:
    """A repeat's ComBat fits (by the sites that fit them) and the harmonized sites they give."""

    def __init__(self, sites, features: Sequence[str], covariates: Sequence[str], eb: bool) -> None:
        self.sites, self.features, self.covariates, self.eb = sites, tuple(features), tuple(covariates), eb
        self._fits: dict[tuple[int, ...], CombatModel] = {}
        self._views: dict[tuple, list] = {}

    def fit(self, reference: tuple[int, ...]) -> CombatModel:
        """ComBat from the training rows of the sites in ``reference`` (their statistics only)."""
        if reference not in self._fits:
            rows = [SiteRows(self.sites[i].name, self.sites[i].X_train, self.sites[i].C_train) for i in reference]
            self._fits[reference] = federated_combat(rows, self.features, self.covariates, eb=self.eb)
        return self._fits[reference]

    def __call__(self, reference: tuple[int, ...], adapt: bool = False) -> list:
        """Every site of the repeat harmonized by the fit of ``reference``; a site outside it
        stays as it is, or with ``adapt`` harmonizes itself from its own training-split rows."""
        key = (reference, adapt)
        if key not in self._views:
            model = self.fit(reference)
            out = []
            for i, s in enumerate(self.sites):
                own = model
                if i not in reference:
                    if not adapt:
                        out.append(s)
                        continue
                    own = adapt_site(model, SiteRows(s.name, s.X_train, s.C_train))  # no label is used
                X_train, X_test = own.apply(s.name, s.X_train, s.C_train), own.apply(s.name, s.X_test, s.C_test)
                out.append(dataclasses.replace(s, X_train=X_train, X_test=X_test, moments=Moments.of(X_train)))
            self._views[key] = out
        return self._views[key]


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


def site_effect(sites, seed: int) -> dict:
    """The site effect in ``sites``' test rows."""
    blocks = [s.X_test for s in sites]
    ratio = between_site_variance_ratio(blocks)
    return {"variance_ratio": ratio.tolist(), "variance_ratio_mean": float(ratio.mean()),
            "site_auc": site_auc(blocks, seed)}


def harmonization_document(config, federation, per_repeat: Sequence[dict]) -> dict | None:
    """``results.json``'s ``harmonization``: what was fitted, how, and the site effect before
    and after it (per feature the mean over repeats; AUC per repeat and its mean)."""
    spec = config.harmonize
    if spec.method == "none":
        return None
    doc = {"method": spec.method, "empirical_bayes": spec.eb, "covariates": list(config.data.covariates or ()),
           "fitted_on": "every training site's training rows, per repeat, from the sites' statistics only "
                        "(under --loso: without the held-out site, which adapts itself in 'loso+adapt' rows)",
           "site_effect_rows": "every site's test rows (never in the fit)",
           "reference": "Johnson et al., 2007; Fortin et al., 2017/2018; distributed as in Chen et al., 2022"}
    for when in ("before", "after"):
        ratios = np.mean([r[when]["variance_ratio"] for r in per_repeat], axis=0)
        aucs = [r[when]["site_auc"] for r in per_repeat]
        doc[when] = {"variance_ratio_mean": float(ratios.mean()),
                     "variance_ratio": dict(zip(federation.feature_names, ratios.tolist())),
                     "site_auc_mean": float(np.mean(aucs)), "site_auc": aucs}
    doc["per_repeat_eb_iterations"] = [r["iterations"] for r in per_repeat]
    return doc
