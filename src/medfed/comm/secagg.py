"""Secure aggregation that survives dropouts: SecAgg (Bonawitz et al., 2017) on SecAgg+'s
neighbour graph (Bell et al., 2020).

The server learns the sum of the sites' vectors and nothing else: each site adds to its
fixed-point encoding a self mask ``PRG(b_i)`` and, for each neighbour ``j``, a pairwise mask
``±PRG(s_ij)`` that ``j`` adds with the opposite sign, so every wire the server receives is
uniform in ``Z_{2^64}``; Shamir shares of ``b_i`` and of the mask key, held by the neighbours,
let the server remove the masks of sites that dropped after masking. SecAgg+ changes one thing:
a site agrees keys with and shares among ``k = O(log K)`` neighbours, not all ``K - 1`` others,
so a round costs ``K·k`` key agreements and mask expansions instead of ``K²``.

**A round** is four message exchanges, each a pure function below (site side / server side)::

    1 advertise   site:  advertise(params, site)            -> (SiteSecrets, Advert)
    2 share       site:  share(params, secrets, adverts)    -> tuple[SealedShares, ...]
                  server: route_shares(params, sealed)      -> {addressee: [SealedShares, ...]}
    3 mask        site:  mask(params, secrets, adverts, sealed_to_me, x) -> (HeldShares, MaskedInput)
    4 unmask      server: unmask_request(params, masked)    -> UnmaskRequest (the sites whose input arrived)
                  site:  unmask(params, held, request)      -> UnmaskResponse
                  server: unmask_sum(params, adverts, masked, responses) -> UnmaskedSum

The server forwards to each site the :class:`Advert` of its neighbours and the
:class:`SealedShares` addressed to it. :func:`simulate_round` runs all parties in memory.

**Fixed-point ring.** A vector ``x`` with every entry in ``[-R, R]`` (``R`` = ``clip_range``)
is encoded as ``round(x · scale) mod 2^64``, with ``scale = 2^e`` the largest power of two with
``K · R · scale ≤ 2^62``. Then ``|Σ round(x_i · scale)| ≤ K·(R·scale + ½) < 2^63`` for any
``K`` sites, so the ring sum read as a signed 64-bit integer is the exact integer sum: overflow
is impossible by construction. A power-of-two scale makes ``x · scale`` exact in float64, so the
only loss is the rounding to integers: the decoded sum is within ``K / (2 · scale)`` of the
true sum (plus float64's own rounding of the result, a relative ``2^-53``). For ``K = 100`` and
``R = 1`` that is ``2^-50`` ≈ ``9e-16``. An entry outside ``[-R, R]`` (or not finite) is
refused, never clipped silently: clipping belongs to the channel's clip stage, which runs first.

**Quantized in a narrower ring** (``bits = b > 0``, ``--compress q8|q4``). Each entry is
rounded stochastically and without bias to one of the ``2^b`` points of ``[-R, R]`` that
``L = 2^b - 1`` steps of ``Δ = 2R/L`` apart: ``q = ⌊u⌋ + [v < u - ⌊u⌋]``, ``u = (x + R)/Δ``,
``v`` uniform from the site's keyed generator, so ``E[q Δ - R] = x`` and ``q ∈ [0, 2^b - 1]``.
The range is the public one the layout gives each entry (a per-tensor min/max would leak and
would not sum). ``K`` codes sum to at most ``K (2^b - 1) < 2^(b + ⌈log2 K⌉)``, so the round
masks in ``Z_2^r`` with ``r`` the smallest of 16, 32, 64 with ``r ≥ b + ⌈log2 K⌉``
(:func:`ring_width`): the unsigned ring sum is the exact integer sum, overflow impossible by
construction, and a masked entry costs ``r/8`` bytes instead of 8. The decoded sum of ``n``
arrived sites, ``S Δ - n R``, is unbiased with variance at most ``n Δ^2 / 4`` per entry
(:func:`quantization_variance`) and error below ``n Δ`` (:func:`resolution`). The ``wide``
entries (a round's few scalars: weights, the loss, whose range is too coarse for ``b`` bits)
are quantized to ``2^(b·d) - 1`` steps, ``d = ⌊48/b⌋`` (at most 48 bits: float64 holds
the grid exactly), and written as ``d`` base-``2^b``
digits: each digit is an ordinary ``b``-bit entry of the ring (the first in the entry's place,
the others appended), so they sum without carry and recombine exactly at the server.

**Neighbour graph.** The sites, sorted by name, are put on a ring in an order drawn from the
public ``graph_seed`` (:class:`medfed.rng.KeyedRng`, keyed by name, so every party builds the
same graph) and each is joined to the ``k/2`` nearest on each side: a random Harary graph,
exactly ``k``-regular, as Flower's SecAgg+ builds it. Bell et al. analyse an Erdős–Rényi graph;
we use the regular one so that every site has the same number of share holders and one
threshold ``t`` fits all. ``k ≥ K - 1`` is the complete graph (plain SecAgg).

**What it tolerates.** Each site's secrets are split ``t``-of-``n`` among its ``n ≤ k``
neighbours that advertised. The round completes while every site whose input arrived, and
every dropped site that a surviving site masked with, keeps at least ``t`` neighbours that
answer the unmask request: up to ``k - t`` dropouts in every neighbourhood (with the default
``t = ⌊k/2⌋ + 1``, just under half). More raises :class:`SecAggError` naming the sites.
``t > k/2`` is required: an honest site reveals for each neighbour either its self-mask seed
(it arrived) or its mask key (it dropped), never both, so a server that tells different
neighbours different stories still cannot gather ``t`` shares of both for one site.

**Crypto.** X25519 key agreement and HKDF-SHA256 (``cryptography``); shares sealed with
ChaCha20-Poly1305 under a key derived from the pair's share keys, the sender, the addressee
and the round (so each direction has its own key and a zero nonce is never reused); masks are
the ChaCha20 keystream under an HKDF-derived key, read as little-endian ``r``-bit words (each
uniform in ``Z_2^r``, as a 64-bit word reduced mod ``2^r`` would be, for a quarter of the stream). Shamir
sharing is pycryptodome's ``Crypto.Protocol.SecretSharing.Shamir``, which shares 16-byte
secrets over GF(2^128): a 32-byte secret (an X25519 private key, a self-mask seed) is split
as two 16-byte halves with the same holders and indices, and each holder gets both halves.

Secrets come from the operating system's CSPRNG (``os.urandom``): a secret drawn from a seed
the server could know would let it recompute the masks. The decoded sum does not depend on the
masks, so results stay deterministic; tests may pass ``randbytes`` for reproducible wires.

Every message is a dataclass registered with :func:`medfed.wiretypes.wire_type`, so it travels
as :mod:`medfed.comm.wire` bytes; byte strings travel as lowercase hex. :class:`SiteSecrets`
and :class:`HeldShares` are a site's private round state: they never leave it.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from medfed.errors import ConfigError, DataError
from medfed.rng import KeyedRng, name_key
from medfed.wiretypes import wire_type

RING_BITS = 64  # the fixed-point ring; a quantized round picks 16, 32 or 64 (ring_width)
RINGS = (16, 32, 64)
WIDE_BITS = 48  # a wide (scalar) entry of a quantized round: about this many bits (b-bit digits, exact in float64)
_SUM_BOUND = 2**62  # K·R·scale stays below this, so K rounded encodings stay below 2^63
_KEY = 32  # bytes of an X25519 key, a self-mask seed, a ChaCha20 key
_HALF = 16  # bytes Shamir (pycryptodome) shares at once
_PLAIN = 4 + 2 * 2 * _HALF  # a sealed share: holder index, then seed halves, then key halves
_ZERO_NONCE = bytes(12)  # every sealing key is used once (per sender, addressee, round)


class SecAggError(DataError):
    """A secure-aggregation round cannot complete (too few answers, a message that does not
    fit the round); one line naming the sites and what was needed."""


# --------------------------------------------------------------------------- public parameters


@wire_type
@dataclass(frozen=True)
class SecAggParams:
    """What every party of one round agrees on, all public.

    ``sites`` is the cohort (sorted names); ``length`` the number of entries summed;
    ``clip_range`` the ``R`` of every entry; ``graph_seed`` keys the neighbour graph; ``round``
    binds every key and sealed share to this round. ``bits``: 0 for the fixed-point encoding in
    ``Z_2^64``, else ``b``-bit stochastic quantization in the ring :func:`ring_width` picks;
    ``wide``: the entries a quantized round writes as ``⌊48/b⌋`` digits (sorted indices).
    """

    sites: tuple[str, ...]
    threshold: int
    degree: int
    graph_seed: int
    clip_range: float
    length: int
    round: int = 0
    bits: int = 0
    wide: tuple[int, ...] = ()

    @property
    def scale(self) -> float:
        return fixed_point_scale(self.clip_range, len(self.sites))

    @property
    def ring_bits(self) -> int:
        return RING_BITS if not self.bits else ring_width(self.bits, len(self.sites))

    @property
    def dtype(self) -> np.dtype:
        """The ring's entries: uint16, uint32 or uint64 (arithmetic wraps mod ``2^r``)."""
        return np.dtype(f"<u{self.ring_bits // 8}")

    @property
    def levels(self) -> int:
        """``L = 2^b - 1``: the steps of a quantized entry's grid over ``[-R, R]``."""
        return 2**self.bits - 1

    @property
    def digits(self) -> int:
        """How many ``b``-bit digits a wide entry takes (1 without quantization)."""
        return max(1, WIDE_BITS // self.bits) if self.bits else 1

    @property
    def ring_length(self) -> int:
        """Entries of the masked vector: one per input entry, plus a wide entry's further digits."""
        return self.length + (self.digits - 1) * len(self.wide)


def ring_width(bits: int, n_sites: int) -> int:
    """The narrowest ring (16, 32 or 64 bits) that holds the sum of ``n_sites`` ``bits``-bit codes:
    ``r ≥ bits + ⌈log2 K⌉`` (the codes are unsigned, no sign bit is needed)."""
    need = bits + math.ceil(math.log2(max(n_sites, 1)))
    for r in RINGS:
        if r >= need:
            return r
    raise ConfigError(f"secure aggregation: {n_sites} sites' {bits}-bit codes need a {need}-bit ring; at most 64")


def default_degree(n_sites: int) -> int:
    """SecAgg+'s ``k = O(log K)``: ``2·⌈log2 K⌉`` neighbours (even, for the ring lattice),
    or everyone when that is not fewer than ``K - 1``."""
    return min(n_sites - 1, 2 * math.ceil(math.log2(max(n_sites, 2))))


def secagg_params(
    sites: Collection[str],
    *,
    clip_range: float,
    length: int,
    graph_seed: int,
    degree: int | None = None,
    threshold: int | None = None,
    round: int = 0,
    bits: int = 0,
    wide: Collection[int] = (),
) -> SecAggParams:
    """Checked :class:`SecAggParams` (defaults: :func:`default_degree`, ``t = ⌊k/2⌋ + 1``).

    Raises :class:`ConfigError` naming the parameter for: fewer than 2 sites or repeated
    names, ``clip_range`` not a positive finite number, ``length < 1``, a degree that is not
    in ``1..K-1`` or is odd below ``K - 1``, a threshold outside ``⌊k/2⌋+1 .. k``, ``bits``
    outside ``0..16``, a wide entry outside the vector or without quantization.
    """
    names = tuple(sorted(str(s) for s in sites))
    if len(set(names)) != len(names):
        raise ConfigError(f"secure aggregation: site names repeat in the cohort {list(names)}")
    n = len(names)
    if n < 2:
        raise ConfigError(f"secure aggregation needs at least 2 sites; the cohort has {n} ({list(names)})")
    try:
        radius = float(clip_range)
    except (TypeError, ValueError):
        radius = math.nan
    if not (math.isfinite(radius) and radius > 0):
        raise ConfigError(f"secure aggregation: clip_range must be a positive finite number, not {clip_range!r}")
    if int(length) < 1:
        raise ConfigError(f"secure aggregation: length must be at least 1, not {length!r}")
    k = default_degree(n) if degree is None else int(degree)
    if not 1 <= k <= n - 1:
        raise ConfigError(f"secure aggregation: degree must be in 1..{n - 1} for {n} sites, not {k}")
    if k < n - 1 and k % 2:
        raise ConfigError(
            f"secure aggregation: degree {k} is odd; the neighbour ring needs an even degree below {n - 1} "
            f"(or {n - 1}, everyone)"
        )
    t = k // 2 + 1 if threshold is None else int(threshold)
    if not k // 2 + 1 <= t <= k:
        raise ConfigError(
            f"secure aggregation: threshold must be in {k // 2 + 1}..{k} for degree {k} (more than half the "
            f"neighbours, so no site's seed and key can both be revealed), not {t}"
        )
    if fixed_point_scale(radius, n) < 1.0:
        raise ConfigError(
            f"secure aggregation: clip_range {clip_range} is too large for {n} sites in a 64-bit ring "
            f"(K·R must stay below 2^62)"
        )
    if not 0 <= int(bits) <= 16:
        raise ConfigError(f"secure aggregation: bits must be in 0..16 (0: the 64-bit fixed point), not {bits!r}")
    wide = tuple(sorted({int(i) for i in wide}))
    if wide and (not bits or wide[0] < 0 or wide[-1] >= int(length)):
        raise ConfigError(f"secure aggregation: wide entries {list(wide)} need bits > 0 and indices in "
                          f"0..{int(length) - 1}")
    return SecAggParams(names, t, k, int(graph_seed), radius, int(length), int(round), int(bits), wide)


def neighbours(params: SecAggParams) -> dict[str, tuple[str, ...]]:
    """Each site's neighbours (sorted), from the public graph seed: a ring over a seeded
    permutation, each site joined to the ``k/2`` nearest on each side (everyone at ``k = K-1``)."""
    return dict(_graph(params.sites, params.degree, params.graph_seed, params.round))


@functools.lru_cache(maxsize=64)  # every step of every party asks for the same round's graph
def _graph(names: tuple[str, ...], k: int, graph_seed: int, round: int) -> tuple[tuple[str, tuple[str, ...]], ...]:
    n = len(names)
    if k >= n - 1:
        return tuple((s, tuple(o for o in names if o != s)) for s in names)
    order = KeyedRng(graph_seed, (name_key("secagg-graph"), round)).generator.permutation(n)
    ring = [names[i] for i in order]
    half = k // 2
    return tuple(
        (s, tuple(sorted(ring[(p + d) % n] for d in range(-half, half + 1) if d))) for p, s in enumerate(ring)
    )


# --------------------------------------------------------------------------- fixed point


def fixed_point_scale(clip_range: float, n_sites: int) -> float:
    """The largest power of two with ``n_sites · clip_range · scale ≤ 2^62``: the sum of
    ``n_sites`` encodings of entries in ``[-R, R]`` cannot wrap the signed 64-bit range."""
    return 2.0 ** math.floor(math.log2(_SUM_BOUND / (n_sites * clip_range)))


def resolution(params: SecAggParams) -> float:
    """The largest error of a decoded sum of ``K`` encodings, before float64 rounds the result:
    ``K / (2·scale)`` in fixed point; below ``K Δ`` quantized (each code is off by less than a step)."""
    if params.bits:
        return len(params.sites) * step(params)
    return len(params.sites) / (2.0 * params.scale)


def step(params: SecAggParams) -> float:
    """A quantized entry's grid step ``Δ = 2R / (2^b - 1)``."""
    return 2.0 * params.clip_range / params.levels


def quantization_variance(params: SecAggParams, n_sites: int | None = None) -> float:
    """The variance a quantized round adds to an entry of the decoded sum of ``n_sites`` (default
    ``K``), at most: ``n Δ^2 / 4`` (stochastic rounding to a grid of step ``Δ``: ``p (1-p) Δ^2``)."""
    n = len(params.sites) if n_sites is None else n_sites
    return n * step(params) ** 2 / 4.0 if params.bits else 0.0


def _checked(x: np.ndarray, params: SecAggParams, site: str) -> np.ndarray:
    """``x`` as float64 when it is a finite real vector of the round's length within ``[-R, R]``;
    else a DataError naming ``site`` and the first bad entry."""
    x = np.asarray(x)
    if x.shape != (params.length,) or x.dtype.kind not in "iuf":
        raise DataError(
            f"secure aggregation: site {site!r} gave a {x.dtype} array of shape {x.shape}; "
            f"a real vector of shape ({params.length},) is needed"
        )
    x = x.astype(np.float64, copy=False)
    bad = ~(np.abs(x) <= params.clip_range)  # NaN fails the comparison too
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"secure aggregation: site {site!r} entry {i} is {float(x[i])!r}, outside the clip range "
            f"[-{params.clip_range}, {params.clip_range}] ({int(bad.sum())} entries outside); clip before masking"
        )
    return x


