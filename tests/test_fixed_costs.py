"""Fixed costs a run pays (issue 13 §3): DOS, Krum and Fourier aggregate without importing
scipy.stats, scipy.spatial or scipy.fft (0.2-0.5 s each), with scipy's numbers: ranks and
distances bit for bit, the DCT to rounding."""

import subprocess
import sys

import numpy as np
import pytest
from scipy.fft import dctn, idctn
from scipy.spatial.distance import pdist, squareform
from scipy.stats import rankdata

import medfed.server.robust as robust
from medfed.client.fourier import spatial_dct
from medfed.server.robust import max_ranks, pairwise_distances, squared_distances


@pytest.mark.parametrize("shape", [(1, 3), (2, 1), (7, 4), (40, 9)])
def test_max_ranks_are_scipys_with_and_without_ties(shape):
    rng = np.random.default_rng(shape[0])
    for X in (rng.normal(size=shape), rng.integers(0, 3, size=shape).astype(float), -np.zeros(shape)):
        want = rankdata(X, method="max", axis=0)
        got = max_ranks(X)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("K,P", [(1, 4), (2, 5), (3, 37), (12, 1000), (9, 60_000)])
def test_distances_are_pdists_to_the_bit_on_both_paths(K, P, monkeypatch):
    X = np.random.default_rng(P).normal(size=(K, P)) * np.geomspace(0.01, 100, P)
    want = squareform(pdist(X, "sqeuclidean")) if K > 1 else np.zeros((1, 1))
    for threshold in (10**12, 0):  # numpy's loop, then scipy's pdist above the size switch
        monkeypatch.setattr(robust, "_PDIST_FROM", threshold)
        np.testing.assert_array_equal(squared_distances(X), want)
        np.testing.assert_array_equal(pairwise_distances(X, "euclidean"), np.sqrt(want))


@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (2, 2, 5, 5, 5), (8, 16, 7, 1)])
def test_the_spatial_dct_is_scipys_orthonormal_dctn_to_rounding(shape):
    x = np.random.default_rng(1).normal(size=shape)
    axes = tuple(range(2, len(shape)))
    spectrum = dctn(x, axes=axes, norm="ortho")
    np.testing.assert_allclose(spatial_dct(x), spectrum, rtol=0, atol=1e-14)
    np.testing.assert_allclose(spatial_dct(spectrum, inverse=True), idctn(spectrum, axes=axes, norm="ortho"),
                               rtol=0, atol=1e-14)


def test_dos_krum_and_fourier_aggregate_without_scipys_slow_modules():
    code = """
import sys
import numpy as np
from medfed.server.aggregate import StackedUploads
from medfed.server.fourier import fourier
from medfed.server.robust import dos, krum
rng = np.random.default_rng(0)
flat = StackedUploads(tuple(f"s{i}" for i in range(6)), {"w": rng.normal(size=(6, 5))}, np.ones(6), "delta", {})
for step in (dos(), krum(f=1)):
    step.apply(flat, step.init({}), None, 0)
kernels = StackedUploads(("a", "b"), {"conv": rng.normal(size=(2, 4, 3, 3, 3))}, np.ones(2), "delta", {})
step = fourier(start=0.5, end=0.5)
step.apply(kernels, step.init({}), None, 0)
print(sorted(m for m in ("scipy.stats", "scipy.spatial", "scipy.fft") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
