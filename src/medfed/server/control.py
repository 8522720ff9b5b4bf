"""Server steps that keep what the server sends back down to the sites (survey §3.2 client end).

Some client-end methods need the server to hold a small piece of state and broadcast it
with the global model: SCAFFOLD's control variate, the federation's label distribution
(FedSLD), the semi-synchronous round's time budget. Each is an :class:`Aggregator` step that
reads the round's stacked uploads (their ``extras`` or ``metrics``), updates its state and
passes the stack on unchanged to the reducing step; the method's ``broadcast`` reads the
step's state from the chain's by the step's name (``state["scaffold_control"]``). The step
must come before the reducing step, which consumes the stack.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from medfed.comm.secure import SumTerm
from medfed.errors import ConfigError
from medfed.server.aggregate import Aggregator, StackedUploads, SummedUploads
from medfed.wiretypes import wire_type


def _needs(stack: StackedUploads, source: str, key: str, step: str) -> None:
    table = stack.extras if source == "extras" else stack.metrics
    if key not in table:
        raise ConfigError(f"{step} needs every site to upload {source} {key!r}; this round's uploads have {sorted(table)}")


SCAFFOLD_WEIGHTINGS = ("examples", "uniform")


@wire_type
@dataclass(frozen=True)
class ControlState:
    """SCAFFOLD's server state: ``weighted_sum = sum_i w_i c_i`` over the sites whose control
    deltas the server accepted (a site that never took part has ``c_i = 0``), and ``weights``,
    each known site's ``w_i``. The server control variate is their ratio, :attr:`control`."""

    weighted_sum: dict[str, np.ndarray]
    weights: dict[str, float]

    @property
    def control(self) -> dict[str, np.ndarray]:
        """``c = sum_i w_i c_i / sum_i w_i`` (zero while no site is known)."""
        total = sum(self.weights.values())  # whole numbers: exact in any order
        if not total:
            return dict(self.weighted_sum)
        return {k: v / total for k, v in self.weighted_sum.items()}


def scaffold_control(site_weights: Mapping[str, float] | None = None, weighting: str = "examples") -> Aggregator:
    """SCAFFOLD's server control variate (Karimireddy et al., 2020), ``c = sum_i w_i c_i / sum_i w_i``.

    Sites upload only ``extras["control_delta"]`` (their ``c_i+ - c_i``); the server adds
    ``w_i dc_i`` for every accepted upload, so ``c`` stays the weighted mean of all N sites'
    ``c_i`` under partial participation (the paper's ``c <- c + (|S|/N) mean(dc_i)`` when every
    ``w_i`` is 1). At SCAFFOLD's fixed point each ``c_i`` is site i's gradient and ``c`` is 0,
    so the model it converges to minimizes ``sum_i w_i f_i``:

    - ``weighting="examples"`` (the default): ``w_i = n_i``, the federation's objective (the
      pooled rows' mean loss), the one FedAvg and the reported training loss weigh by.
    - ``weighting="uniform"``: ``w_i = 1``, every site's loss counts the same (the paper).

    ``site_weights`` (site -> ``w_i``, from the setup exchange: example counts, or 1 per site)
    makes ``c`` exact from the first round; a site it does not name weighs the ``n_examples``
    of its first accepted upload (or 1), learnt then, so ``c`` is the mean over the sites
    seen so far until every site has taken part. The stack passes through unchanged.
    """
    known = {site: float(w) for site, w in (site_weights or {}).items()}
    bad = [site for site, w in known.items() if not (np.isfinite(w) and w > 0)]
    if bad:
        raise ConfigError(f"scaffold_control: site weights must be positive numbers; not for {bad}")

    def init(global_params):
        zeros = {k: np.zeros_like(np.asarray(v, dtype=np.float64)) for k, v in global_params.items()}
        return ControlState(zeros, dict(known))

    def apply(stack: StackedUploads, state: ControlState, global_params, round_):
        _needs(stack, "extras", "control_delta", "scaffold_control")
        weights = dict(state.weights)
        for site, n in zip(stack.sites, stack.weights):
            if known and site not in known:
                raise ConfigError(
                    f"scaffold_control knows the sites {', '.join(sorted(known))}; {site!r} is not one of them"
                )
            weights.setdefault(site, float(n) if weighting == "examples" else 1.0)
        w = np.array([weights[site] for site in stack.sites])
        deltas = stack.extras["control_delta"]
        total = {k: state.weighted_sum[k] + np.tensordot(w, deltas[k], axes=1) for k in state.weighted_sum}
        return stack, ControlState(total, weights), None

    # under secure aggregation: the sum of w_i dc_i arrives whole (w_i = n_i: the sum of n_i / N dc_i, times N);
    # every site's w_i must then be known from the setup exchange, not learnt from its upload
    term = SumTerm("extras", "control_delta", weighting)

    def on_sum(summed: SummedUploads, state: ControlState, global_params, round_):
        unknown = [site for site in summed.sites if site not in state.weights]
        if unknown:
            raise ConfigError(f"scaffold_control under secure aggregation needs every site's weight from setup; "
                              f"not for {unknown}")
        factor = summed.total if weighting == "examples" else 1.0
        delta = summed[term]
        total = {k: state.weighted_sum[k] + factor * delta[k] for k in state.weighted_sum}
        return summed, ControlState(total, state.weights), None

    return Aggregator(init, apply, "scaffold_control", reads="sum", on_sum=on_sum, sums=(term,))