def encode_fixed(x: np.ndarray, params: SecAggParams, site: str = "?") -> np.ndarray:
    """``round(x · scale) mod 2^64`` as uint64; refuses (DataError naming ``site``) a vector of
    the wrong shape, a non-finite entry or one outside ``[-R, R]``."""
    return np.rint(_checked(x, params, site) * params.scale).astype(np.int64).view(np.uint64)


def quantize(x: np.ndarray, params: SecAggParams, gen: np.random.Generator, site: str = "?") -> np.ndarray:
    """The ring vector of a quantized round (``params.bits > 0``): each entry's unbiased
    stochastic ``b``-bit code over ``[-R, R]``, a wide entry's ``⌊48/b⌋`` digits (the first in
    its place, the rest appended in order), as ``params.dtype``. ``gen``: the site's keyed
    generator, one uniform draw per entry. Refuses what :func:`encode_fixed` refuses."""
    x = _checked(x, params, site)
    levels = np.full(x.size, float(params.levels))
    wide = np.asarray(params.wide, dtype=np.int64)
    levels[wide] = 2.0 ** (params.bits * params.digits) - 1.0
    u = (x + params.clip_range) / (2.0 * params.clip_range) * levels  # in [0, L] per entry
    low = np.floor(u)
    q = np.minimum(low + (gen.random(x.size) < u - low), levels).astype(np.uint64)
    base = np.uint64(params.bits)
    digit = np.uint64(params.levels)  # the b low bits
    tail = [(q[wide] >> (base * np.uint64(j))) & digit for j in range(1, params.digits)]
    q[wide] &= digit
    # the wide digits appended digit-major: digit j of every wide entry, then digit j + 1
    return np.concatenate([q, *tail]).astype(params.dtype) if len(wide) else q.astype(params.dtype)


