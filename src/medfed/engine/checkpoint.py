"""The coordinator's checkpoint: everything it needs to continue a run bit-identically.

Written atomically after every round: the :class:`~medfed.engine.protocol.ServerState`
(global model, aggregator and server-optimizer state, next round), the round history, and a
fingerprint of the study so that a checkpoint is never resumed into another one. Selection
and every site's draws are keyed by (round, site), so no generator state needs saving.
Site states are not here: each site keeps its own (:class:`~medfed.engine.runtime.SiteRuntime`).
The file is :mod:`medfed.comm.wire` bytes (never pickle): reading a checkpoint runs no code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medfed.atomic import write_bytes_atomically
from medfed.comm.wire import decode, encode
from medfed.engine.protocol import RoundRecord, ServerState
from medfed.errors import ConfigError
from medfed.wiretypes import wire_type

CHECKPOINT_FILE = "server.checkpoint"


@wire_type
@dataclass(frozen=True)
class Checkpoint:
    state: ServerState
    history: list[RoundRecord]
    fingerprint: str


@dataclass(frozen=True)
class CheckpointStore:
    """A folder holding one run's coordinator checkpoint."""

    folder: Path
    fingerprint: str
    durable: bool = True  # sync to disk (survives a power cut); simulation only needs to survive a kill

    @property
    def path(self) -> Path:
        return Path(self.folder) / CHECKPOINT_FILE

    def load(self) -> Checkpoint | None:
        """The last checkpoint, or None when the run has none yet."""
        if not self.path.exists():
            return None
        try:
            saved = decode(self.path.read_bytes(), str(self.path))
        except Exception as exc:
            raise ConfigError(f"{self.path}: cannot read the checkpoint ({exc}); remove it to start afresh") from exc
        if not isinstance(saved, Checkpoint) or saved.fingerprint != self.fingerprint:
            raise ConfigError(
                f"{self.path} belongs to another study (its config, seed or sites differ); "
                "resume with the study that wrote it, or remove the folder to start afresh"
            )
        return saved

    def save(self, state: ServerState, history: list[RoundRecord]) -> None:
        data = encode(Checkpoint(state, list(history), self.fingerprint))
        write_bytes_atomically(self.path, data, durable=self.durable)
