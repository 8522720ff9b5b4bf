"""A site's side of the protocol: the one object that holds a site's rows and state.

The runtime answers the coordinator's requests (train, commit, personalize) with the site's
:class:`~medfed.engine.protocol.SiteProgram`. A site's new state is *pending* until the
coordinator says it used the site's upload (:meth:`SiteRuntime.commit`); a rejected upload or
a skipped round leaves the committed state as it was, as if the site had not taken part, so
state that must move with the server's (SCAFFOLD's ``c_i`` with ``c``) never drifts from it.

With a ``state_dir`` the runtime keeps its state on disk (atomically, after every change) and
a restarted runtime resumes it; requests carry round numbers, so a repeated request after a
coordinator restart recomputes the same answer instead of applying it twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfed.atomic import write_bytes_atomically
from medfed.client.local import LocalData
from medfed.client.upload import Upload
from medfed.comm.wire import decode, encode
from medfed.engine.protocol import (
    CODEC_STREAM,
    NOISE_STREAM,
    PERSONAL_STREAM,
    TRAIN_STREAM,
    Params,
    RoundPlan,
    SiteProgram,
    SiteSetup,
)
from medfed.rng import KeyedRng, name_key
from medfed.wiretypes import wire_type


@wire_type
@dataclass
class SiteMemory:
    """What a site remembers between requests: its committed state (as of ``committed_round``,
    -1 before any), the committed state before that (``earlier``, as of ``earlier_round``), and
    the state of its last upload, kept until the coordinator decides.

    ``earlier`` exists for a coordinator that restarts from its checkpoint of the round before
    the site's last commit (it crashed between the two writes): the repeated round must start
    from the state the site had then, not apply the round twice."""

    state: Any = None
    committed_round: int = -1
    earlier: Any = None
    earlier_round: int = -1
    pending_round: int | None = None
    pending_state: Any = None
    # the channel's state (top-k's error feedback), kept and committed with the method's
    channel: Any = None
    earlier_channel: Any = None
    pending_channel: Any = None
    # secure aggregation: the round's upload, secrets and shares between its stages (never sent)
    secure: Any = None

    def state_before(self, round_: int) -> Any:
        """The committed state a request for ``round_`` starts from."""
        if self.committed_round >= round_:
            self.state, self.committed_round = self.earlier, self.earlier_round
            self.channel = self.earlier_channel
        return self.state


class SiteRuntime:
    """One site: its training rows, its program and its memory."""

    def __init__(
        self, program: SiteProgram, data: LocalData, rng: KeyedRng, state_dir: Path | None = None, *, durable: bool = True,
        noise_seed: int | None = None,
    ) -> None:
        self._durable = durable
        # the seed of the site's own noise (--dp distributed; DP-SGD's batches and noise); None: the
        # run's keyed rng, which the coordinator could recompute (simulation: reproducible); a
        # deployed site holds its own, or the server could subtract the noise it knows
        self._noise = None if noise_seed is None else KeyedRng(noise_seed)
        self.program = program
        self.data = data
        self.name = data.name
        self._key = name_key(data.name)
        self._rng = rng
        self._path = None if state_dir is None else Path(state_dir) / f"{data.name}.state"
        self.memory = self._load() or SiteMemory(program.init(data))

    # -- persistence ---------------------------------------------------------------------------
    def _load(self) -> SiteMemory | None:
        if self._path is None or not self._path.exists():
            return None
        return decode(self._path.read_bytes(), str(self._path))

    def _save(self) -> None:
        if self._path is not None:
            write_bytes_atomically(
                self._path, encode(self.memory), durable=self._durable
            )

    # -- requests ------------------------------------------------------------------------------
    def setup(self) -> SiteSetup:
        return SiteSetup.of(self.data)

    def commit(self, round_: int, accepted: bool) -> None:
        """The coordinator's decision on the upload of ``round_``: keep its state or drop it."""
        m = self.memory
        if m.pending_round != round_:
            return  # already decided, or a decision about an upload this site no longer holds
        if accepted:
            m.earlier, m.earlier_round, m.earlier_channel = m.state, m.committed_round, m.channel
            m.state, m.committed_round, m.channel = m.pending_state, round_, m.pending_channel
        m.pending_round, m.pending_state, m.pending_channel = None, None, None
        self._save()

    def train(self, plan: RoundPlan) -> Upload | Any:
        """The site's upload; under secure aggregation the upload stays here, kept for the
        round's later stages, and the answer is its public keys (:class:`~medfed.comm.secure.SecureReady`)."""
        private_training = self._noise is not None and self.program.training.dp_sgd is not None
        rng = (self._noise if private_training else self._rng).child(plan.round, TRAIN_STREAM, self._key)
        upload, pending = self.program.train(plan, self.data, self.memory.state_before(plan.round), rng)
        codec, channel = self.program.codec, None
        if codec is not None:
            upload, channel = codec.encode(upload, self.memory.channel,
                                           self._rng.child(plan.round, CODEC_STREAM, self._key))
        self.memory.pending_round, self.memory.pending_state = plan.round, pending
        self.memory.pending_channel = channel
        if self.program.secure is not None:
            self.memory.secure, ready = self.program.secure.ready(upload, plan.round)
            self._save()
            return ready
        self._save()
        return upload

    def stage(self, name: str, round_: int, message: Any) -> Any:
        """One secure-aggregation stage of ``round_`` (share, mask, unmask) from the site's slot."""
        from medfed.errors import ConfigError

        if self.program.secure is None:
            raise ConfigError(f"site {self.name!r} runs without secure aggregation; it has no {name!r} stage")
        rng = (self._rng if self._noise is None else self._noise).child(round_, NOISE_STREAM, self._key)
        # the in-ring quantization's dither is the run's, as the codec's is: a deployment equals its simulation
        dither = self._rng.child(round_, CODEC_STREAM, self._key)
        self.memory.secure, answer = self.program.secure.answer(name, self.memory.secure, round_, message, rng,
                                                                dither)
        self._save()
        return answer

    def personalize(self, plan: RoundPlan) -> Params:
        rng = self._rng.child(plan.round, PERSONAL_STREAM, self._key)
        return self.program.personalize(plan, self.data, self.memory.state, rng)
