"""Secure aggregation in the round: the channel's last stage, at the site and at the server.

A site's upload never leaves it in the clear. The site writes what the server's chain sums
as **one vector** (a :class:`Layout` of segments the server chose: the update weighted by
``n_i / N``, the weight ``n_i / N`` itself, the weighted training loss, SCAFFOLD's control
delta, adaptive clipping's within-clip bit, ...), masks it with SecAgg+
(:mod:`medfed.comm.secagg`) and the coordinator unmasks only the sum over the cohort.

**Channel stages at the site, in order** (:data:`CHANNEL`): the sharing policy (private
parameters never enter the vector), the clip (every vector segment to L2 norm ``C``: the
range the ring needs; with DP it is DP's clip, without DP it is ``--clip``, stated in the
results), the noise (``--dp distributed`` only: Gaussian noise on the weighted update, see
:func:`site_noise_std`), the quantization (``--compress q8|q4`` only), then the mask.

**Compression in the ring** (``q8``/``q4``, :func:`quantization_bits`): the site quantizes
every entry of its vector, stochastically and without bias, to ``b`` bits over the entry's
public range (:func:`medfed.comm.secagg.quantize`: ``2^b - 1`` steps over ``[-1, 1]`` in units
of the segment's bound ``B``) and masks in ``Z_2^r``, ``r`` the smallest of 16, 32, 64 with
``r ≥ b + ⌈log2 K⌉``: ``r/8`` bytes an entry instead of 8 (q8: 16 bits up to ``K = 256``).
A decoded sum entry is unbiased with variance at most ``K (2B / (2^b - 1))^2 / 4``
(:func:`quantization_variance`); the scalar segments (weights, the loss, a within-clip bit)
are few and their ranges coarse, so they travel as ``⌊48/b⌋`` ``b``-bit digits, exact to
``2^-48`` of their range. The study refuses it with client-level or distributed DP
(:func:`medfed.experiments.harness.check_secure_study`: rounding can carry an update past the
clip its noise is sized for, and nobody can clip a masked vector again); the noise-then-quantize
order (range ``C + 8 sigma_site``) is kept for the library's callers. The dither is drawn from the site's keyed rng
(the run's seed), so a run is reproducible and a deployment equals its simulation. ``topk`` is
refused (each site's sparse support differs, and the masks make every entry dense anyway);
``lossless`` too (a masked vector is uniform: deflate cannot shrink it).

**Range and scale.** Every segment has a bound ``B`` (``C`` for an update or control delta,
``C + 8 sigma_site`` for the noised update, ``1`` for weights and bits, :data:`LOSS_BOUND`
for the loss); the site writes ``value / B``, within ``[-1, 1]``, and the ring
(:func:`medfed.comm.secagg.fixed_point_scale` with ``R = 1``) encodes it at
``scale = 2^floor(log2(2^62 / K))`` for ``K`` masked sites, so the sum can never wrap.
A decoded sum entry is within ``B K / (2 scale)`` (about ``B K^2 2^-63``) of the exact sum:
``1e-15 B`` at ``K = 100``. An entry a hair above ``B`` (the clip's float rounding) is held
at ``B``; a loss above :data:`LOSS_BOUND` (a diverging site) is summed as that bound.

**Noise in the ring** (``--dp distributed``): each site adds ``N(0, sigma_site^2)`` to each
entry of its weighted update, sized so the sum of the fewest sites the round accepts
(``m``: ``min_sites``, at least 2) carries the noise ``--dp client`` would add on the server;
more survivors only add noise. The segment's range is ``C + 8 sigma_site``; a noised entry
beyond it (probability ``2 Phi(-8) = 1.2e-15`` per entry) is held at the range, which the
results state but the ledger does not account for.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medfed.client.upload import Upload
from medfed.comm import secagg
from medfed.errors import ConfigError, DataError
from medfed.rng import KeyedRng, name_key
from medfed.wiretypes import wire_type

LOSS_BOUND = 1e6  # a site's training loss is summed as at most this (a diverging site's larger one is held)
NOISE_TAILS = 8.0  # the noised update's range: C + 8 sigma_site
_ROUNDING = 1.0 + 2.0**-30  # a clipped vector's entries may exceed C by float rounding; held at C
STAGES = ("train", "share", "mask", "unmask")  # the round's exchanges with secure aggregation, in order
CHANNEL = ("sharing policy", "clip", "noise (distributed)", "quantize", "mask")
QUANTIZERS = {"q8": 8, "q4": 4}  # --compress that runs in the ring: its bits
WEIGHTINGS = ("examples", "uniform")
ROUND_CLIP = "dp_clip"  # a round's clip bound sent down with the global model (adaptive clipping)


@wire_type
@dataclass(frozen=True)
class SumTerm:
    """One thing a server step reads from the sum of the uploads: ``source`` ``payload`` or
    ``extras`` (then ``key``), weighted by each site's ``n_i / N`` (``examples``) or by 1
    (``uniform``); ``scalar`` for a number per site, else shaped like the shared parameters."""

    source: str
    key: str = ""
    weighting: str = "examples"
    scalar: bool = False

    @property
    def name(self) -> str:
        return f"{self.source}{'/' + self.key if self.key else ''}@{self.weighting}"


WEIGHT = SumTerm("weight", scalar=True)  # sum of n_i / N: the weighted mean's denominator
LOSS = SumTerm("metrics", "loss", scalar=True)  # sum of n_i / N * loss_i over sites that report a loss
LOSS_WEIGHT = SumTerm("metrics", "loss_weight", scalar=True)  # sum of n_i / N over those sites


@wire_type
@dataclass(frozen=True)
class Segment:
    """A term's place in the vector: its shapes (name -> shape, () for a scalar) and bound."""

    term: SumTerm
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    bound: float

    @property
    def size(self) -> int:
        return sum(math.prod(shape) for _, shape in self.shapes)