def decode_sum(total: np.ndarray, params: SecAggParams, n_sites: int | None = None) -> np.ndarray:
    """The float64 sum from a ring sum of the encodings of ``n_sites`` (default ``K``): read as
    signed 64-bit and divided by the scale in fixed point; quantized, ``S Δ - n R`` with a wide
    entry's digit sums recombined (each below ``2^r``, so no digit carried into the next)."""
    if not params.bits:
        return total.view(np.int64).astype(np.float64) / params.scale
    n = len(params.sites) if n_sites is None else n_sites
    codes = total[: params.length].astype(np.float64)
    steps = np.full(params.length, step(params))
    if params.wide:
        wide = np.asarray(params.wide, dtype=np.int64)
        tail = total[params.length:].astype(np.float64).reshape(params.digits - 1, len(wide))
        weights = 2.0 ** (params.bits * np.arange(1, params.digits))
        codes[wide] += weights @ tail
        steps[wide] = 2.0 * params.clip_range / (2.0 ** (params.bits * params.digits) - 1.0)
    return codes * steps - n * params.clip_range


# --------------------------------------------------------------------------- messages


@wire_type
@dataclass(frozen=True)
class Advert:
    """Step 1, site -> server -> its neighbours: the site's two X25519 public keys (hex)."""

    site: str
    share_public: str
    mask_public: str


