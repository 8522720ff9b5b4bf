"""The partitioner library: every partition disjoint and complete; skew where asked; feature shift."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medfed.data.partition import (
    dirichlet_label_partition,
    feature_shift,
    iid_partition,
    natural_partition,
    quantity_skew_partition,
    site_intensity_transforms,
)
from medfed.errors import ConfigError


def assert_disjoint_cover(parts, n):
    joined = np.concatenate(list(parts))
    assert joined.size == n and np.array_equal(np.sort(joined), np.arange(n))
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)  # ascending, no repeats


# --------------------------------------------------------------------------- every partitioner


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(60, 400),
    n_sites=st.integers(1, 6),
    seed=st.integers(0, 2**31),
    pos=st.floats(0.1, 0.9),
    alpha=st.floats(0.05, 50.0),
)
def test_partitions_are_disjoint_and_cover_every_row(n, n_sites, seed, pos, alpha):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < pos).astype(int)
    assert_disjoint_cover(iid_partition(y, n_sites, seed), n)
    assert_disjoint_cover(quantity_skew_partition(n, n_sites, seed, alpha=alpha, min_size=5), n)
    assert_disjoint_cover(quantity_skew_partition(y, n_sites, seed, power=alpha, min_size=5), n)
    try:
        parts = dirichlet_label_partition(y, n_sites, alpha, seed, min_size=5, max_tries=50)
    except ConfigError:
        pass  # a strong skew may be impossible with a minimum; that is reported, not relaxed
    else:
        assert_disjoint_cover(parts, n)
    sites = rng.choice(np.array(["b", "a", "c"])[: max(1, min(n_sites, 3))], n)
    assert_disjoint_cover(natural_partition(sites).values(), n)


# --------------------------------------------------------------------------- natural


def test_natural_partition_by_site_in_order_of_appearance():
    parts = natural_partition(["Oslo", "Lyon", "Oslo", 7, "Lyon", 7])
    assert list(parts) == ["Oslo", "Lyon", "7"]
    assert [p.tolist() for p in parts.values()] == [[0, 2], [1, 4], [3, 5]]


@pytest.mark.parametrize("missing", [None, float("nan"), "  "])
def test_natural_partition_refuses_rows_without_site(missing):
    with pytest.raises(ConfigError, match=r"site_values\[1\]"):
        natural_partition(["a", missing, "b"])


def test_natural_partition_bad_shapes():
    with pytest.raises(ConfigError, match="site_values"):
        natural_partition([])
    with pytest.raises(ConfigError, match="site_values"):
        natural_partition([["a", "b"]])


# --------------------------------------------------------------------------- quantity skew


def sizes_of(parts):
    return np.array([p.size for p in parts])


def test_quantity_skew_large_alpha_near_equal_small_alpha_unequal():
    n, k = 1000, 5
    for seed in range(5):
        equal = sizes_of(quantity_skew_partition(n, k, seed, alpha=1e4))
        assert equal.max() - equal.min() <= 0.05 * n / k
    skewed = [sizes_of(quantity_skew_partition(n, k, seed, alpha=0.1)) for seed in range(5)]
    assert min(s.max() / s.min() for s in skewed) > 3


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(50, 500),
    n_sites=st.integers(1, 8),
    min_size=st.integers(1, 6),
    seed=st.integers(0, 2**31),
    alpha=st.floats(0.01, 5.0),
)
def test_quantity_skew_minimum_size_respected(n, n_sites, min_size, seed, alpha):
    for how in ({"alpha": alpha}, {"power": alpha}):
        sizes = sizes_of(quantity_skew_partition(n, n_sites, seed, min_size=min_size, **how))
        assert sizes.min() >= min_size and sizes.sum() == n


def test_quantity_skew_power_law_ranks():
    sizes = np.sort(sizes_of(quantity_skew_partition(1000, 4, 0, power=1.0, min_size=1)))[::-1]
    share = (np.arange(1, 5) ** -1.0) / (np.arange(1, 5) ** -1.0).sum()
    np.testing.assert_allclose(sizes, 1 + share * 996, atol=1)  # min_size each, shares of the rest
    assert np.ptp(sizes_of(quantity_skew_partition(1000, 4, 0, power=0.0))) <= 1


def test_quantity_skew_keeps_the_label_mix():
    y = np.r_[np.ones(300), np.zeros(700)].astype(int)
    parts = quantity_skew_partition(y, 4, 3, alpha=0.3)
    for p in parts:
        assert abs(y[p].mean() - 0.3) <= 1.5 / p.size + 1e-9


def test_quantity_skew_explicit_sizes_and_shares():
    parts = quantity_skew_partition(100, 3, 0, sizes=[50, 30, 20])
    assert sizes_of(parts).tolist() == [50, 30, 20]
    assert sizes_of(quantity_skew_partition(101, 3, 0, sizes=[0.5, 0.3, 0.2])).sum() == 101


def test_quantity_skew_deterministic_and_seeded():
    a = quantity_skew_partition(200, 4, 11, alpha=0.5)
    b = quantity_skew_partition(200, 4, np.random.default_rng(11), alpha=0.5)
    c = quantity_skew_partition(200, 4, 12, alpha=0.5)
    assert all(np.array_equal(x, z) for x, z in zip(a, b))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c))


@pytest.mark.parametrize(
    "args, name",
    [
        ({}, "exactly one of alpha"),
        ({"alpha": 1.0, "power": 1.0}, "alpha, power"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": float("inf")}, "alpha"),
        ({"power": -1.0}, "power"),
        ({"alpha": 1.0, "min_size": 0}, "min_size"),
        ({"alpha": 1.0, "min_size": 40}, "min_size"),
        ({"sizes": [50, 50]}, "sizes"),
        ({"sizes": [60, 30, 20]}, "sizes"),
        ({"sizes": [95, 3, 2]}, "min_size"),
        ({"sizes": ["a", "b", "c"]}, "sizes"),
    ],
)
def test_quantity_skew_bad_parameters_named(args, name):
    with pytest.raises(ConfigError, match=name):
        quantity_skew_partition(100, 3, 0, **args)


def test_quantity_skew_bad_sites_and_seed():
    with pytest.raises(ConfigError, match="n_sites"):
        quantity_skew_partition(100, 0, 0, alpha=1.0)
    with pytest.raises(ConfigError, match="seed"):
        quantity_skew_partition(100, 3, 0.5, alpha=1.0)


# --------------------------------------------------------------------------- feature shift


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    X = rng.random((6, 1, 12, 12)).astype(np.float32)
    X[:, :, 3:9, 3:9] += 2.0  # a bright object on a dark background
    return X


def test_feature_shift_defaults_are_identity(images):
    out = feature_shift(images)
    assert out is not images and out.dtype == np.float32
    np.testing.assert_array_equal(out, images)


def test_feature_shift_each_transform(images):
    lo = images.min(axis=(2, 3), keepdims=True)
    hi = images.max(axis=(2, 3), keepdims=True)
    g = feature_shift(images, gamma=2.0)
    # gamma keeps each image's range and order, darkens the middle
    np.testing.assert_allclose(g.min(axis=(2, 3), keepdims=True), lo, rtol=1e-6)
    np.testing.assert_allclose(g.max(axis=(2, 3), keepdims=True), hi, rtol=1e-6)
    for before, after in zip(images.reshape(6, -1), g.reshape(6, -1)):
        assert (np.diff(after[np.argsort(before)]) >= 0).all()
    assert (g <= images + 1e-6).all() and (g < images - 1e-3).any()
    np.testing.assert_allclose(feature_shift(images, scale=1.5, offset=0.1), images * 1.5 + 0.1 * (hi - lo), rtol=1e-5)
    blurred = feature_shift(images, blur=1.0)
    assert np.abs(np.diff(blurred, axis=3)).mean() < 0.7 * np.abs(np.diff(images, axis=3)).mean()
    np.testing.assert_allclose(blurred.mean(), images.mean(), rtol=0.02)
    noisy = feature_shift(images, noise=0.1, seed=0)
    np.testing.assert_allclose((noisy - images).std(), 0.1 * (hi - lo).mean(), rtol=0.1)
    volumes = feature_shift(images[:, :, None].repeat(4, axis=2), blur=1.0)
    assert volumes.shape == (6, 1, 4, 12, 12)


def test_site_transforms_deterministic_and_differ_across_sites(images):
    params = site_intensity_transforms(4, seed=5)
    assert params == site_intensity_transforms(4, seed=np.random.default_rng(5))
    assert params != site_intensity_transforms(4, seed=6)
    outs = [feature_shift(images, **p, seed=k) for k, p in enumerate(params)]
    again = [feature_shift(images, **p, seed=k) for k, p in enumerate(site_intensity_transforms(4, seed=5))]
    for a, b in zip(outs, again):
        np.testing.assert_array_equal(a, b)
    means = [float(o.mean()) for o in outs]
    assert len(set(np.round(means, 4))) == 4
    noise = [p["noise"] for p in params]
    assert noise == sorted(noise) and noise[0] > 0  # NIID-Bench's ladder of noise levels
    identity = site_intensity_transforms(3, seed=5, strength=0.0)
    assert all(p == {"gamma": 1.0, "scale": 1.0, "offset": 0.0, "blur": 0.0, "noise": 0.0} for p in identity)


@pytest.mark.parametrize(
    "args, name",
    [
        ({"gamma": 0.0}, "gamma"),
        ({"scale": -1.0}, "scale"),
        ({"offset": float("nan")}, "offset"),
        ({"blur": -0.5}, "blur"),
        ({"noise": -0.1}, "noise"),
        ({"noise": 0.1}, "seed"),
        ({"gamma": True}, "gamma"),
    ],
)
def test_feature_shift_bad_parameters_named(images, args, name):
    with pytest.raises(ConfigError, match=name):
        feature_shift(images, **args)


def test_feature_shift_refuses_tables_and_bad_strength():
    with pytest.raises(ConfigError, match="X must be float images"):
        feature_shift(np.zeros((5, 3)))
    with pytest.raises(ConfigError, match="X must be float images"):
        feature_shift(np.zeros((5, 1, 4, 4), dtype=np.int64))
    with pytest.raises(ConfigError, match="strength"):
        site_intensity_transforms(3, seed=0, strength=-1.0)
    with pytest.raises(ConfigError, match="n_sites"):
        site_intensity_transforms(0, seed=0)