@wire_type
@dataclass(frozen=True)
class Layout:
    """The vector every site of a round masks, as the server chose it (public). ``total`` is
    ``N``, the federation's examples (shared at setup), so each site's weight is ``n_i / N``;
    ``clip`` the round's L2 bound of every shaped segment (adaptive clipping moves it)."""

    segments: tuple[Segment, ...]
    total: float
    clip: float

    @property
    def length(self) -> int:
        return sum(s.size for s in self.segments)

    def bounds(self) -> dict[str, float]:
        return {s.term.name: s.bound for s in self.segments}

    def scalars(self) -> tuple[int, ...]:
        """The vector's entries that hold a scalar term (a quantized round writes them wide)."""
        at, out = 0, []
        for seg in self.segments:
            if seg.term.scalar:
                out.append(at)
            at += seg.size
        return tuple(out)


def layout(terms: Sequence[SumTerm], shapes: Mapping[str, tuple[int, ...]], *, clip: float, total: float,
           noise_std: float = 0.0) -> Layout:
    """The round's vector: the weight, the loss and its weight, then each term a step sums (once).
    ``noise_std``: the noise each site adds to an ``examples``-weighted update (distributed DP)."""
    named = tuple((k, tuple(int(d) for d in s)) for k, s in shapes.items())
    segments, seen = [], set()
    for term in (WEIGHT, LOSS, LOSS_WEIGHT, *terms):
        if term.name in seen:
            continue
        seen.add(term.name)
        if term.scalar:
            bound = LOSS_BOUND if term == LOSS else 1.0
            segments.append(Segment(term, (("", ()),), bound))
        else:
            noised = term.source == "payload" and term.weighting == "examples" and noise_std > 0
            segments.append(Segment(term, named, clip + NOISE_TAILS * noise_std if noised else clip))
    return Layout(tuple(segments), float(total), float(clip))


def site_noise_std(noise_multiplier: float, clip: float, sizes: Mapping[str, float], min_sites: int) -> float:
    """Each site's noise on its weighted update ``(n_i / N) x_i`` under ``--dp distributed``:
    ``z n_max C / (N sqrt(m))``. The sum of ``s >= m`` sites has std ``sqrt(s / m)`` times
    ``z n_max C / N``, and the fixed-denominator mean (divided by ``q``) the std ``--dp client``
    adds on the server, ``z n_max C / (q N)`` (:func:`medfed.server.dp.dp_sensitivity`), or more."""
    if noise_multiplier <= 0:
        return 0.0
    return noise_multiplier * clip * max(sizes.values()) / (float(sum(sizes.values())) * math.sqrt(min_sites))


def _clip(values: Mapping[str, np.ndarray], clip: float) -> dict[str, np.ndarray]:
    norm = math.sqrt(sum(float(np.vdot(v, v)) for v in values.values()))
    scale = 1.0 if norm <= clip else clip / norm
    return {k: np.asarray(v, dtype=np.float64) * scale for k, v in values.items()}


