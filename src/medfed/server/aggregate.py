"""Aggregation as small ``init``/``apply`` transforms over stacked uploads, composed by ``chain``.

The shape follows optax's ``chain``: each step is a pair of pure functions with explicit
state. A value flows through the chain: the :class:`StackedUploads` of a round (leading
site axis), then, after a reducing step such as :func:`weighted_mean`, one aggregated
update, and finally, after :func:`apply_delta` or :func:`gradient_step`, the new global
parameters. Every aggregator is therefore ``init(global_params) -> state`` and
``apply(value, state, global_params, round) -> (value, state, report)``.

A chain's state is a :class:`ChainState`: each step's state under the step's name (optax's
``named_chain``), so a method reads the piece it broadcasts by name
(``state["scaffold_control"]``) wherever the step sits in the chain. A stateful step's state
is a named frozen dataclass registered for the wire (:func:`medfed.wiretypes.wire_type`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from medfed.client.upload import Upload
from medfed.comm.secure import SumTerm
from medfed.errors import ConfigError
from medfed.wiretypes import wire_type


@dataclass(frozen=True, slots=True)
class StackedUploads:
    """One round's uploads with a leading site axis: ``payload[name]`` has shape ``(K, ...)``.

    ``weights`` are the sites' example counts (K,), ``metrics[name]`` a (K,) array and
    ``extras[name]`` the sites' extras stacked the same way (a mapping of arrays, such as a
    control variate in the parameter view, becomes a mapping of stacked arrays).
    """

    sites: tuple[str, ...]
    payload: dict[str, np.ndarray]
    weights: np.ndarray
    kind: str
    metrics: dict[str, np.ndarray]
    extras: dict[str, Any] = field(default_factory=dict)


def stack_uploads(uploads: Sequence[Upload]) -> StackedUploads:
    """Stack a round's uploads; they must agree on kind and parameter names."""
    if not uploads:
        raise ValueError("no uploads to aggregate")
    first = uploads[0]
    for u in uploads[1:]:
        if u.kind != first.kind or u.payload.keys() != first.payload.keys():
            raise ValueError(
                f"upload from {u.site!r} ({u.kind}, {sorted(u.payload)}) does not match "
                f"{first.site!r} ({first.kind}, {sorted(first.payload)})"
            )
    payload = {k: np.array([u.payload[k] for u in uploads]) for k in first.payload}
    metrics = {
        k: np.array([u.metrics.get(k, np.nan) for u in uploads], dtype=np.float64)
        for k in first.metrics
    }
    weights = np.array([u.n_examples for u in uploads], dtype=np.float64)
    extras: dict[str, Any] = {}
    for key, value in first.extras.items():
        if isinstance(value, Mapping):
            extras[key] = {k: np.array([u.extras[key][k] for u in uploads]) for k in value}
        else:
            extras[key] = np.array([u.extras[key] for u in uploads])
    return StackedUploads(tuple(u.site for u in uploads), payload, weights, first.kind, metrics, extras)


def take_sites(stack: StackedUploads, rows: np.ndarray) -> StackedUploads:
    """The stacked uploads of the sites at positions ``rows`` (in that order)."""
    def take(value):
        return {k: v[rows] for k, v in value.items()} if isinstance(value, Mapping) else value[rows]

    return StackedUploads(tuple(stack.sites[i] for i in rows.tolist()), take(stack.payload), stack.weights[rows],
                          stack.kind, take(stack.metrics), {k: take(v) for k, v in stack.extras.items()})


@dataclass(frozen=True, slots=True)
class SummedUploads:
    """One round's uploads as secure aggregation leaves them: only sums over ``sites``.

    ``sums[term.name]`` is the sum of a :class:`~medfed.comm.secure.SumTerm` over the sites
    (a mapping of arrays, or a float), each site weighted by ``n_i / total`` (``examples``) or
    by 1 (``uniform``); ``weight`` is the sum of ``n_i / total``. A step that works on the sum
    reads what it declared (:attr:`Aggregator.sums`)."""

    sites: tuple[str, ...]
    sums: dict[str, Any]
    weight: float
    total: float
    kind: str = "delta"

    def __getitem__(self, term: SumTerm) -> Any:
        return self.sums[term.name]


class Aggregator(NamedTuple):
    """An ``(init, apply)`` pair; ``name`` labels its report in a chain; a chain keeps its
    ``steps`` (so that one can be swapped for another: :func:`replace_step`).

    What the step reads decides whether secure aggregation can serve it: ``reads`` is
    ``"uploads"`` (the stacked individual uploads: median, Krum, ... refused under secure
    aggregation), ``"sum"`` (it also has ``on_sum``, the same step on a :class:`SummedUploads`,
    and declares the ``sums`` it reads) or ``"update"`` (it never sees uploads: an update step
    after the reducing one, a server optimizer, ``apply_delta``)."""

    init: Callable[[Mapping[str, np.ndarray]], Any]
    apply: Callable[[Any, Any, Mapping[str, np.ndarray], int], tuple[Any, Any, dict | None]]
    name: str
    steps: tuple = ()
    reads: str = "uploads"
    on_sum: Callable | None = None
    sums: tuple[SumTerm, ...] = ()


