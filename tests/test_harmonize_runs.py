"""Harmonization end to end: `medfed harmonize combat`, `medfed run --harmonize combat`, the
per-repeat fit on training rows only, the unseen site that adapts itself, adni-like's covariates."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from medfed.cli.app import app
from medfed.data.datasets.adni_like import load_adni_like
from medfed.data.harmonize import SiteRows, federated_combat
from medfed.experiments.config import build_config
from medfed.experiments.harness import (
    ScaledViews,
    load_federation,
    prepare_repeat,
    repeat_harmonizer,
)

runner = CliRunner()
FAST = ["--rounds", "3", "--local-steps", "2", "--repeats", "1"]


def _table(path, sizes=(30, 45, 25), seed=0):
    rng = np.random.default_rng(seed)
    frames = []
    for k, n in enumerate(sizes):
        age = rng.normal(70, 6, n)
        sex = rng.integers(0, 2, n)
        base = 0.05 * age[:, None] + 0.3 * sex[:, None] + rng.normal(0, 1 + 0.4 * k, (n, 4)) + 1.5 * k
        frames.append(pd.DataFrame({"hospital": f"H{k}", "age": age, "sex": sex, "dx": rng.integers(0, 2, n),
                                    **{f"v{j}": base[:, j] for j in range(4)}}))
    df = pd.concat(frames, ignore_index=True)
    df.to_csv(path, index=False)
    return df


def _invoke(args):
    result = runner.invoke(app, args)
    return result.exit_code, result.output


def test_harmonize_command_writes_the_table_and_the_fit(tmp_path):
    df = _table(tmp_path / "t.csv")
    out = tmp_path / "o" / "harmonized.csv"
    code, text = _invoke(["harmonize", "combat", "--data", str(tmp_path / "t.csv"), "--site-column", "hospital",
                          "--covariates", "age,sex", "--label-column", "dx", "--out", str(out)])
    assert code == 0, text
    got = pd.read_csv(out)
    assert list(got.columns) == list(df.columns)
    for kept in ("hospital", "age", "sex", "dx"):  # the label and covariates are never adjusted
        assert got[kept].astype(str).tolist() == df[kept].astype(str).tolist()
    features = [f"v{j}" for j in range(4)]
    rows = [SiteRows(h, df.loc[df.hospital == h, features].to_numpy(float),
                     df.loc[df.hospital == h, ["age", "sex"]].to_numpy(float)) for h in ("H0", "H1", "H2")]
    model = federated_combat(rows, features, ("age", "sex"))
    expected = np.vstack([model.apply(r.name, r.X, r.C) for r in rows])
    np.testing.assert_allclose(got[features].to_numpy(), expected, rtol=1e-12)
    fit = json.loads((out.parent / "combat.json").read_text())
    assert fit["empirical_bayes"] and fit["covariates"] == ["age", "sex"] and fit["features"] == features
    assert set(fit["sites"]) == {"H0", "H1", "H2"}
    for site in fit["sites"].values():
        assert set(site["location"]) == set(features) and {"gamma_bar", "tau2", "a", "b"} <= set(site["prior"])
    assert "between-site share of variance" in text


@pytest.mark.parametrize("edit, flags, needle", [
    (None, ["--covariates", "age,dx", "--label-column", "dx"], "'dx' is the label"),
    (lambda df: df.assign(age=df.age.where(df.index != 40)), ["--covariates", "age,sex"],
     "covariate column 'age' has 1 missing value(s) (site 'H1': 1)"),
    (lambda df: df.assign(v2=3.0), ["--covariates", "age,sex", "--label-column", "dx"], "'v2' do not vary"),
    (lambda df: df.iloc[:31], ["--covariates", "age,sex", "--label-column", "dx"], "site 'H1' has 1 row(s)"),
    (None, ["--covariates", "age,weight"], "'weight' (--covariates)"),
    (None, ["--covariates", "age,sex", "--features", "v0,age"], "'age' is also a feature"),
])
def test_harmonize_command_refuses_bad_input_in_one_line(tmp_path, edit, flags, needle):
    df = _table(tmp_path / "t.csv")
    if edit is not None:
        edit(df).to_csv(tmp_path / "t.csv", index=False)
    out = tmp_path / "h.csv"
    code, text = _invoke(["harmonize", "combat", "--data", str(tmp_path / "t.csv"), "--site-column", "hospital",
                          "--out", str(out), *flags])
    assert code == 2, text
    assert needle in " ".join(text.split()) and len(text.strip().splitlines()) == 1, text
    assert not out.exists() and not (tmp_path / "combat.json").exists()


def _config(**over):
    values = {"data": {"dataset": "adni-like", "covariates": ["age", "sex"]}, "harmonize": {"method": "combat"},
              "repeats": 1}
    values.update(over)
    return build_config(values)


def test_the_fit_uses_training_rows_only_and_every_setting_shares_it():
    config = _config()
    fed = load_federation(config.data)
    sites = prepare_repeat(fed, config, 0)
    harmonized = repeat_harmonizer(config, fed, sites)((0, 1))
    # a test row changed changes nothing but itself: the fit never saw it
    changed = list(sites)
    changed[0] = dataclasses.replace(sites[0], X_test=sites[0].X_test * np.r_[3.0, np.ones(len(sites[0].X_test) - 1)][:, None])
    again = repeat_harmonizer(config, fed, changed)((0, 1))
    np.testing.assert_array_equal(again[0].X_train, harmonized[0].X_train)
    np.testing.assert_array_equal(again[1].X_test, harmonized[1].X_test)
    np.testing.assert_array_equal(again[0].X_test[1:], harmonized[0].X_test[1:])
    # Single on one site sees that site's rows as the federation's fit harmonized them
    views = ScaledViews(sites, "none", repeat_harmonizer(config, fed, sites))
    single_train = views((0,))[0][0].X
    np.testing.assert_array_equal(single_train, views((0, 1))[0][0].X)
    assert np.abs(single_train - sites[0].X_train).max() > 0.01  # it was harmonized


def test_run_with_combat_reports_the_site_effect_and_adapted_unseen_sites(tmp_path):
    out = tmp_path / "res"
    code, text = _invoke(["run", "--dataset", "adni-like", "--harmonize", "combat", "--covariates", "age,sex",
                          "--methods", "cross,mix,fedavg", "--loso", "--plots", "--out", str(out), *FAST])
    assert code == 0, text
    doc = json.loads((out / "results.json").read_text())
    h = doc["harmonization"]
    assert h["method"] == "combat" and h["empirical_bayes"] and h["covariates"] == ["age", "sex"]
    assert h["before"]["site_auc_mean"] > 0.9 and abs(h["after"]["site_auc_mean"] - 0.5) < 0.15
    assert h["after"]["variance_ratio_mean"] < h["before"]["variance_ratio_mean"] / 5
    adapted = {(r["setting"], r["test_site"]) for r in doc["results"] if r["evaluation"] == "loso+adapt"}
    assert adapted == {(s, site) for s in ("Mix", "FedAvg") for site in ("ADNI-1", "ADNI-2")}
    assert "harmonized with federated ComBat" in " ".join(text.split())
    assert "(unseen, adapted)" in (out / "table.md").read_text()
    assert (out / "site_effect.png").stat().st_size > 0


def test_run_without_harmonization_has_no_harmonization_and_no_adapted_rows(tmp_path):
    out = tmp_path / "res"
    code, text = _invoke(["run", "--dataset", "adni-like", "--methods", "mix", "--loso", "--out", str(out), *FAST])
    assert code == 0, text
    doc = json.loads((out / "results.json").read_text())
    assert doc["harmonization"] is None and {r["evaluation"] for r in doc["results"]} == {"split", "loso"}


@pytest.mark.parametrize("flags, needle", [
    (["--harmonize", "frequency"], "--harmonize frequency adjusts images' amplitude spectra; this federation holds a "
                                   "feature table"),
    (["--harmonize", "combat", "--covariates", "age,weight"], "'adni-like' has no covariate 'weight'"),
    (["--harmonize", "combat", "--save-model"], "--save-model with --harmonize combat is not available yet"),
])
def test_run_refuses_what_harmonization_cannot_serve(tmp_path, flags, needle):
    code, text = _invoke(["run", "--dataset", "adni-like", "--out", str(tmp_path / "r"), *FAST, *flags])
    assert code == 2 and needle in " ".join(text.split()) and len(text.strip().splitlines()) == 1, text
    assert not (tmp_path / "r").exists()


def test_a_table_run_reads_covariates_that_are_not_features(tmp_path):
    _table(tmp_path / "t.csv")
    fed = load_federation(build_config({"data": {"path": str(tmp_path / "t.csv"), "site_column": "hospital",
                                                 "label_column": "dx", "covariates": ["age", "sex"]}}).data)
    assert fed.feature_names == ("v0", "v1", "v2", "v3") and fed.covariate_names == ("age", "sex")
    assert fed.sites[1].covariates["sex"].shape == (45,)


def test_adni_like_carries_its_simulated_age_and_sex_beside_the_same_features():
    fed = load_adni_like(0)
    assert fed.covariate_names == ("age", "sex") and len(fed.feature_names) == 90
    for site in fed.sites:
        age, sex = site.covariates["age"], site.covariates["sex"]
        assert age.min() >= 55 and age.max() <= 92 and set(np.unique(sex)) == {0.0, 1.0}
        assert 0.4 < sex.mean() < 0.6
        # the documented head-size effect of sex (step 8): men's regional volumes are larger
        assert site.X[sex == 1].sum(axis=1).mean() > site.X[sex == 0].sum(axis=1).mean()