def malformed(upload: Upload) -> str | None:
    """Why a site will not mask its own upload (the server cannot screen a masked one), or None."""
    for k, v in upload.payload.items():
        if not np.isfinite(np.asarray(v, dtype=np.float64)).all():
            return f"its update {k!r} is not finite (NaN/Inf): not masked"
    loss = upload.metrics.get("loss")
    if loss is not None and not math.isfinite(loss):
        return "its training loss is not finite (NaN/Inf): not masked"
    return None


def _check_shapes(lay: Layout, upload: Upload) -> None:
    """Every shaped segment of the layout must find its arrays in the upload (a DataError names them)."""
    for seg in lay.segments:
        t = seg.term
        if t.source not in ("payload", "extras") or t.scalar:
            continue
        source = upload.payload if t.source == "payload" else upload.extras.get(t.key, {})
        bad = [k for k, shape in seg.shapes if k not in source or np.shape(source[k]) != shape]
        if bad:
            raise DataError(f"secure aggregation: site {upload.site!r} has no {t.name} {bad[0]!r} of the shape the "
                            f"round's layout names ({dict(seg.shapes)[bad[0]]})")


def encode(lay: Layout, upload: Upload, noise_std: float = 0.0, rng: KeyedRng | None = None) -> np.ndarray:
    """The site's vector, every entry in ``[-1, 1]``: clip, weight, noise, divide by the bounds."""
    _check_shapes(lay, upload)
    share = upload.n_examples / lay.total
    parts = []
    for seg in lay.segments:
        t = seg.term
        weight = share if t.weighting == "examples" else 1.0
        if t == WEIGHT:
            flat = np.array([share])
        elif t == LOSS or t == LOSS_WEIGHT:
            loss = upload.metrics.get("loss")
            has = loss is not None and math.isfinite(loss)
            value = min(max(float(loss), -LOSS_BOUND), LOSS_BOUND) if has and t == LOSS else float(has)
            flat = np.array([share * value if has else 0.0])
        else:
            source = upload.payload if t.source == "payload" else upload.extras[t.key]
            if t.scalar:
                flat = np.array([weight * float(source)])
            else:
                clipped = _clip({k: source[k] for k, _ in seg.shapes}, lay.clip)
                flat = weight * np.concatenate([clipped[k].ravel() for k, _ in seg.shapes])
                if t.source == "payload" and t.weighting == "examples" and noise_std > 0:
                    flat = flat + rng.generator.normal(0.0, noise_std, size=flat.shape)
        parts.append(np.clip(flat / (seg.bound * _ROUNDING), -1.0, 1.0))
    return np.concatenate(parts)


def decode(lay: Layout, total: np.ndarray) -> dict[str, Any]:
    """The decoded ring sum by term name: a dict of arrays for a shaped term, a float for a scalar."""
    out: dict[str, Any] = {}
    at = 0
    for seg in lay.segments:
        piece = total[at:at + seg.size] * (seg.bound * _ROUNDING)
        at += seg.size
        if seg.term.scalar:
            out[seg.term.name] = float(piece[0])
            continue
        values, off = {}, 0
        for k, shape in seg.shapes:
            n = math.prod(shape)
            values[k] = piece[off:off + n].reshape(shape)
            off += n
        out[seg.term.name] = values
    return out


def resolution(lay: Layout, n_sites: int) -> dict[str, float]:
    """The largest error of each decoded sum entry over ``n_sites``, fixed point: ``B K / (2 scale)``."""
    scale = secagg.fixed_point_scale(1.0, n_sites)
    return {s.term.name: s.bound * _ROUNDING * n_sites / (2.0 * scale) for s in lay.segments}


