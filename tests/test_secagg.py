"""Secure aggregation (medfed.comm.secagg): exact sums, uniform wires, dropouts, overflow, what the server sees."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

pytest.importorskip("cryptography", minversion="42")
pytest.importorskip("Crypto", minversion="3.20")  # pycryptodome, for Shamir shares

from medfed.comm import secagg as sa
from medfed.comm import wire
from medfed.errors import ConfigError, DataError
from medfed.rng import KeyedRng, name_key


def sites(k: int) -> list[str]:
    return [f"hospital-{i:02d}" for i in range(k)]


def inputs(names, length, radius=1.0, seed=0):
    rng = np.random.default_rng(seed)
    return {s: rng.uniform(-radius, radius, length) for s in names}


def seeded(seed):
    """A reproducible random source per site (tests only; a deployment uses os.urandom)."""
    return lambda site: KeyedRng(seed, (name_key(site),)).generator.bytes


def exact_sum(vectors) -> np.ndarray:
    return np.array([float(sum(Fraction(float(v[i])) for v in vectors)) for i in range(len(vectors[0]))])


def run(xs, *, radius=1.0, drop=(), late=(), degree=None, threshold=None, seed=7):
    params = sa.secagg_params(xs, clip_range=radius, length=len(next(iter(xs.values()))), graph_seed=3,
                              degree=degree, threshold=threshold)
    t = sa.simulate_transcript(params, xs, drop_after_masking=drop, drop_before_unmask=late, randbytes=seeded(seed))
    return params, t


@pytest.mark.parametrize("k", [3, 10, 30])
def test_sum_equals_plain_sum_to_fixed_point_resolution(k):
    xs = inputs(sites(k), 64, seed=k)
    params, t = run(xs)
    truth = exact_sum(list(xs.values()))
    # the ring sum is exactly the sum of the encodings; decoding loses at most K/(2·scale) and float rounding
    assert np.array_equal(t.result.ring_total, sum(sa.encode_fixed(x, params) for x in xs.values()))
    err = np.abs(t.result.total - truth)
    assert np.all(err <= sa.resolution(params) + np.abs(truth) * 2.0**-52)
    assert t.result.sites == tuple(sorted(xs))
    # the public entry point gives the same sum whatever the order of the sites
    reordered = dict(reversed(list(xs.items())))
    assert np.array_equal(sa.simulate_round(reordered, seed=3, clip_range=1.0), t.result.total)


def test_resolution_is_the_documented_bound():
    params = sa.secagg_params(sites(100), clip_range=1.0, length=1, graph_seed=0)
    assert params.scale == 2.0**55  # 100 · 2^55 ≤ 2^62 < 100 · 2^56
    assert sa.resolution(params) == 100 / 2.0**56
    # a value between two grid points decodes to the nearest one
    xs = {s: np.array([0.0]) for s in params.sites}
    xs[params.sites[0]] = np.array([0.7 / params.scale])
    t = sa.simulate_transcript(params, xs, randbytes=seeded(0))
    assert t.result.total[0] == 1.0 / params.scale


def high_byte_pvalue(words: np.ndarray) -> float:
    counts = np.bincount((words >> np.uint64(56)).astype(np.int64), minlength=256)
    return stats.chisquare(counts).pvalue


def test_masked_wire_is_indistinguishable_from_uniform():
    xs = inputs(sites(10), 25_600, seed=1)
    params, t = run(xs)
    masked = [m for m in t.server_received if isinstance(m, sa.MaskedInput)]
    assert len(masked) == 10
    for m in masked:
        assert high_byte_pvalue(m.masked) > 1e-6
        assert stats.kstest(m.masked.astype(np.float64) / 2.0**64, "uniform").pvalue > 1e-6
    # the same tests do tell the bare encoding from uniform
    bare = sa.encode_fixed(xs[masked[0].site], params)
    assert high_byte_pvalue(bare) < 1e-6
    assert stats.kstest(bare.astype(np.float64) / 2.0**64, "uniform").pvalue < 1e-6


def test_dropouts_up_to_the_tolerance_are_recovered_exactly():
    xs = inputs(sites(10), 32, seed=2)  # degree 8, threshold 5: up to 3 dropouts per neighbourhood
    for drop, late in [(("hospital-01", "hospital-04", "hospital-08"), ()), (("hospital-02",), ("hospital-05", "hospital-09"))]:
        params, t = run(xs, drop=drop, late=late)
        assert (params.degree, params.threshold) == (8, 5)
        kept = [x for s, x in xs.items() if s not in drop]
        assert np.array_equal(t.result.ring_total, sum(sa.encode_fixed(x, params) for x in kept))
        assert np.all(np.abs(t.result.total - exact_sum(kept)) <= sa.resolution(params) + 1e-15)
        assert set(t.result.sites) == set(xs) - set(drop)


def test_secagg_plus_tolerates_dropouts_per_neighbourhood_not_in_total():
    xs = inputs(sites(30), 8, seed=3)
    params = sa.secagg_params(xs, clip_range=1.0, length=8, graph_seed=3, degree=6, threshold=4)
    graph = sa.neighbours(params)
    assert all(len(graph[s]) == 6 and all(s in graph[j] for j in graph[s]) for s in graph)  # 6-regular, symmetric
    # drop greedily while every neighbourhood keeps at least t = 4 of its 6
    drop: list[str] = []
    for s in params.sites:
        if all(sum(n in drop + [s] for n in graph[o]) <= 2 for o in params.sites):
            drop.append(s)
    assert len(drop) > 2  # more than the per-neighbourhood tolerance, in total
    t = sa.simulate_transcript(params, xs, drop_after_masking=drop, randbytes=seeded(1))
    kept = [x for s, x in xs.items() if s not in drop]
    assert np.array_equal(t.result.ring_total, sum(sa.encode_fixed(x, params) for x in kept))


def test_too_many_dropouts_name_the_sites_that_cannot_be_unmasked():
    xs = inputs(sites(10), 4, seed=4)
    params = sa.secagg_params(xs, clip_range=1.0, length=4, graph_seed=3)
    graph = sa.neighbours(params)
    drop = ["hospital-00", "hospital-03", "hospital-06", "hospital-07"]
    short = sorted(s for s in params.sites if s not in drop and sum(n not in drop for n in graph[s]) < 5)
    assert short  # someone keeps only 4 of 8 neighbours
    with pytest.raises(sa.SecAggError, match="fewer than t=5") as err:
        sa.simulate_transcript(params, xs, drop_after_masking=drop)
    for s in short:
        assert f"{s} (4 seed shares)" in str(err.value)


@pytest.mark.parametrize(("k", "radius"), [(2, 1.0), (7, 3.7), (30, 1e-3), (100, 1e6)])
def test_no_overflow_at_the_edge_of_the_range(k, radius):
    names = sites(k)
    params = sa.secagg_params(names, clip_range=radius, length=3, graph_seed=0)
    assert k * radius * params.scale <= 2.0**62 < k * radius * 2 * params.scale
    edge = np.array([radius, -radius, radius])
    xs = {s: (edge if i % 2 else -edge) if i else edge for i, s in enumerate(names)}
    xs_all_up = {s: np.full(3, radius) for s in names}
    for case in (xs, xs_all_up, {s: -v for s, v in xs_all_up.items()}):
        t = sa.simulate_transcript(params, case, randbytes=seeded(k))
        truth = exact_sum(list(case.values()))
        assert np.all(np.abs(t.result.total - truth) <= sa.resolution(params) + np.abs(truth) * 2.0**-52)


def test_inputs_outside_the_range_are_refused_naming_the_site():
    params = sa.secagg_params(sites(3), clip_range=1.0, length=3, graph_seed=0)
    with pytest.raises(DataError, match=r"'hospital-01' entry 2 is 1\.5.*\[-1\.0, 1\.0\]"):
        sa.encode_fixed(np.array([0.0, 1.0, 1.5]), params, "hospital-01")
    with pytest.raises(DataError, match="entry 0 is nan"):
        sa.encode_fixed(np.array([np.nan, 0.0, 0.0]), params, "hospital-01")
    with pytest.raises(DataError, match=r"shape \(3,\)"):
        sa.encode_fixed(np.zeros(4), params, "hospital-01")


def test_server_never_sees_an_unmasked_encoding():
    xs = inputs(sites(10), 512, seed=5)
    params, t = run(xs, drop=("hospital-03",))
    encodings = {s: sa.encode_fixed(x, params).tobytes() for s, x in xs.items()}
    kinds = {type(m) for m in t.server_received}
    assert kinds == {sa.Advert, sa.SealedShares, sa.MaskedInput, sa.UnmaskResponse}
    for m in t.server_received:
        data = wire.encode(m)  # messages travel as wire bytes and come back equal
        back = wire.decode(data)
        for enc in encodings.values():
            assert enc[:64] not in data  # not even its first 8 entries
        if isinstance(m, sa.MaskedInput):
            assert np.array_equal(back.masked, m.masked) and (back.site, back.partners) == (m.site, m.partners)
            assert np.mean(m.masked == sa.encode_fixed(xs[m.site], params)) < 0.01
        else:
            assert back == m


def test_shares_open_only_for_their_addressee():
    names = sites(5)
    params = sa.secagg_params(names, clip_range=1.0, length=2, graph_seed=0)
    parties = {s: sa.advertise(params, s) for s in names}
    adverts = {s: a for s, (_, a) in parties.items()}
    boxes = sa.share(params, parties[names[0]][0], adverts)
    box = boxes[0]
    seed_share, key_share = sa.open_shares(params, parties[box.addressee][0], adverts, box)
    assert seed_share.owner == key_share.owner == names[0]
    stranger = next(s for s in names if s not in (box.sender, box.addressee))
    with pytest.raises(sa.SecAggError, match="cannot open"):
        sa.open_shares(params, parties[stranger][0], adverts, box)
    tampered = sa.SealedShares(box.sender, box.addressee, box.ciphertext[:-2] + ("00" if box.ciphertext[-2:] != "00" else "01"))
    with pytest.raises(sa.SecAggError, match="cannot open"):
        sa.open_shares(params, parties[box.addressee][0], adverts, tampered)
    # t shares of the owner's secrets give them back; the shares alone reveal neither to the server
    holders = [sa.open_shares(params, parties[b.addressee][0], adverts, b) for b in boxes]
    assert sa._combine([h[0] for h in holders[: params.threshold]]).hex() == parties[names[0]][0].self_seed
    assert sa._combine([h[1] for h in holders[: params.threshold]]).hex() == parties[names[0]][0].mask_private


def test_seeded_wires_are_reproducible_and_the_graph_is_public():
    xs = inputs(sites(12), 16, seed=6)
    _, a = run(xs, seed=11)
    _, b = run(dict(reversed(list(xs.items()))), seed=11)
    wires_a = {m.site: m.masked for m in a.server_received if isinstance(m, sa.MaskedInput)}
    wires_b = {m.site: m.masked for m in b.server_received if isinstance(m, sa.MaskedInput)}
    assert all(np.array_equal(wires_a[s], wires_b[s]) for s in wires_a)
    p = sa.secagg_params(xs, clip_range=1.0, length=16, graph_seed=3)
    assert sa.neighbours(p) == sa.neighbours(sa.secagg_params(list(reversed(list(xs))), clip_range=1.0, length=16, graph_seed=3))
    assert sa.neighbours(p) != sa.neighbours(sa.secagg_params(xs, clip_range=1.0, length=16, graph_seed=4))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": 4}, r"threshold must be in 5\.\.8"),
        ({"degree": 5}, "degree 5 is odd"),
        ({"degree": 10}, r"degree must be in 1\.\.9"),
        ({"clip_range": 0.0}, "clip_range must be a positive finite number"),
        ({"clip_range": float("inf")}, "clip_range must be a positive finite number"),
        ({"clip_range": 2.0**60}, "too large for 10 sites"),
        ({"length": 0}, "length must be at least 1"),
    ],
)
def test_bad_parameters_are_refused_before_the_round(kwargs, message):
    args = {"clip_range": 1.0, "length": 4, "graph_seed": 0, **kwargs}
    with pytest.raises(ConfigError, match=message):
        sa.secagg_params(sites(10), **args)


def test_cohort_of_one_is_refused():
    with pytest.raises(ConfigError, match="at least 2 sites"):
        sa.secagg_params(["solo"], clip_range=1.0, length=1, graph_seed=0)


def test_default_degree_grows_as_log_k():
    assert [sa.default_degree(k) for k in (3, 10, 50, 100, 1000)] == [2, 8, 12, 14, 20]
    assert math.isclose(sa.default_degree(1000) / math.log2(1000), 2, rel_tol=0.01)


# --------------------------------------------------------------------------- quantized in a narrower ring


def quantized(xs, bits, wide=(), seed=7, dither_seed=0, drop=()):
    params = sa.secagg_params(xs, clip_range=1.0, length=len(next(iter(xs.values()))), graph_seed=3, bits=bits,
                              wide=wide)
    def dither(site):
        return KeyedRng(dither_seed, (name_key(site),)).generator

    t = sa.simulate_transcript(params, xs, drop_after_masking=drop, randbytes=seeded(seed), dither=dither)
    return params, t, dither


def test_the_ring_is_the_narrowest_that_holds_the_sum_of_the_codes():
    assert [sa.ring_width(8, k) for k in (2, 100, 256, 257, 2**24, 2**24 + 1)] == [16, 16, 16, 32, 32, 64]
    assert [sa.ring_width(4, k) for k in (2, 4096, 4097)] == [16, 16, 32]
    with pytest.raises(ConfigError, match="need a 65-bit ring"):
        sa.ring_width(16, 2**49 + 1)
    params = sa.secagg_params(sites(10), clip_range=1.0, length=4, graph_seed=0, bits=8)
    assert (params.ring_bits, params.dtype, params.levels) == (16, np.dtype(np.uint16), 255)
    assert sa.secagg_params(sites(10), clip_range=1.0, length=4, graph_seed=0).ring_bits == 64  # fixed point


@pytest.mark.parametrize(("k", "bits"), [(4, 14), (5, 13), (9, 12)])  # K (2^b - 1) just below 2^16
def test_quantized_sums_cannot_overflow_at_the_edge_of_the_range(k, bits):
    names = sites(k)
    assert sa.ring_width(bits, k) == 16 and sa.ring_width(bits + 1, k) == 32 and k * (2**bits - 1) < 2**16
    up = {s: np.ones(3) for s in names}
    for case, want in ((up, k), ({s: -v for s, v in up.items()}, -k)):
        _, t, _ = quantized(case, bits, wide=(1,))
        assert t.result.ring_total.dtype == np.uint16
        assert np.array_equal(t.result.ring_total[:3], np.full(3, k * (2**bits - 1) if want > 0 else 0))
        np.testing.assert_allclose(t.result.total, want, rtol=0, atol=1e-12)


def test_quantized_decode_is_unbiased_with_the_documented_variance():
    """Each entry group holds the same inputs, so its decoded sums are independent draws: their mean is
    the true sum within its standard error, their variance the stochastic rounding's, below K Δ^2 / 4."""
    k, groups, per = 5, 4, 5000
    rng = np.random.default_rng(0)
    values = {s: rng.uniform(-1, 1, groups) for s in sites(k)}
    xs = {s: np.repeat(v, per) for s, v in values.items()}
    wide = (0, per)  # one wide entry in each of the first two groups
    for bits in (8, 4):
        params, t, dither = quantized(xs, bits, wide=wide)
        step = sa.step(params)
        assert np.array_equal(t.result.ring_total, sum(sa.quantize(x, params, dither(s)) for s, x in xs.items()))
        truth = sum(values.values())
        for g in range(groups):
            draws = np.delete(t.result.total[g * per:(g + 1) * per], [w - g * per for w in wide if g * per <= w < (g + 1) * per])
            se = draws.std(ddof=1) / math.sqrt(draws.size)
            assert abs(draws.mean() - truth[g]) < 4 * se + 1e-12
            p = [((v[g] + 1) / step) % 1.0 for v in values.values()]  # each site's chance to round up
            exact = sum(q * (1 - q) for q in p) * step**2
            assert draws.var(ddof=1) == pytest.approx(exact, rel=6 / math.sqrt(per))
            assert exact <= sa.quantization_variance(params) == k * step**2 / 4
        for w in wide:  # a wide entry is exact to 2^-48 of its range per site
            assert abs(t.result.total[w] - truth[w // per]) <= k * 2.0 / 2**48 + 1e-14
        assert np.all(np.abs(t.result.total - np.repeat(truth, per)) < sa.resolution(params))


def test_quantized_masked_wire_is_uniform_in_its_ring_and_costs_r_over_8_bytes():
    xs = inputs(sites(10), 25_600, seed=1)
    params, t, dither = quantized(xs, 8, drop=("hospital-04",))
    masked = [m for m in t.server_received if isinstance(m, sa.MaskedInput)]
    assert len(masked) == 9 and params.ring_bits == 16
    for m in masked:
        assert m.masked.dtype == np.uint16 and m.masked.shape == (25_600,)
        for byte in (m.masked >> 8, m.masked & 0xFF):
            assert stats.chisquare(np.bincount(byte.astype(np.int64), minlength=256)).pvalue > 1e-6
        assert stats.kstest(m.masked / 2.0**16, "uniform").pvalue > 1e-6
        assert len(wire.encode(m)) - len(wire.encode(sa.MaskedInput(m.site, m.masked.astype(np.uint64), m.partners))) \
            == -6 * 25_600  # 2 bytes an entry instead of 8
    bare = sa.quantize(xs[masked[0].site], params, dither(masked[0].site))  # the same tests tell the codes apart
    assert stats.chisquare(np.bincount((bare >> 8).astype(np.int64), minlength=256)).pvalue < 1e-6
    assert stats.kstest(bare / 2.0**16, "uniform").pvalue < 1e-6
    kept = [x for s, x in xs.items() if s != "hospital-04"]  # a dropped site's pairwise masks come off
    assert np.all(np.abs(t.result.total - sum(kept)) < sa.resolution(params))


def test_quantized_rounds_are_reproducible_from_the_sites_keyed_dither():
    xs = inputs(sites(6), 32, seed=8)
    _, a, _ = quantized(xs, 8, wide=(3,), seed=1)
    _, b, _ = quantized(dict(reversed(list(xs.items()))), 8, wide=(3,), seed=2)  # other masks, other order
    _, c, _ = quantized(xs, 8, wide=(3,), dither_seed=1)
    assert np.array_equal(a.result.total, b.result.total) and not np.array_equal(a.result.total, c.result.total)
    assert np.array_equal(sa.simulate_round(xs, seed=3, clip_range=1.0, bits=4),
                          sa.simulate_round(xs, seed=3, clip_range=1.0, bits=4))


def test_bad_quantization_parameters_are_refused():
    with pytest.raises(ConfigError, match=r"bits must be in 0\.\.16"):
        sa.secagg_params(sites(3), clip_range=1.0, length=2, graph_seed=0, bits=17)
    with pytest.raises(ConfigError, match=r"wide entries \[2\] need bits > 0"):
        sa.secagg_params(sites(3), clip_range=1.0, length=2, graph_seed=0, bits=8, wide=(2,))
    params = sa.secagg_params(sites(3), clip_range=1.0, length=2, graph_seed=0, bits=8)
    parties = {s: sa.advertise(params, s) for s in params.sites}
    with pytest.raises(ConfigError, match="needs its random generator"):
        sa.mask(params, parties["hospital-00"][0], {s: a for s, (_, a) in parties.items()}, [], np.zeros(2))
    with pytest.raises(DataError, match="entry 1 is 2.0"):
        sa.quantize(np.array([0.0, 2.0]), params, np.random.default_rng(0), "hospital-00")