@wire_type
@dataclass(frozen=True)
class SiteSecrets:
    """A site's private keys and self-mask seed for one round (hex); never leaves the site."""

    site: str
    share_private: str
    mask_private: str
    self_seed: str


@wire_type
@dataclass(frozen=True)
class SealedShares:
    """Step 2, site -> server -> addressee: the sender's shares for one neighbour, sealed (hex)."""

    sender: str
    addressee: str
    ciphertext: str


@wire_type
@dataclass(frozen=True)
class Share:
    """One holder's Shamir share of one owner's 32-byte secret: index and the two halves (hex)."""

    owner: str
    index: int
    value: str


@wire_type
@dataclass(frozen=True)
class HeldShares:
    """What a site keeps after masking: the shares its neighbours sealed to it, by owner."""

    site: str
    seeds: tuple[Share, ...]
    keys: tuple[Share, ...]


@wire_type
@dataclass(frozen=True, eq=False)  # holds an array: compare its fields, not the object
class MaskedInput:
    """Step 3, site -> server: the masked encoding, and the neighbours it agreed masks with
    (those whose shares it received), so the server knows which pairwise masks to remove."""

    site: str
    masked: np.ndarray
    partners: tuple[str, ...]


@wire_type
@dataclass(frozen=True)
class UnmaskRequest:
    """Step 4, server -> surviving sites: the sites whose masked input arrived."""

    arrived: tuple[str, ...]