def quantization_variance(lay: Layout, n_sites: int, bits: int) -> dict[str, float]:
    """The variance ``bits``-bit quantization adds to an entry of each decoded term's sum over
    ``n_sites``, at most: ``K (2B / (2^b - 1))^2 / 4`` (a scalar term's, with ``⌊48/b⌋ b`` bits)."""
    out = {}
    for seg in lay.segments:
        b = bits * max(1, secagg.WIDE_BITS // bits) if seg.term.scalar else bits
        out[seg.term.name] = n_sites * (2.0 * seg.bound * _ROUNDING / (2.0**b - 1.0)) ** 2 / 4.0
    return out


# --------------------------------------------------------------------------- the site's side


@wire_type
@dataclass(frozen=True)
class SecureReady:
    """A site's answer to ``train`` under secure aggregation: its round's public keys, or why it
    will not mask (``problem``: its own upload is malformed). The upload stays at the site."""

    site: str
    round: int
    advert: secagg.Advert | None
    problem: str | None = None


@wire_type
@dataclass
class SecureSlot:
    """What a site keeps between the stages of one round (never sent): its upload, secrets,
    the round's public parameters and layout, its neighbours' adverts and the shares it holds."""

    round: int
    upload: Upload
    secrets: secagg.SiteSecrets
    params: secagg.SecAggParams | None = None
    layout: Layout | None = None
    adverts: dict = field(default_factory=dict)
    held: secagg.HeldShares | None = None


@dataclass(frozen=True)
class SiteSecure:
    """A site's secure-aggregation stage: with ``--dp distributed``, the noise it adds
    (:func:`site_noise_std`); with ``--compress q8|q4``, the bits it quantizes to in the ring
    (0: the 64-bit fixed point). Both from the site's own config, never the server's."""

    noise_std: float = 0.0
    bits: int = 0

    def ready(self, upload: Upload, round_: int) -> tuple[SecureSlot | None, SecureReady]:
        problem = malformed(upload)
        if problem is not None:
            return None, SecureReady(upload.site, round_, None, problem)
        secrets, advert = secagg.fresh_keys(upload.site)
        return SecureSlot(round_, upload, secrets), SecureReady(upload.site, round_, advert)

    def answer(self, stage: str, slot: SecureSlot | None, round_: int, message: Mapping[str, Any],
               rng: KeyedRng, dither: KeyedRng | None = None) -> tuple[SecureSlot | None, Any]:
        """One stage's answer from the site's slot of ``round_`` (a DataError for a stage it cannot
        serve: no upload held for that round, or a round that quantizes to other bits than the
        site's config; a ConfigError for an unknown stage). ``rng`` draws the noise, ``dither``
        the quantization (default ``rng``)."""
        if slot is None or slot.round != round_:
            raise DataError(f"secure aggregation: site holds no masked upload for round {round_ + 1} (stage {stage!r})")
        if stage == "share":
            params, lay, adverts = message["params"], message["layout"], dict(message["adverts"])
            if slot.upload.site not in params.sites or params.round != round_:
                raise DataError(f"secure aggregation: the share request does not name site {slot.upload.site!r} "
                                f"in round {round_ + 1}")
            if params.bits != self.bits:
                raise DataError(f"secure aggregation: the round quantizes to {params.bits} bits (0: none), site "
                                f"{slot.upload.site!r} is configured for {self.bits}; the study's --compress differs")
            slot = SecureSlot(slot.round, slot.upload, slot.secrets, params, lay, adverts)
            return slot, secagg.share(params, slot.secrets, adverts)
        if stage == "mask":
            x = encode(slot.layout, slot.upload, self.noise_std, rng)
            gen = (dither or rng).child(name_key("secagg-dither")).generator if self.bits else None
            held, masked = secagg.mask(slot.params, slot.secrets, slot.adverts, list(message["sealed"]), x, gen)
            return SecureSlot(slot.round, slot.upload, slot.secrets, slot.params, slot.layout, slot.adverts, held), masked
        if stage == "unmask":
            if slot.held is None:
                raise DataError("secure aggregation: an unmask request before this site masked")
            return None, secagg.unmask(slot.params, slot.held, message["request"])  # answered once: secrets gone
        raise ConfigError(f"unknown secure-aggregation stage {stage!r}; stages: {', '.join(STAGES[1:])}")


def quantization_bits(compress: str | None) -> int:
    """The bits ``--compress`` quantizes to in the ring under secure aggregation (``none``: 0, the
    64-bit fixed point; ``q8``: 8; ``q4``: 4); what cannot run under the mask is refused in one line."""
    text = (compress or "none").strip().lower()
    if text == "none" or text in QUANTIZERS:
        return QUANTIZERS.get(text, 0)
    why = ("a masked vector is uniform in its ring: deflate cannot shrink it" if text == "lossless" else
           "each site's sparse support differs and the masks make every entry dense")
    raise ConfigError(f"--compress {compress} cannot run with --secure-aggregation: {why}; use --compress q8, q4 "
                      "or none")
