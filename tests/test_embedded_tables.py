"""The embedded tabular data sets: real UCI heart-disease sites and partitioned breast cancer."""

from __future__ import annotations

import numpy as np
import pytest

from medfed.data.datasets import load_dataset
from medfed.data.datasets.breast_cancer import load_breast_cancer_federation
from medfed.data.datasets.heart_disease import load_heart_disease
from medfed.errors import ConfigError, DataError

# --------------------------------------------------------------------------- heart disease


def test_heart_disease_sites_and_counts():
    fed = load_heart_disease()
    assert fed.site_names == ["Cleveland", "Hungary", "Switzerland", "VA"]
    assert [s.n for s in fed.sites] == [303, 294, 123, 200]
    assert [int(s.y.sum()) for s in fed.sites] == [139, 106, 115, 149]
    assert fed.feature_names == (
        "age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang", "oldpeak",
    )
    assert fed.impute == "median"
    assert "Janosi" in fed.attribution and "Detrano" in fed.attribution
    assert "CC BY 4.0" in fed.attribution
    assert "num" in fed.positive_label


def test_heart_disease_values_as_recorded():
    fed = load_heart_disease()
    # first Cleveland row: 63,1,1,145,233,1,2,150,0,2.3,...
    np.testing.assert_allclose(fed.sites[0].X[0], [63, 1, 1, 145, 233, 1, 2, 150, 0, 2.3])
    chol = fed.feature_names.index("chol")
    assert (fed.site("Switzerland").X[:, chol] == 0).all()  # "not measured", kept as coded
    assert (fed.site("VA").X[:, chol] == 0).sum() == 49
    assert not np.isnan(fed.site("Cleveland").X).any()
    assert np.isnan(fed.site("Hungary").X[:, chol]).sum() == 23


def test_heart_disease_feature_subset_and_missingness():
    fed = load_heart_disease(features=["ca", "age"])
    assert fed.feature_names == ("ca", "age")
    assert np.isnan(fed.site("Switzerland").X[:, 0]).sum() == 118
    assert np.isnan(fed.site("Hungary").X[:, 0]).sum() == 291


def test_heart_disease_without_imputation_refuses_missing_values():
    with pytest.raises(DataError) as info:
        load_heart_disease(impute=None)
    assert "column 'chol'" in str(info.value)
    # Cleveland's default columns are complete, so that site alone would be fine
    assert load_heart_disease(features=["age", "sex"], impute=None).impute is None


@pytest.mark.parametrize(
    "kw", [dict(features=["age", "bmi"]), dict(features=["num"]), dict(features="age,bmi"), dict(features=3),
           dict(impute="zero")]
)
def test_heart_disease_bad_options(kw):
    with pytest.raises(ConfigError) as info:
        load_heart_disease(**kw)
    if "features" in kw and kw["features"] != 3:
        assert "trestbps" in str(info.value)  # lists the allowed names
        assert "--features" in str(info.value)


def test_heart_disease_options_as_a_command_line_spells_them():
    """``--dataset-option features=age,sex`` arrives as text, ``impute=none`` as the word."""
    fed = load_heart_disease(features="age, sex", impute="none")
    assert fed.feature_names == ("age", "sex") and fed.impute is None


def test_heart_disease_via_registry():
    assert load_dataset("heart-disease").name == "heart-disease"


# --------------------------------------------------------------------------- breast cancer


def test_breast_cancer_totals_and_names():
    fed = load_breast_cancer_federation()
    assert sum(s.n for s in fed.sites) == 569
    assert sum(int(s.y.sum()) for s in fed.sites) == 212
    assert fed.site_names == ["site-1", "site-2", "site-3"]
    assert len(fed.feature_names) == 30 and fed.feature_names[0] == "mean radius"
    assert fed.positive_label == "malignant"
    assert fed.info == {
        "source": fed.info["source"],
        "n_sites": 3,
        "partition": "dirichlet",
        "alpha": 0.5,
        "seed": 0,
        "rows_moved": 0,  # the Dirichlet draw gave every site 10 rows as drawn
    }
    assert "Wolberg" in fed.attribution
    assert min(s.n for s in fed.sites) >= 10


def test_breast_cancer_malignant_is_positive():
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    fed = load_breast_cancer_federation(n_sites=1, partition="iid")
    X, y = fed.sites[0].X, fed.sites[0].y
    malignant = data.target == 0
    np.testing.assert_array_equal(X, data.data)  # one site keeps the original order
    np.testing.assert_array_equal(y, malignant.astype(np.int8))
    assert fed.feature_names == tuple(data.feature_names)


def test_breast_cancer_loads_without_importing_scikit_learn():
    import subprocess
    import sys

    code = ("import sys; from medfed.data.datasets import load_dataset; fed = load_dataset('breast-cancer'); "
            "print(sum(s.n for s in fed.sites), sorted(m for m in sys.modules if m.split('.')[0] == 'sklearn')[:3])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["569", "[]"]


def test_breast_cancer_deterministic_per_seed():
    a = load_breast_cancer_federation(n_sites=4, alpha=0.3, seed=5)
    b = load_breast_cancer_federation(n_sites=4, alpha=0.3, seed=5)
    c = load_breast_cancer_federation(n_sites=4, alpha=0.3, seed=6)
    assert all(np.array_equal(s.X, t.X) for s, t in zip(a.sites, b.sites))
    assert [s.n for s in a.sites] != [s.n for s in c.sites]


def test_breast_cancer_iid_is_balanced():
    fed = load_breast_cancer_federation(n_sites=5, partition="iid", seed=1)
    assert {s.n for s in fed.sites} <= {113, 114}
    assert {int(s.y.sum()) for s in fed.sites} <= {42, 43}
    assert fed.info["alpha"] is None


@pytest.mark.parametrize(
    "kw, word",
    [
        (dict(partition="random"), "iid"),
        (dict(n_sites=0), "n_sites"),
        (dict(n_sites=100), "n_sites"),
        (dict(alpha=-1), "alpha"),
    ],
)
def test_breast_cancer_bad_options(kw, word):
    with pytest.raises(ConfigError, match=word):
        load_breast_cancer_federation(**kw)


def test_breast_cancer_quantity_skew_keeps_the_class_mix_and_varies_sizes():
    from medfed.data.datasets import load_dataset

    fed = load_dataset("breast-cancer", n_sites=5, partition="quantity", alpha=0.5)
    sizes = [s.n for s in fed.sites]
    assert sum(sizes) == 569 and min(sizes) >= 10 and max(sizes) > 3 * min(sizes)
    rates = [s.y.mean() for s in fed.sites if s.n >= 50]
    assert max(rates) - min(rates) < 0.05  # stratified: 212/569 = 0.373 malignant everywhere
    assert fed.info["partition"] == "quantity"