@wire_type
@dataclass(frozen=True)
class UnmaskResponse:
    """Step 4, site -> server: seed shares of neighbours that arrived, key shares of those that did not."""

    site: str
    seeds: tuple[Share, ...]
    keys: tuple[Share, ...]


@dataclass(frozen=True, eq=False)
class UnmaskedSum:
    """What the server ends with: the float64 sum of the inputs of ``sites``, and the ring sum."""

    total: np.ndarray
    ring_total: np.ndarray
    sites: tuple[str, ...]


# --------------------------------------------------------------------------- crypto helpers


def _x25519(private_hex: str, public_hex: str) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )

    private = X25519PrivateKey.from_private_bytes(bytes.fromhex(private_hex))
    return private.exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(public_hex)))


def _public(private: bytes) -> str:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = X25519PrivateKey.from_private_bytes(private).public_key()
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def _kdf(secret: bytes, *info: object) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    label = "|".join(["medfed-secagg-v1", *map(str, info)]).encode("utf-8")
    return HKDF(algorithm=hashes.SHA256(), length=_KEY, salt=None, info=label).derive(secret)


def prg(key: bytes, length: int, dtype: np.dtype | str = "<u8") -> np.ndarray:
    """``length`` ring entries (little-endian ``dtype``: uint16/32/64) of the ChaCha20 keystream
    under ``key`` (zero nonce: one key, one stream); each is uniform in its ring."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    dtype = np.dtype(dtype)
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(dtype.itemsize * length))
    return np.frombuffer(stream, dtype=dtype).astype(dtype.newbyteorder("="), copy=False)


def _pair_key(params: SecAggParams, a: str, b: str, shared: bytes) -> bytes:
    lo, hi = sorted((a, b))
    return _kdf(shared, "mask", params.round, lo, hi)


def _seal_key(params: SecAggParams, sender: str, addressee: str, shared: bytes) -> bytes:
    return _kdf(shared, "seal", params.round, sender, addressee)


def _split(secret: bytes, threshold: int, holders: int) -> list[tuple[int, bytes]]:
    from Crypto.Protocol.SecretSharing import Shamir

    lo = Shamir.split(threshold, holders, secret[:_HALF])
    hi = Shamir.split(threshold, holders, secret[_HALF:])
    # both splits number the holders 1..n in order, so the halves pair up by position
    return [(i, a + b) for (i, a), (_, b) in zip(lo, hi, strict=True)]


def _combine(shares: Sequence[Share]) -> bytes:
    from Crypto.Protocol.SecretSharing import Shamir

    raw = [(s.index, bytes.fromhex(s.value)) for s in shares]
    lo = Shamir.combine([(i, v[:_HALF]) for i, v in raw])
    hi = Shamir.combine([(i, v[_HALF:]) for i, v in raw])
    return lo + hi


def _check_site(params: SecAggParams, site: str, role: str) -> None:
    if site not in params.sites:
        raise SecAggError(f"secure aggregation: {role} {site!r} is not in the round's cohort {list(params.sites)}")


# --------------------------------------------------------------------------- site side


def advertise(
    params: SecAggParams, site: str, randbytes: Callable[[int], bytes] = os.urandom
) -> tuple[SiteSecrets, Advert]:
    """Step 1 at ``site``: two fresh X25519 key pairs (sealing shares, agreeing masks) and a
    self-mask seed. ``randbytes`` is for tests only: a deployment keeps the OS CSPRNG."""
    _check_site(params, site, "site")
    return fresh_keys(site, randbytes)


def fresh_keys(site: str, randbytes: Callable[[int], bytes] = os.urandom) -> tuple[SiteSecrets, Advert]:
    """A site's round secrets and their public advert, before the cohort is known: the round's
    keys bind nothing but the site, so a site can draw them with its upload (one exchange fewer)."""
    share_private, mask_private, seed = randbytes(_KEY), randbytes(_KEY), randbytes(_KEY)
    secrets = SiteSecrets(site, share_private.hex(), mask_private.hex(), seed.hex())
    return secrets, Advert(site, _public(share_private), _public(mask_private))


def _neighbour_adverts(
    params: SecAggParams, site: str, adverts: Mapping[str, Advert]
) -> dict[str, Advert]:
    mine = neighbours(params)[site]
    return {j: adverts[j] for j in mine if j in adverts}


def share(params: SecAggParams, secrets: SiteSecrets, adverts: Mapping[str, Advert]) -> tuple[SealedShares, ...]:
    """Step 2 at a site: Shamir-share (``t`` of ``n``) its self-mask seed and mask private key
    among the ``n`` neighbours that advertised, and seal each neighbour's shares to it."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    site = secrets.site
    holders = _neighbour_adverts(params, site, adverts)
    if len(holders) < params.threshold:
        missing = sorted(set(neighbours(params)[site]) - set(holders))
        raise SecAggError(
            f"secure aggregation: site {site!r} has {len(holders)} neighbours that advertised, fewer than the "
            f"threshold {params.threshold}; missing {missing}"
        )
    seed_shares = _split(bytes.fromhex(secrets.self_seed), params.threshold, len(holders))
    key_shares = _split(bytes.fromhex(secrets.mask_private), params.threshold, len(holders))
    sealed = []
    for (j, advert), (index, seed_part), (_, key_part) in zip(holders.items(), seed_shares, key_shares, strict=True):
        key = _seal_key(params, site, j, _x25519(secrets.share_private, advert.share_public))
        plain = index.to_bytes(4, "little") + seed_part + key_part
        box = ChaCha20Poly1305(key).encrypt(_ZERO_NONCE, plain, f"{params.round}|{site}|{j}".encode())
        sealed.append(SealedShares(site, j, box.hex()))
    return tuple(sealed)


