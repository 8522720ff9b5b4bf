"""Server optimizers (survey §3.3): update→update steps that turn the round's aggregated
delta into the step the server applies, with momentum or adaptive scaling kept in state.

Each step sits between a reducing step and :func:`~medfed.server.aggregate.apply_delta`::

    fedavgm = chain(weighted_mean(), server_momentum(lr=1.0, momentum=0.9), apply_delta())
    fedadam = chain(weighted_mean(), server_adam(), apply_delta())

The input is the aggregated delta ``Δ_t`` (mean of local − global; Reddi et al. call it the
pseudo-gradient's negative), the output the step to add to the global model. State (the
first and second moments and the step count: :class:`MomentumState`, :class:`AdaptiveState`)
is created by ``init``, returned by ``apply`` and never mutated in place.

The definitions follow Flower 1.42's strategies (``FedAvgM``, ``FedAdam``, ``FedYogi``,
``FedAdagrad``) exactly, defaults included; ``tests/test_flower_agreement_optimizers.py``
checks agreement to 1e-12. Where Flower departs from the papers, the factory says so and
offers the paper's variant as an option.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from medfed.server.aggregate import Aggregator
from medfed.wiretypes import wire_type

# server_adam's choices; the allowed values of every hyperparameter here are declared, and
# checked once, with the steps' options in medfed.methods.steps
BIAS_CORRECTIONS = ("flower", "kingma", "none")


def _zeros(global_params: Mapping[str, np.ndarray], fill: float = 0.0) -> dict[str, np.ndarray]:
    return {k: np.full(np.shape(v), fill, dtype=np.float64) for k, v in global_params.items()}


@wire_type
@dataclass(frozen=True)
class MomentumState:
    """FedAvgM's server state: the momentum buffer ``m`` in the parameter view."""

    momentum: dict[str, np.ndarray]


@wire_type
@dataclass(frozen=True)
class AdaptiveState:
    """FedAdam / FedYogi / FedAdagrad's server state (optax's ``ScaleByAdamState``): the first
    and second moments ``m``, ``v`` in the parameter view and ``step``, the steps taken."""

    m: dict[str, np.ndarray]
    v: dict[str, np.ndarray]
    step: int


def server_momentum(lr: float = 1.0, momentum: float = 0.0) -> Aggregator:
    """FedAvgM: server SGD with heavy-ball momentum on the averaged delta (Hsu et al., 2019).

    Changes FedAvg's server step from ``Δ_t`` to ``lr · m_t`` with ``m_t = momentum · m_{t-1}
    + Δ_t`` and ``m_0 = 0``, so round 1 steps ``lr · Δ_1``: the same as Flower's ``FedAvgM``,
    which starts the momentum buffer at the first pseudo-gradient (PyTorch's SGD convention).
    ``lr = 1, momentum = 0`` is FedAvg exactly (``0 · m + Δ`` is ``Δ`` bit for bit).
    Defaults are Flower's (``server_learning_rate=1.0, server_momentum=0.0``).
    """
    def init(global_params):
        return MomentumState(_zeros(global_params))

    def apply(update, state: MomentumState, global_params, round_):
        m = {k: momentum * state.momentum[k] + update[k] for k in update}
        return {k: lr * m[k] for k in m}, MomentumState(m), None

    return Aggregator(init, apply, "server_momentum", reads="update")


def _adaptive(name: str, lr: float, beta1: float, second_moment, tau: float, initial_v: float,
              bias_correction: str, beta2: float) -> Aggregator:
    """Reddi et al.'s FedOpt template: ``m_t = β1 m_{t-1} + (1 − β1) Δ_t``; ``v_t`` by the
    given rule; step ``η_t · m_t / (√v_t + τ)``."""
    def init(global_params):
        return AdaptiveState(_zeros(global_params), _zeros(global_params, initial_v), 0)

    def apply(update, state: AdaptiveState, global_params, round_):
        t = state.step + 1
        m = {k: beta1 * state.m[k] + (1 - beta1) * update[k] for k in update}
        v = {k: second_moment(state.v[k], update[k]) for k in update}
        if bias_correction == "none":
            eta = lr
        else:
            # Flower evaluates Kingma & Ba's α_t at its 1-based round + 1 (see server_adam).
            e = t + 1.0 if bias_correction == "flower" else float(t)
            eta = lr * np.sqrt(1 - np.power(beta2, e)) / (1 - np.power(beta1, e))
        step = {k: eta * m[k] / (np.sqrt(v[k]) + tau) for k in m}
        return step, AdaptiveState(m, v, t), None

    return Aggregator(init, apply, name, reads="update")


