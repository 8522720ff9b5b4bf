"""The coordinator's loop: configure → executor → aggregate → commit → checkpoint.

The driver holds the server program's state and the history; the executor alone knows
where the sites are. After every round the sites hear which uploads were used (their state
advances only then), and with a checkpoint store the driver saves everything it needs to
continue: a restarted driver (``--resume``) picks up after the last saved round and ends
bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medfed.engine.checkpoint import CheckpointStore
from medfed.engine.executors import Executor
from medfed.engine.secure import secure_sum
from medfed.engine.protocol import (
    RoundContext,
    RoundRecord,
    ServerProgram,
    SiteSetup,
    decisions,
)
from medfed.rng import KeyedRng


@dataclass
class FederatedRun:
    """A finished run: the final global model, the round history, and, in simulation, what
    the sites hold at the end (their states and personal models), which the harness evaluates."""

    params: dict[str, np.ndarray]
    history: list[RoundRecord]
    client_states: dict[str, Any] = field(default_factory=dict)
    server_state: Any = None
    personal: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    private: tuple[str, ...] = ()  # parameters that never left the sites (the method's sharing policy)
    pretraining: tuple[RoundRecord, ...] = ()  # the rounds of a pretraining phase run before this one (contrastive)

    @property
    def train_loss(self) -> np.ndarray:
        return np.array([r.train_loss for r in self.history])


@dataclass
class Driver:
    server: ServerProgram
    executor: Executor
    rounds: int
    rng: KeyedRng
    personal: bool = False
    evaluate: Callable[[Mapping[str, np.ndarray]], dict] | None = None
    eval_every: int = 0
    checkpoints: CheckpointStore | None = None
    observe: Callable[[RoundRecord], None] | None = None  # told of every finished round (a status file)

    def run(self, init_params: Mapping[str, np.ndarray], setup: Mapping[str, SiteSetup] | None = None) -> FederatedRun:
        """Run the rounds left (all of them, or those after the last checkpoint)."""
        saved = self.checkpoints.load() if self.checkpoints is not None else None
        if saved is not None:
            state, history = saved.state, list(saved.history)
            if history:  # the sites may not have heard the last saved round's decisions before the crash
                self.executor.commit(history[-1].round, decisions(history[-1]))
        else:
            state, history = self.server.init(init_params, setup), []
        server, executor, rng = self.server, self.executor, self.rng
        everyone = server.sites
        while state.round < self.rounds:
            r = state.round
            plan = server.configure(state, RoundContext(r, everyone, rng))
            replies = executor.train(plan)
            if server.secure is not None:  # the masked exchange: the server ends with the sum only
                replies = secure_sum(server.secure, r, replies, server.layout(state, plan), executor.stage, rng)
            state, record = server.aggregate(state, replies, RoundContext(r, plan.cohort, rng))
            executor.commit(r, decisions(record))
            if self.evaluate is not None and self.eval_every and ((r + 1) % self.eval_every == 0 or r == self.rounds - 1):
                record = dataclasses.replace(record, evaluation=self.evaluate(state.params))
            history.append(record)
            if self.checkpoints is not None:
                self.checkpoints.save(state, history)
            if self.observe is not None:
                self.observe(record)
        personal = {}
        if self.personal:
            final = server.configure(state, RoundContext(self.rounds, everyone, rng), final=True)
            personal = executor.personalize(final)
        kept = server.algorithm.private
        private = tuple(k for k in state.params if kept is not None and kept(k))
        return FederatedRun(state.params, history, executor.site_states(), state.aggregator, personal, private)