def site_mean() -> Aggregator:
    """Plain mean of the stacked payloads, every site weighing 1 (SCAFFOLD's server average
    with ``weighting="uniform"``, as in the paper).

    Does not depend on the order of the sites; equals :func:`weighted_mean` when all sites
    hold the same number of examples.
    """

    def apply(stack: StackedUploads, state, global_params, round_):
        return {k: v.mean(axis=0) for k, v in stack.payload.items()}, state, None

    def on_sum(summed: SummedUploads, state, global_params, round_):
        return {k: v / len(summed.sites) for k, v in summed[UNIFORM_UPDATE].items()}, state, None

    return Aggregator(lambda global_params: None, apply, "site_mean", reads="sum", on_sum=on_sum,
                      sums=(UNIFORM_UPDATE,))


UNIFORM_UPDATE = SumTerm("payload", weighting="uniform")  # sum of the sites' updates, each weighing 1


@wire_type
@dataclass(frozen=True)
class LabelCountsState:
    """FedSLD's server state: ``counts[site]``, the latest label counts the site uploaded (or
    was known by at setup)."""

    counts: dict[str, np.ndarray]


def label_distribution(known: Mapping[str, np.ndarray] | None = None) -> Aggregator:
    """Collects the sites' label counts for FedSLD (Luo & Wu, 2022).

    State: a :class:`LabelCountsState`, the latest counts each site uploaded in ``extras["label_counts"]``
    (so a site counted once however often it takes part). :func:`federation_label_prior`
    turns its ``counts`` into the federation's label distribution, which the server broadcasts. The
    paper assumes the federation's counts are known before training: ``known`` (site ->
    counts, exchanged at setup) gives them for the first round too.
    """
    initial = {site: np.asarray(c, dtype=np.float64) for site, c in (known or {}).items()}

    def apply(stack: StackedUploads, state: LabelCountsState, global_params, round_):
        _needs(stack, "extras", "label_counts", "label_distribution")
        table = dict(state.counts)
        for site, counts in zip(stack.sites, stack.extras["label_counts"]):
            table[site] = np.asarray(counts, dtype=np.float64)
        return stack, LabelCountsState(table), None

    return Aggregator(lambda global_params: LabelCountsState(dict(initial)), apply, "label_distribution")


def federation_label_prior(table: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The federation's label distribution from ``{site: counts}``; ``None`` before any site reported.

    Counts are whole numbers, so their sum is exact in any order of the sites.
    """
    if not table:
        return None
    total = np.sum([table[s] for s in sorted(table)], axis=0)
    return total / total.sum()


@wire_type
@dataclass(frozen=True)
class TimeBudgetState:
    """The semi-synchronous server's state: this round's ``budget`` in seconds (None until the
    sites' times are known) and ``sync_seconds[site]``, the time each site last reported for
    the synchronous number of local steps."""

    budget: float | None
    sync_seconds: dict[str, float]


def time_budget(budget: float = 0.0) -> Aggregator:
    """The semi-synchronous round's time budget (Stripelis et al., 2021).

    State: a :class:`TimeBudgetState`. A positive ``budget`` (seconds) is fixed; ``0``
    means the time the slowest site known so far needs for the synchronous number of local
    steps, learned from the ``sync_seconds`` each site reports in its metrics (so it is
    ``None``, and sites run the synchronous steps, until the first round's reports are in).
    The report maps each site to the local steps it ran this round.
    """
    def init(global_params):
        return TimeBudgetState(float(budget) if budget > 0 else None, {})

    def apply(stack: StackedUploads, state: TimeBudgetState, global_params, round_):
        _needs(stack, "metrics", "sync_seconds", "time_budget")
        current, table = state.budget, dict(state.sync_seconds)
        for site, seconds in zip(stack.sites, stack.metrics["sync_seconds"]):
            table[site] = float(seconds)
        if budget == 0:
            current = max(table.values())
        report = None
        if "local_steps" in stack.metrics:
            report = {site: float(s) for site, s in zip(stack.sites, stack.metrics["local_steps"])}
        return stack, TimeBudgetState(current, table), report

    return Aggregator(init, apply, "time_budget")