def needs_uploads(aggregator: Aggregator) -> list[str]:
    """The steps of a chain (or the one step) that read individual uploads: what secure
    aggregation cannot serve."""
    steps = aggregator.steps or (aggregator,)
    return [s.name for s in steps if s.reads == "uploads"]


def summed_terms(aggregator: Aggregator) -> tuple[SumTerm, ...]:
    """Every sum the chain's steps read, in chain order."""
    return tuple(t for s in (aggregator.steps or (aggregator,)) for t in s.sums)


def replace_step(aggregator: Aggregator, name: str, step: Aggregator) -> Aggregator:
    """The chain with its step ``name`` replaced by ``step`` (differential privacy swaps the mean
    for a noised one); a ConfigError when the chain has no such step."""
    if not any(s.name == name for s in aggregator.steps):
        raise ConfigError(f"the aggregation {aggregator.name} has no step {name!r} to replace")
    return chain(*(step if s.name == name else s for s in aggregator.steps))


def _stateless_init(global_params: Mapping[str, np.ndarray]) -> None:
    return None


def weighted_mean() -> Aggregator:
    """Example-weighted mean of the stacked payloads (McMahan et al., 2017).

    Weights are ``n_k / sum(n)``, so they sum to one and the result does not depend on the
    order of the sites.
    """

    def apply(stack: StackedUploads, state, global_params, round_):
        w = stack.weights / stack.weights.sum()
        mean = {k: (w @ v.reshape(len(w), -1)).reshape(v.shape[1:]) for k, v in stack.payload.items()}
        return mean, state, None

    def on_sum(summed: SummedUploads, state, global_params, round_):
        return {k: v / summed.weight for k, v in summed[WEIGHTED_UPDATE].items()}, state, None

    return Aggregator(_stateless_init, apply, "weighted_mean", reads="sum", on_sum=on_sum, sums=(WEIGHTED_UPDATE,))


WEIGHTED_UPDATE = SumTerm("payload")  # sum of n_i / N * x_i: the weighted mean's numerator


def apply_delta(lr: float = 1.0) -> Aggregator:
    """New global = global + lr * aggregated delta (lr = 1 is plain FedAvg).

    Parameters the update does not name (kept private by the sites) stay as they were.
    """

    def apply(update, state, global_params, round_):
        return {k: global_params[k] + lr * update[k] if k in update else global_params[k] for k in global_params}, state, None

    return Aggregator(_stateless_init, apply, "apply_delta", reads="update")


def gradient_step(lr: float) -> Aggregator:
    """New global = global - lr * aggregated gradient: the server's step in FedSGD."""

    def apply(update, state, global_params, round_):
        return {k: global_params[k] - lr * update[k] if k in update else global_params[k] for k in global_params}, state, None

    return Aggregator(_stateless_init, apply, "gradient_step", reads="update")


@wire_type
@dataclass(frozen=True)
class ChainState(Mapping):
    """A chain's state: ``steps[name]`` is the state of the chain's step of that name (None for
    a stateless step), in chain order. Read it as a mapping: ``state["scaffold_control"]``."""

    steps: dict[str, Any]

    def __getitem__(self, name: str) -> Any:
        if name not in self.steps:
            raise KeyError(f"the chain has no step {name!r}; its steps: {', '.join(self.steps)}")
        return self.steps[name]

    def __iter__(self):
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)


def step_names(names: Sequence[str]) -> tuple[str, ...]:
    """Unique names for a chain's steps: a name that repeats gets ``_2``, ``_3``, ... from its
    second use on, in chain order (``server_momentum, server_momentum_2``), so the same list of
    steps always gives the same names. A suffixed name that another step already carries is refused."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    clash = sorted({n for n in out if out.count(n) > 1})
    if clash:
        raise ConfigError(f"chain: steps {list(names)} cannot be named apart ({clash} would name two steps)")
    return tuple(out)


def chain(*steps: Aggregator) -> Aggregator:
    """Compose steps left to right. The state is a :class:`ChainState` and the report maps a
    step's name to its report, both keyed by :func:`step_names`."""
    names = step_names([s.name for s in steps])

    def init(global_params):
        return ChainState({name: step.init(global_params) for name, step in zip(names, steps)})

    def apply(value, state: ChainState, global_params, round_):
        if tuple(state) != names:  # e.g. a checkpoint written by another method
            raise ConfigError(f"chain state has the steps {list(state)}; this chain's are {list(names)}")
        new_state = {}
        report: dict | None = None
        for name, step in zip(names, steps):
            apply = step.apply
            if isinstance(value, SummedUploads) and step.reads != "update":
                if step.on_sum is None:  # the build-time check (needs_uploads) refuses this first
                    raise ConfigError(f"step {name!r} reads individual uploads; secure aggregation gives it their sum")
                apply = step.on_sum
            value, new_state[name], step_report = apply(value, state[name], global_params, round_)
            if step_report:
                report = report or {}
                report[name] = step_report
        return value, ChainState(new_state), report

    return Aggregator(init, apply, "chain(" + ", ".join(names) + ")", tuple(steps),
                      reads="uploads" if any(s.reads == "uploads" for s in steps) else "sum")