def open_shares(
    params: SecAggParams, secrets: SiteSecrets, adverts: Mapping[str, Advert], sealed: SealedShares
) -> tuple[Share, Share]:
    """The (seed, key) shares of ``sealed.sender`` in a box sealed to this site; a box sealed
    to another site, or altered, raises :class:`SecAggError`."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    me, sender = secrets.site, sealed.sender
    if sender not in adverts:
        raise SecAggError(f"secure aggregation: site {me!r} got shares from {sender!r}, which did not advertise")
    key = _seal_key(params, sender, me, _x25519(secrets.share_private, adverts[sender].share_public))
    try:
        plain = ChaCha20Poly1305(key).decrypt(
            _ZERO_NONCE, bytes.fromhex(sealed.ciphertext), f"{params.round}|{sender}|{sealed.addressee}".encode()
        )
    except (InvalidTag, ValueError) as err:
        raise SecAggError(
            f"secure aggregation: site {me!r} cannot open the shares {sender!r} sealed to {sealed.addressee!r} "
            f"(not addressed to it, or altered)"
        ) from err
    if sealed.addressee != me or len(plain) != _PLAIN:
        raise SecAggError(f"secure aggregation: shares from {sender!r} opened by {me!r} do not fit the round")
    index = int.from_bytes(plain[:4], "little")
    seed, key_part = plain[4 : 4 + _KEY], plain[4 + _KEY :]
    return Share(sender, index, seed.hex()), Share(sender, index, key_part.hex())


def mask(
    params: SecAggParams,
    secrets: SiteSecrets,
    adverts: Mapping[str, Advert],
    sealed_to_me: Sequence[SealedShares],
    x: np.ndarray,
    gen: np.random.Generator | None = None,
) -> tuple[HeldShares, MaskedInput]:
    """Step 3 at a site: open the shares its neighbours sealed to it and send
    ``y = enc(x) + PRG(b) + Σ_{j>i} PRG(s_ij) - Σ_{j<i} PRG(s_ij)  (mod 2^r)`` over the
    neighbours ``j`` whose shares arrived (only those can be unmasked if they drop). ``enc`` is
    :func:`encode_fixed`, or :func:`quantize` with ``gen`` (the site's keyed generator) when
    the round quantizes."""
    me = secrets.site
    if params.bits and gen is None:
        raise ConfigError(f"secure aggregation: site {me!r} needs its random generator to quantize to {params.bits} bits")
    encoded = quantize(x, params, gen, me) if params.bits else encode_fixed(x, params, me)
    n, dtype = params.ring_length, params.dtype
    allowed = set(neighbours(params)[me])
    strangers = sorted({s.sender for s in sealed_to_me} - allowed)
    if strangers:
        raise SecAggError(f"secure aggregation: site {me!r} got shares from {strangers}, which are not its neighbours")
    opened = [open_shares(params, secrets, adverts, s) for s in sealed_to_me]
    partners = tuple(sorted(seed.owner for seed, _ in opened))
    y = encoded + prg(_kdf(bytes.fromhex(secrets.self_seed), "self", params.round), n, dtype)
    for j in partners:
        stream = prg(_pair_key(params, me, j, _x25519(secrets.mask_private, adverts[j].mask_public)), n, dtype)
        y = y + stream if j > me else y - stream
    held = HeldShares(me, tuple(s for s, _ in opened), tuple(k for _, k in opened))
    return held, MaskedInput(me, y, partners)


def unmask(params: SecAggParams, held: HeldShares, request: UnmaskRequest) -> UnmaskResponse:
    """Step 4 at a surviving site: for each neighbour whose shares it holds, the seed share if
    its input arrived, else the key share, never both. Answer once per round."""
    for s in request.arrived:
        _check_site(params, s, "arrived site")
    arrived = set(request.arrived)
    return UnmaskResponse(
        held.site,
        tuple(s for s in held.seeds if s.owner in arrived),
        tuple(k for k in held.keys if k.owner not in arrived),
    )


# --------------------------------------------------------------------------- server side


def route_shares(
    params: SecAggParams, sealed: Mapping[str, Sequence[SealedShares]]
) -> dict[str, list[SealedShares]]:
    """Step 2 at the server: each site's sealed shares, by addressee (the server cannot open them)."""
    routed: dict[str, list[SealedShares]] = {s: [] for s in params.sites}
    for sender, boxes in sealed.items():
        for box in boxes:
            if box.sender != sender or box.addressee not in routed:
                raise SecAggError(
                    f"secure aggregation: site {sender!r} sent shares labelled {box.sender!r} -> {box.addressee!r}"
                )
            routed[box.addressee].append(box)
    return routed


def unmask_request(params: SecAggParams, masked: Mapping[str, MaskedInput]) -> UnmaskRequest:
    """Step 4 at the server: name the sites whose masked input arrived."""
    for s in masked:
        _check_site(params, s, "masked input from")
    if not masked:
        raise SecAggError("secure aggregation: no masked input arrived; nothing to sum")
    return UnmaskRequest(tuple(sorted(masked)))


def unmask_sum(
    params: SecAggParams,
    adverts: Mapping[str, Advert],
    masked: Mapping[str, MaskedInput],
    responses: Mapping[str, UnmaskResponse],
) -> UnmaskedSum:
    """Step 4 at the server: rebuild from ``t`` shares each arrived site's self-mask seed and
    each dropped partner's mask key, remove the masks and decode the exact sum.

    Raises :class:`SecAggError` naming every site with fewer than ``t`` answering share
    holders (and how many answered), before any mask is removed.
    """
    arrived = sorted(masked)
    n, dtype = params.ring_length, params.dtype
    for i in arrived:
        y = masked[i].masked
        if not (isinstance(y, np.ndarray) and y.dtype == dtype and y.shape == (n,)):
            raise SecAggError(
                f"secure aggregation: the masked input of {i!r} is not a {dtype.name} vector of length {n}"
            )
    dropped = sorted({j for i in arrived for j in masked[i].partners} - set(arrived))
    seeds: dict[str, list[Share]] = {}
    keys: dict[str, list[Share]] = {}
    for r in responses.values():
        for s in r.seeds:
            seeds.setdefault(s.owner, []).append(s)
        for k in r.keys:
            keys.setdefault(k.owner, []).append(k)
    short = [f"{j} ({len(seeds.get(j, []))} seed shares)" for j in arrived if len(seeds.get(j, [])) < params.threshold]
    short += [f"{j} ({len(keys.get(j, []))} key shares)" for j in dropped if len(keys.get(j, [])) < params.threshold]
    if short:
        raise SecAggError(
            f"secure aggregation cannot unmask: fewer than t={params.threshold} neighbours answered for "
            f"{', '.join(short)}; the round tolerates at most {params.degree - params.threshold} dropouts per neighbourhood"
        )
    total = np.zeros(n, dtype=dtype)
    for i in arrived:
        total += masked[i].masked
        seed = _combine(seeds[i][: params.threshold])
        total -= prg(_kdf(seed, "self", params.round), n, dtype)
    for j in dropped:
        key = _combine(keys[j][: params.threshold]).hex()
        for i in arrived:
            if j in masked[i].partners:
                # site i added +PRG(s_ij) when j > i and -PRG(s_ij) when j < i: take it back
                stream = prg(_pair_key(params, i, j, _x25519(key, adverts[i].mask_public)), n, dtype)
                total = total - stream if j > i else total + stream
    return UnmaskedSum(decode_sum(total, params, len(arrived)), total, tuple(arrived))


# --------------------------------------------------------------------------- in memory


@dataclass(frozen=True)
class SecAggTranscript:
    """A simulated round: the sum, and every message the server received, in order."""

    result: UnmaskedSum
    server_received: tuple[object, ...]


def simulate_transcript(
    params: SecAggParams,
    inputs: Mapping[str, np.ndarray],
    *,
    drop_after_masking: Collection[str] = (),
    drop_before_unmask: Collection[str] = (),
    randbytes: Callable[[str], Callable[[int], bytes]] | None = None,
    dither: Callable[[str], np.random.Generator] | None = None,
) -> SecAggTranscript:
    """All parties of one round in this process, message by message.

    ``drop_after_masking``: these sites mask but their input never arrives, and they answer
    nothing more. ``drop_before_unmask``: their input arrives, then they answer nothing more.
    ``randbytes(site)`` gives a site's random source (tests only; default the OS CSPRNG).
    ``dither(site)``: a quantized round's generator at each site (default keyed by the graph
    seed, the round and the site's name, so the sum is reproducible).
    """
    if set(inputs) != set(params.sites):
        raise DataError(f"secure aggregation: inputs are for {sorted(inputs)}, the cohort is {list(params.sites)}")
    for s in (*drop_after_masking, *drop_before_unmask):
        _check_site(params, s, "dropped site")
    received: list[object] = []
    parties = {s: advertise(params, s, randbytes(s) if randbytes else os.urandom) for s in params.sites}
    adverts = {s: advert for s, (_, advert) in parties.items()}
    received += adverts.values()
    sealed = {s: share(params, secrets, _neighbour_adverts(params, s, adverts)) for s, (secrets, _) in parties.items()}
    received += [box for boxes in sealed.values() for box in boxes]
    routed = route_shares(params, sealed)
    if dither is None:
        def dither(site: str) -> np.random.Generator:
            return KeyedRng(params.graph_seed, (name_key("secagg-dither"), params.round, name_key(site))).generator
    held, masked = {}, {}
    for s, (secrets, _) in parties.items():
        gen = dither(s) if params.bits else None
        held[s], wire = mask(params, secrets, _neighbour_adverts(params, s, adverts), routed[s], inputs[s], gen)
        if s not in drop_after_masking:
            masked[s] = wire
    received += masked.values()
    request = unmask_request(params, masked)
    gone = set(drop_after_masking) | set(drop_before_unmask)
    responses = {s: unmask(params, held[s], request) for s in request.arrived if s not in gone}
    received += responses.values()
    return SecAggTranscript(unmask_sum(params, adverts, masked, responses), tuple(received))


def simulate_round(
    inputs: Mapping[str, np.ndarray],
    *,
    drop_after_masking: Collection[str] = (),
    threshold: int | None = None,
    degree: int | None = None,
    seed: int,
    clip_range: float,
    round: int = 0,
    bits: int = 0,
) -> np.ndarray:
    """The securely aggregated float64 sum of ``inputs`` (site -> 1-D vector) over the sites
    not in ``drop_after_masking``, with every party run in memory (see :func:`simulate_transcript`);
    ``bits > 0`` quantizes every entry to ``bits`` bits in the narrowest ring that holds the sum."""
    lengths = {np.shape(v) for v in inputs.values()}
    if len(lengths) != 1 or len(next(iter(lengths))) != 1:
        raise DataError(f"secure aggregation: inputs must be 1-D vectors of one length; got shapes {sorted(lengths)}")
    params = secagg_params(
        inputs, clip_range=clip_range, length=next(iter(lengths))[0], graph_seed=seed,
        degree=degree, threshold=threshold, round=round, bits=bits,
    )
    return simulate_transcript(params, inputs, drop_after_masking=drop_after_masking).result.total
