"""``--dataset synthetic``: many small sites from a documented generative model (issue 13 §3)."""

import numpy as np
import pytest

from medfed.data.datasets import load_dataset
from medfed.errors import ConfigError


def test_ten_thousand_sites_load_and_a_site_does_not_depend_on_how_many_there_are():
    big = load_dataset("synthetic", n_sites=10_000)
    assert len(big.sites) == 10_000 and big.site_names[-1] == "site-10000"
    assert {s.X.shape for s in big.sites} == {(20, 10)}
    small = load_dataset("synthetic", n_sites=3)
    for a, b in zip(small.sites, big.sites):
        assert a.name == b.name and np.array_equal(a.X, b.X) and np.array_equal(a.y, b.y)
    other = load_dataset("synthetic", n_sites=3, seed=1)
    assert not np.array_equal(other.sites[0].X, small.sites[0].X)


def test_the_shifts_are_the_documented_ones():
    rows, d = 400, 4
    iid = load_dataset("synthetic", n_sites=200, rows=rows, features=d, shift=0.0, concept=0.0, label_skew=0.0)
    shifted = load_dataset("synthetic", n_sites=200, rows=rows, features=d, shift=2.0, concept=0.0, label_skew=0.0)
    # site centres: N(0, shift^2) per feature, seen through a mean of 400 N(0, 1) rows
    for fed, shift in ((iid, 0.0), (shifted, 2.0)):
        centres = np.array([s.X.mean(axis=0) for s in fed.sites])
        assert centres.var() == pytest.approx(shift**2 + 1 / rows, rel=0.15)
    # no label skew: every site's prevalence is 1/2 up to its binomial noise (sd 0.025 at 400 rows)
    prevalence = np.array([s.y.mean() for s in iid.sites])
    assert abs(prevalence.mean() - 0.5) < 0.01 and prevalence.std() < 0.04
    skewed = load_dataset("synthetic", n_sites=200, rows=rows, features=d, label_skew=2.0)
    assert np.array([s.y.mean() for s in skewed.sites]).std() > 0.2
    # the label follows the centred features: the rows' centred x·beta separates the classes
    X = np.concatenate([s.X - s.X.mean(axis=0) for s in shifted.sites])
    y = np.concatenate([s.y for s in shifted.sites])
    beta = np.linalg.lstsq(X, y - y.mean(), rcond=None)[0]
    assert np.corrcoef(X @ beta, y)[0, 1] > 0.25  # a clear signal at d = 4; uninformative features give ~0


@pytest.mark.parametrize("option,value,words", [("n_sites", 0, "n_sites"), ("rows", 5, "rows"),
                                                ("shift", -1.0, "shift"), ("features", 1.5, "features")])
def test_bad_options_are_one_clear_error(option, value, words):
    with pytest.raises(ConfigError, match=f"dataset 'synthetic': option '{words}'"):
        load_dataset("synthetic", **{option: value})
