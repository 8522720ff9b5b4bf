"""The coordinator's side of a securely aggregated round: three more exchanges after ``train``.

With secure aggregation a site answers ``train`` with its round's public keys
(:class:`~medfed.comm.secure.SecureReady`) and keeps its upload. The coordinator then carries
three protocol stages to the cohort through the executor's one generic ``stage`` call, and ends
with the sum only (:class:`~medfed.server.aggregate.SummedUploads`)::

    share   to each ready site: the round's SecAgg parameters, layout, its neighbours' adverts
            <- its Shamir shares, sealed to each neighbour
    mask    to each site that shared: the boxes sealed to it       <- its masked vector
    unmask  to each site whose vector arrived: who arrived         <- its shares of seeds / keys

A site that stops answering before ``mask`` is not in the sum; one that stops after sharing
(its vector never arrives) or after masking (it does not answer ``unmask``) is recovered from
its neighbours' shares, up to ``degree - threshold`` per neighbourhood. Fewer than
``min_sites`` masked vectors, or too many dropouts to unmask, skip the round (recorded): with
``--dp distributed`` a sum of fewer sites would carry less noise than the ledger claims.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from medfed.comm import secagg, secure
from medfed.comm.wire import encode
from medfed.errors import MedfedError
from medfed.rng import KeyedRng, name_key
from medfed.server.aggregate import SummedUploads

Stage = Callable[[str, int, Mapping[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class SecureSettings:
    """What the coordinator needs to run the masked exchange: ``total`` (``N``, every site's
    examples), the clip ``C`` (the range of each update entry), the fewest masked sites a round
    accepts, SecAgg+'s threshold and degree (None: the library's defaults for the round's
    cohort), each site's noise std under ``--dp distributed`` (it widens the range), and the bits
    ``--compress q8|q4`` quantizes to in the ring (0: the 64-bit fixed point)."""

    total: float
    clip: float
    min_sites: int = 2
    threshold: int | None = None
    degree: int | None = None
    noise_std: float = 0.0
    bits: int = 0


@dataclass(frozen=True)
class SecureOutcome:
    """One masked round as the server ends it: the sum (None when skipped, with why), who sent
    nothing or would not mask, the bytes each site sent over all stages, and the round's
    secure-aggregation facts for the record (threshold, degree, who dropped when)."""

    summed: SummedUploads | None
    skipped: str | None
    missing: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    bytes_by_site: dict[str, int] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def round_graph(settings: SecureSettings, sites: Sequence[str]) -> tuple[int, int]:
    """The round's ``(degree, threshold)`` for its ready sites: the configured ones fitted to the
    cohort (a degree at most ``K - 1`` and even below it, a threshold within ``k/2+1 .. k``)."""
    n = len(sites)
    k = secagg.default_degree(n) if settings.degree is None else min(int(settings.degree), n - 1)
    if k < n - 1 and k % 2:
        k -= 1
    k = max(k, 1)
    t = k // 2 + 1 if settings.threshold is None else min(max(int(settings.threshold), k // 2 + 1), k)
    return k, t


def secure_sum(settings: SecureSettings, round_: int, replies: Mapping[str, Any], lay: secure.Layout,
               stage: Stage, rng: KeyedRng, kind: str = "delta") -> SecureOutcome:
    """Run the share, mask and unmask stages for the sites that answered ``train`` ready."""
    missing = {s: r for s, r in replies.items() if isinstance(r, str)}
    rejected: dict[str, str] = {}
    sent: dict[str, int] = {}
    adverts: dict[str, secagg.Advert] = {}
    for site, r in replies.items():
        if isinstance(r, str):
            continue
        sent[site] = len(encode(r))
        if not isinstance(r, secure.SecureReady) or r.site != site or r.round != round_:
            missing[site] = f"malformed answer: expected the site's secure-aggregation keys, got {type(r).__name__}"
        elif r.problem is not None:
            rejected[site] = f"the site would not mask its upload: {r.problem}"
        else:
            adverts[site] = r.advert
    need = settings.min_sites
    info: dict[str, Any] = {"ready": sorted(adverts), "min_sites": need, "range": lay.bounds(),
                            "site_noise_std": settings.noise_std}

    def outcome(skipped: str | None, summed: SummedUploads | None = None) -> SecureOutcome:
        return SecureOutcome(summed, skipped, missing, rejected, sent, info)

    if len(adverts) < need:
        return outcome(f"{len(adverts)} site(s) ready to mask, fewer than the {need} secure aggregation requires")
    degree, threshold = round_graph(settings, tuple(adverts))
    graph_seed = int(rng.child(round_, name_key("secagg-graph")).generator.integers(2**62))  # public
    params = secagg.secagg_params(adverts, clip_range=1.0, length=lay.length, graph_seed=graph_seed,
                                  degree=degree, threshold=threshold, round=round_, bits=settings.bits,
                                  wide=lay.scalars() if settings.bits else ())
    info.update(degree=params.degree, threshold=params.threshold, ring_bits=params.ring_bits)
    if settings.bits:  # the sum's variance per entry is stated for the K that mask: the most that can arrive
        info["quantization"] = {"bits": settings.bits, "levels": params.levels,
                                "variance": secure.quantization_variance(lay, len(params.sites), settings.bits)}
    else:
        info["scale"] = params.scale
    near = secagg.neighbours(params)

    def ask(name: str, messages: Mapping[str, Any], expect: type, gone: dict[str, str]) -> dict[str, Any]:
        got = {}
        for site, answer in stage(name, round_, messages).items():
            if isinstance(answer, str):
                gone[site] = f"{answer} (secure aggregation, {name} stage)"
                continue
            sent[site] = sent.get(site, 0) + len(encode(answer))
            if isinstance(answer, expect) or (expect is tuple and isinstance(answer, list)):
                got[site] = answer
            else:
                gone[site] = f"malformed answer in the {name} stage: {type(answer).__name__}"
        return got

    sealed = ask("share", {s: {"params": params, "layout": lay,
                               "adverts": {j: adverts[j] for j in near[s]}} for s in adverts}, tuple, missing)
    try:
        routed = secagg.route_shares(params, {s: tuple(b) for s, b in sealed.items()})
    except MedfedError as exc:
        return outcome(f"secure aggregation: {exc}")
    masked = ask("mask", {s: {"sealed": routed[s]} for s in sealed}, secagg.MaskedInput, missing)
    for s in [s for s, m in masked.items() if m.site != s]:
        missing[s] = f"malformed answer in the mask stage: a masked vector labelled {masked.pop(s).site!r}"
    info["dropped_after_sharing"] = sorted(set(sealed) - set(masked))  # masked with, never arrived: recovered
    if len(masked) < need:
        return outcome(f"{len(masked)} masked upload(s) arrived, fewer than the {need} secure aggregation requires")
    request = secagg.unmask_request(params, masked)
    late: dict[str, str] = {}  # their vectors are in the sum: only their answers are missing
    responses = ask("unmask", {s: {"request": request} for s in masked}, secagg.UnmaskResponse, late)
    info["dropped_after_masking"] = sorted(set(masked) - set(responses))  # in the sum: seeds rebuilt
    try:
        total = secagg.unmask_sum(params, adverts, masked, {s: r for s, r in responses.items() if r.site == s})
    except MedfedError as exc:
        return outcome(str(exc))
    sums = secure.decode(lay, total.total)
    summed = SummedUploads(total.sites, sums, float(sums[secure.WEIGHT.name]), lay.total, kind)
    return outcome(None, summed)
