"""The round as a protocol between a coordinator and sites (``DESIGN.md``, "The round is a
protocol"). Two programs talk; neither assumes the other is in memory:

- a :class:`SiteProgram` runs at a site, on that site's rows and state only, and turns the
  global model and the round's message into an :class:`~medfed.client.upload.Upload`;
- a :class:`ServerProgram` runs at the coordinator, on uploads only: it picks each round's
  cohort and message (``configure``) and folds the cohort's uploads into the next global
  model (``aggregate``).

Both are built from a method's two halves (:class:`FederatedAlgorithm`: its local rule and
its aggregator chain). An executor (:mod:`medfed.engine.executors`) carries the messages;
the :class:`~medfed.engine.driver.Driver` runs configure → executor → aggregate → checkpoint.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medfed.client.local import LocalData, LocalTraining
from medfed.client.upload import Upload
from medfed.comm import secure
from medfed.comm.compress import Codec
from medfed.comm.policy import sharing_policy
from medfed.engine.selection import select_sites
from medfed.errors import MedfedError
from medfed.engine.secure import SecureOutcome, SecureSettings
from medfed.rng import KeyedRng, name_key
from medfed.server.aggregate import Aggregator, StackedUploads, stack_uploads, summed_terms
from medfed.server.validate import screen_stacked, screen_uploads
from medfed.wiretypes import wire_type

LocalUpdate = Callable[..., tuple[Any, Any]]
Personalize = Callable[..., dict[str, np.ndarray]]
Params = dict[str, np.ndarray]

# streams of the run's keyed rng: selection, a site's local work, a site's personalization
SELECTION_STREAM, TRAIN_STREAM, PERSONAL_STREAM, CODEC_STREAM, NOISE_STREAM = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class FederatedAlgorithm:
    """A federated method's two halves: a client rule and a server aggregator.

    Optional pieces, for methods that need them:

    - ``broadcast(server_state) -> dict``: extra keyword arguments sent down with the global
      model each round (SCAFFOLD's server control variate). They reach the local rule as
      keyword arguments.
    - ``personalize(global_params, data, training, client_state, rng, **message) -> params``: a
      site's personal model after the last round (fine-tuning, Ditto, APFL, PFA). Its metrics
      are reported next to the global model's. ``message`` is what ``broadcast`` makes of the
      final server state (PFA's last shared frequency band).
    - ``private(name) -> bool``: parameters that never leave a site (FedBN, FedPer). Uploads
      carry the others only; the site's channel enforces it (:func:`medfed.comm.policy.sharing_policy`)
      and the server keeps its copy of a private parameter unchanged.
    """

    name: str
    local_update: LocalUpdate
    aggregator: Aggregator
    broadcast: Callable[[Any], dict[str, Any]] | None = None
    personalize: Personalize | None = None
    private: Callable[[str], bool] | None = None


def with_upload_transforms(algorithm: FederatedAlgorithm, transmit) -> FederatedAlgorithm:
    """The algorithm whose every upload also passes ``transmit(upload) -> upload`` at its site
    (an :class:`~medfed.comm.boundary.UploadBoundary`'s ``transmit``: clipping for DP)."""
    import dataclasses

    update = algorithm.local_update

    def local_update(*args, **kwargs):
        upload, state = update(*args, **kwargs)
        return transmit(upload), state

    return dataclasses.replace(algorithm, local_update=local_update)


@dataclass(frozen=True, slots=True)
class RoundContext:
    """What both sides know about a round: its index, the sites taking part, and the run's
    keyed rng, from which every draw of the round derives by (round, stream, site name)."""

    round: int
    cohort: tuple[str, ...]
    rng: KeyedRng

    def site_rng(self, site: str, stream: int = TRAIN_STREAM) -> KeyedRng:
        return self.rng.child(self.round, stream, name_key(site))


@dataclass(frozen=True, slots=True)
class RoundPlan:
    """What the coordinator sends for one round: who trains, the shared part of the global
    model, and the method's message (its ``broadcast``). ``final`` marks the closing request
    after the last round (personalization), which trains nothing."""

    round: int
    cohort: tuple[str, ...]
    params: Params
    message: dict[str, Any] = field(default_factory=dict)
    final: bool = False


@dataclass(frozen=True, slots=True)
class SiteSetup:
    """What the setup exchange before round 0 shares about a site: never rows, only counts
    (examples; rows per class), which weighting by examples and FedSLD's prior use."""

    site: str
    n_examples: int
    label_counts: tuple[float, ...] = ()

    @classmethod
    def of(cls, data: LocalData) -> SiteSetup:
        y = np.asarray(data.y)
        return cls(data.name, data.n, (float(np.sum(y == 0)), float(np.sum(y == 1))))


@wire_type
@dataclass(frozen=True, slots=True)
class RoundRecord:
    """What happened in one communication round."""

    round: int
    sites: tuple[str, ...]
    train_loss: float  # example-weighted training loss of the global model the sites received
    bytes_up: int
    report: dict | None = None
    evaluation: dict | None = None
    rejected: dict[str, str] = field(default_factory=dict)  # site -> why the server refused its upload
    skipped: str | None = None  # why the global model was left unchanged this round
    missing: dict[str, str] = field(default_factory=dict)  # site -> why it sent nothing (crash, timeout)
    bytes_by_site: dict[str, int] = field(default_factory=dict)  # what each site's upload took on the wire
    loss_reported: bool = True  # False: the sites kept their loss to themselves (DP-SGD); train_loss is nan
    secure: dict | None = None  # secure aggregation: threshold, degree, who dropped at which stage


@dataclass(frozen=True, slots=True)
class StackedReplies:
    """A round's replies as one array program over the cohort leaves them (the vectorized
    executor, :mod:`medfed.engine.executors.vectorized`): the uploads stacked in cohort order,
    never split into per-site objects; each took ``nbytes`` on the wire (one shape for all);
    ``missing``: why the other sites of the cohort sent nothing."""

    uploads: StackedUploads
    nbytes: int
    missing: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SiteProgram:
    """A method's site half: what a site does with the global model on its own rows.

    ``train`` returns the upload as it leaves the site (after the site's channel: the sharing
    policy refuses a private parameter) and the site's next state; the state stays at the site.
    """

    algorithm: FederatedAlgorithm
    training: LocalTraining
    codec: Codec | None = None  # the channel's compression, applied by the site's runtime
    secure: secure.SiteSecure | None = None  # secure aggregation: the upload is masked, never sent

    @property
    def personal(self) -> bool:
        return self.algorithm.personalize is not None

    def init(self, data: LocalData) -> Any:
        return None

    def train(self, plan: RoundPlan, data: LocalData, state: Any, rng: KeyedRng) -> tuple[Upload, Any]:
        upload, state = self.algorithm.local_update(
            plan.params, data, self.training.for_site(data.n), state, rng, **plan.message
        )
        if self.algorithm.private is not None:
            upload = sharing_policy(self.algorithm.private)(upload)
        return upload, state

    def personalize(self, plan: RoundPlan, data: LocalData, state: Any, rng: KeyedRng) -> Params:
        return self.algorithm.personalize(plan.params, data, self.training.for_site(data.n), state, rng, **plan.message)


@wire_type
@dataclass(frozen=True, slots=True)
class ServerState:
    """The coordinator's whole state between rounds: the global model (private parameters
    keep their initial values), the aggregator chain's state, and the next round's index."""

    params: Params
    aggregator: Any
    round: int = 0


@dataclass(frozen=True)
class ServerProgram:
    """A method's server half: cohort selection, the round's message, screening and the
    aggregator chain. It sees uploads only, never a site's rows or state.

    Every upload is screened (:func:`~medfed.server.validate.screen_uploads`): a malformed one,
    or one whose norm exceeds ``max_update_norm``, is left out and named in the round's
    ``rejected``. If fewer than ``min_sites`` valid uploads arrive (the cohort's size, when that
    is smaller), the global model stays as it was and the round records why.
    """

    algorithm: FederatedAlgorithm
    sites: tuple[str, ...]
    fraction: float = 1.0
    min_sites: int = 1
    max_update_norm: float | None = None
    poisson: bool = False  # each site takes part independently with probability ``fraction`` (DP's sampling)
    codec: Codec | None = None  # how the sites compressed their uploads: decoded before screening
    secure: SecureSettings | None = None  # secure aggregation: the server receives masked vectors, sums only

    def init(self, params: Mapping[str, np.ndarray], setup: Mapping[str, SiteSetup] | None = None) -> ServerState:
        own = {k: np.array(v, dtype=np.float64, copy=True) for k, v in params.items()}
        return ServerState(own, self.algorithm.aggregator.init(own), 0)

    def cohort(self, round_: int, rng: KeyedRng) -> tuple[str, ...]:
        if self.fraction >= 1.0:
            return self._everyone
        if self.poisson:  # one keyed draw per site, so a site's fate does not depend on the others
            return tuple(s for s in self.sites
                         if rng.child(round_, SELECTION_STREAM, name_key(s)).generator.random() < self.fraction)
        chosen = select_sites(len(self.sites), self.fraction, self.min_sites, rng.child(round_, SELECTION_STREAM))
        return tuple(self.sites[i] for i in chosen.tolist())

    @functools.cached_property
    def _everyone(self) -> tuple[str, ...]:
        """Full participation: every site, every round (checked once; no number is drawn)."""
        chosen = select_sites(len(self.sites), self.fraction, self.min_sites, KeyedRng(0))
        return tuple(self.sites[i] for i in chosen.tolist())

    def shared(self, params: Params) -> Params:
        private = self.algorithm.private
        return params if private is None else {k: v for k, v in params.items() if not private(k)}

    def configure(self, state: ServerState, ctx: RoundContext, *, final: bool = False) -> RoundPlan:
        cohort = ctx.cohort if final else self.cohort(ctx.round, ctx.rng)
        message = self.algorithm.broadcast(state.aggregator) if self.algorithm.broadcast else {}
        return RoundPlan(ctx.round, cohort, state.params, message, final)

    def layout(self, state: ServerState, plan: RoundPlan) -> secure.Layout:
        """The vector each site masks this round: what the chain's steps sum, over the shared
        parameters, within the round's clip (adaptive clipping sends it down with the plan)."""
        settings = self.secure
        clip = float(plan.message.get(secure.ROUND_CLIP, settings.clip))
        shapes = {k: np.shape(v) for k, v in self.shared(state.params).items()}
        return secure.layout(summed_terms(self.algorithm.aggregator), shapes, clip=clip, total=settings.total,
                             noise_std=settings.noise_std)

    def aggregate(
        self, state: ServerState, replies: Mapping[str, Upload | str] | SecureOutcome | StackedReplies,
        ctx: RoundContext,
    ) -> tuple[ServerState, RoundRecord]:
        """Fold one round's replies (an upload, or why the site sent none) into the next state;
        under secure aggregation, the round's sum (no upload was screened: the sites' own clip
        bounds each, and a site refuses to mask a malformed one); from the vectorized executor,
        the uploads already stacked (screened on the stacked arrays, never split per site)."""
        if isinstance(replies, SecureOutcome):
            return self._aggregate_sum(state, replies, ctx)
        shared = self.shared(state.params)
        if isinstance(replies, StackedReplies):
            stack, rejected = screen_stacked(replies.uploads, shared, max_norm=self.max_update_norm)
            sent = dict.fromkeys(replies.uploads.sites, replies.nbytes)
            return self._fold(state, stack, rejected, dict(replies.missing), sent, ctx)
        uploads = [r for r in replies.values() if not isinstance(r, str)]
        missing = {site: r for site, r in replies.items() if isinstance(r, str)}
        sent = {u.site: u.nbytes for u in uploads}  # what crossed the network: the encoded uploads
        undecodable: dict[str, str] = {}
        if self.codec is not None:
            shapes = {k: v.shape for k, v in shared.items()}
            decoded = []
            for u in uploads:
                try:
                    decoded.append(self.codec.decode(u, shapes))
                except MedfedError as exc:
                    undecodable[u.site] = str(exc)
            uploads = decoded
        accepted, rejected = screen_uploads(uploads, shared, max_norm=self.max_update_norm)
        stack = stack_uploads(accepted) if accepted else None
        return self._fold(state, stack, {**undecodable, **rejected}, missing, sent, ctx)

    def _fold(self, state: ServerState, stack: StackedUploads | None, rejected: dict[str, str],
              missing: dict[str, str], sent: dict[str, int], ctx: RoundContext) -> tuple[ServerState, RoundRecord]:
        """The round's accepted uploads (``stack``, None when none) through the aggregator chain,
        unless fewer than ``min_sites`` arrived; the round's record."""
        params, aggregator, report, skipped = state.params, state.aggregator, None, None
        accepted = () if stack is None else stack.sites
        if len(accepted) < max(1, min(self.min_sites, len(ctx.cohort))):
            skipped = f"{len(accepted)} valid upload(s), fewer than the {self.min_sites} required"
            loss, names = float("nan"), accepted
        else:
            params, aggregator, report = self.algorithm.aggregator.apply(stack, aggregator, params, ctx.round)
            w = stack.weights
            loss = float(stack.metrics["loss"] @ w / w.sum()) if "loss" in stack.metrics else float("nan")
            names = stack.sites
        reported = skipped is not None or "loss" in stack.metrics
        record = RoundRecord(ctx.round, names, loss, sum(sent.values()), report, None, rejected, skipped, missing,
                             sent, reported)
        return ServerState(params, aggregator, ctx.round + 1), record

    def _aggregate_sum(self, state: ServerState, outcome: SecureOutcome, ctx: RoundContext):
        params, aggregator, report, skipped = state.params, state.aggregator, None, outcome.skipped
        loss, names, reported = float("nan"), (), True
        if skipped is None:
            summed = outcome.summed
            chain = self.algorithm.aggregator
            apply = chain.apply if chain.steps else chain.on_sum
            params, aggregator, report = apply(summed, aggregator, params, ctx.round)
            weight = summed[secure.LOSS_WEIGHT]
            reported = weight > 0  # an exact 0 when no site reported its loss (DP-SGD)
            loss = summed[secure.LOSS] / weight if reported else float("nan")
            names = summed.sites
        sent = dict(outcome.bytes_by_site)
        record = RoundRecord(ctx.round, names, loss, sum(sent.values()), report, None, dict(outcome.rejected), skipped,
                             dict(outcome.missing), sent, reported, dict(outcome.info))
        return ServerState(params, aggregator, ctx.round + 1), record


def accepted_sites(record: RoundRecord) -> tuple[str, ...]:
    """The sites whose uploads the server used in this round (none when it was skipped)."""
    return () if record.skipped else record.sites


def decisions(record: RoundRecord) -> dict[str, bool]:
    """The server's decision on every upload of the round: used (True) or not (False)."""
    used = set(accepted_sites(record))
    return {site: site in used for site in (*record.sites, *record.rejected)}


def programs(
    algorithm: FederatedAlgorithm,
    training: LocalTraining,
    sites: Sequence[str],
    *,
    fraction: float = 1.0,
    min_sites: int = 1,
    max_update_norm: float | None = None,
    poisson: bool = False,
    codec: Codec | None = None,
    secure: tuple[secure.SiteSecure, SecureSettings] | None = None,
) -> tuple[SiteProgram, ServerProgram]:
    """A method's site and server programs for a federation of ``sites`` (``secure``: each
    side's secure aggregation, :func:`medfed.methods.privacy.secure_sides`)."""
    site_secure, server_secure = secure if secure is not None else (None, None)
    return (
        SiteProgram(algorithm, training, codec, site_secure),
        ServerProgram(algorithm, tuple(sites), fraction, min_sites, max_update_norm, poisson, codec, server_secure),
    )