def server_adam(
    lr: float = 0.1,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-9,
    bias_correction: str = "flower",
    initial_v: float = 0.0,
) -> Aggregator:
    """FedAdam: Adam on the averaged delta at the server (Reddi et al., 2021).

    Replaces FedAvg's step ``Δ_t`` by ``η_t · m_t / (√v_t + τ)`` with
    ``v_t = β2 v_{t-1} + (1 − β2) Δ_t²``; ``m`` and ``v`` start at 0 as in Flower's ``FedAdam``.

    Differences between Flower 1.42 and the papers, and the options that pick either:

    - ``bias_correction="flower"`` (default): ``η_t = lr · √(1 − β2^(t+1)) / (1 − β1^(t+1))``
      with ``t`` the 1-based step, as Flower computes it from ``server_round + 1``. Kingma &
      Ba (2014) use exponent ``t`` (``"kingma"``, which makes round 1 a step of ``lr · sign(Δ)``);
      Reddi et al.'s Algorithm 2 has no bias correction (``"none"``). Flower's form is Kingma's
      correction shifted by one round, i.e. an extra early-round damping of the server learning
      rate (0.74 of Kingma's at t = 1, → 1 as t grows), a legitimate η_t schedule, so it is the
      default to keep results comparable with Flower.
    - ``initial_v=0.0`` (default, Flower): Reddi et al. initialize ``v_{-1} ≥ τ²``; pass
      ``initial_v=tau**2`` for the paper's choice. ``τ > 0`` keeps the step finite either way.

    ``t`` counts this aggregator's own steps, not the engine's round index, so rounds the
    engine skips (too few valid uploads) do not advance the correction. Defaults are Flower's.
    """

    def second_moment(v, d):
        return beta2 * v + (1 - beta2) * np.multiply(d, d)

    return _adaptive("server_adam", lr, beta1, second_moment, tau, initial_v, bias_correction, beta2)


def server_yogi(
    lr: float = 0.01,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
    initial_v: float = 0.0,
) -> Aggregator:
    """FedYogi: Yogi on the averaged delta at the server (Reddi et al., 2021).

    Like FedAdam but the second moment grows additively:
    ``v_t = v_{t-1} − (1 − β2) Δ_t² · sign(v_{t-1} − Δ_t²)``, and no bias correction (as in
    both the paper and Flower's ``FedYogi``). ``m`` and ``v`` start at 0 as in Flower; the
    paper's ``v_{-1} ≥ τ²`` is ``initial_v=tau**2``. Defaults are Flower's.
    """

    def second_moment(v, d):
        d2 = np.multiply(d, d)
        return v - (1.0 - beta2) * d2 * np.sign(v - d2)

    return _adaptive("server_yogi", lr, beta1, second_moment, tau, initial_v, "none", beta2)


def server_adagrad(
    lr: float = 0.1,
    tau: float = 1e-9,
    beta1: float = 0.0,
    initial_v: float = 0.0,
) -> Aggregator:
    """FedAdagrad: Adagrad on the averaged delta at the server (Reddi et al., 2021).

    Replaces FedAvg's step ``Δ_t`` by ``lr · m_t / (√v_t + τ)`` with the accumulated
    ``v_t = v_{t-1} + Δ_t²`` and no bias correction. Flower's ``FedAdagrad`` fixes ``β1 = 0``
    (so ``m_t = Δ_t``) and exposes only ``eta`` and ``tau``; Reddi et al.'s Algorithm 2 keeps
    a first moment with ``β1`` for FedAdagrad too, available here as ``beta1`` (default 0,
    Flower's). ``v`` starts at 0 (Flower); the paper's ``v_{-1} ≥ τ²`` is ``initial_v=tau**2``.
    """

    def second_moment(v, d):
        return v + np.multiply(d, d)

    return _adaptive("server_adagrad", lr, beta1, second_moment, tau, initial_v, "none", 0.0)
