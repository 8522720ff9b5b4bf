"""Server-end weighting and filtering of the round's updates (survey §3.3).

Reducing steps (:class:`~medfed.server.aggregate.StackedUploads` → one aggregated update):
:func:`loss_weighted` (Li et al., 2022), :func:`fair` (q-FFL; Li et al., 2020; Hosseini et
al., 2023) and :func:`guided` (Fan et al., 2021). PFA's step is :mod:`medfed.server.fourier`.
Each is vectorized over the site axis and does not depend on the order of the sites in the
stack.
"""

from __future__ import annotations

import numpy as np

from medfed.errors import ConfigError, DataError
from medfed.server.aggregate import Aggregator, StackedUploads

FAIR_WEIGHTINGS = ("examples", "uniform")


def _stateless_init(global_params) -> None:
    return None


def _combine(stack: StackedUploads, w: np.ndarray) -> dict[str, np.ndarray]:
    """``Σ_k w_k · payload_k`` per parameter, computed as :func:`weighted_mean` computes it so
    that equal weights give bit-identical results."""
    return {k: (w @ v.reshape(len(w), -1)).reshape(v.shape[1:]) for k, v in stack.payload.items()}


def _site_losses(stack: StackedUploads, method: str) -> np.ndarray:
    if "loss" not in stack.metrics:
        raise DataError(f"{method} needs each site's training loss (metrics['loss']); the uploads carry none")
    loss = np.asarray(stack.metrics["loss"], dtype=np.float64)
    bad = [s for s, x in zip(stack.sites, loss) if not np.isfinite(x)]
    if bad:
        raise DataError(f"{method} needs a finite training loss from every site; missing or not finite for {bad}")
    return loss


LOSS_WEIGHTED_TEMPERATURE = 0.1


def loss_weighted(temperature: float = LOSS_WEIGHTED_TEMPERATURE) -> Aggregator:
    """Loss-weighted aggregation (Li et al., 2022): sites whose training loss at the global
    model is worse get a smaller weight, ``w_k ∝ n_k · exp(−loss_k / temperature)``.

    The exponent is shifted by the smallest loss before ``exp`` (softmax's stabilization,
    the shift cancels in the normalization), so no term overflows and equal losses give
    exactly the example weights of :func:`~medfed.server.aggregate.weighted_mean`. The
    report maps each site to its weight. Works on any upload kind.

    The default temperature, 0.1, was chosen by measurement (3 repeats, default training,
    temperatures 1, 0.3, 0.1, 0.05, 0.03, 0.01): the sites' log losses differ by a few
    hundredths to tenths, so at the former default 1 the weights were the example weights to
    within 0.008 on adni-like (largest ratio of two sites' weight per example: 1.03; ACC and
    AUC equal to FedAvg's, 0.888 / 0.949), 0.013 on breast-cancer Dirichlet α = 0.1 over 5
    sites (ratio 1.11) and 0.020 on heart-disease (1.22): FedAvg in practice. 0.1 is the
    largest of those temperatures at which, on every one of these data sets, some round gives
    one site at least twice another's weight per example (ratio 2.3 adni-like, 5.6 and 4.9
    breast-cancer α = 0.1 / 0.5, 403 heart-disease; mean over rounds of the largest
    ``|w_k − n_k/n|`` 0.08, 0.13, 0.13, 0.29) without handing the round to one site as 0.05
    and below do (ratios 36 to 8·10^6). What it changes against FedAvg (means over the test
    sites): ACC 0.880 vs 0.888 and AUC 0.946 vs 0.949 on adni-like, ACC 0.964 vs 0.973 (AUC
    0.992 both) on breast-cancer α = 0.1, ACC 0.740 vs 0.795 (AUC 0.807 vs 0.810) on
    heart-disease. The weights depend on the loss's scale, so another model or loss may want
    another temperature.
    """
    def apply(stack: StackedUploads, state, global_params, round_):
        loss = _site_losses(stack, "loss_weighted")
        u = stack.weights * np.exp(-(loss - loss.min()) / temperature)
        w = u / u.sum()
        return _combine(stack, w), state, {s: float(x) for s, x in zip(stack.sites, w)}

    return Aggregator(_stateless_init, apply, "loss_weighted")


def fair(
    q: float = 1.0,
    lr: float = 0.1,
    weighting: str = "examples",
    loss_offset: float = 0.0,
) -> Aggregator:
    """q-FFL / q-FedAvg's server step (Li et al., 2020; in medical FL, Hosseini et al., 2023):
    sites where the global model has a higher loss weigh more, by ``F_k^q``.

    With ``L = 1/lr``, ``Δw_k = L(w − w̄_k) = −L · delta_k``, ``Δ_k = F_k^q Δw_k`` and
    ``h_k = q F_k^(q−1) ‖Δw_k‖² + L F_k^q`` (``F_k`` = ``metrics["loss"]`` + ``loss_offset``,
    the site's training loss at the global model), the new model is
    ``w − Σ_k p_k Δ_k / Σ_k p_k h_k``; this step returns that minus ``w`` (an aggregated
    delta for :func:`~medfed.server.aggregate.apply_delta`). Only ``delta`` uploads are accepted.

    ``weighting="examples"`` takes ``p_k = n_k / n``, so ``q = 0`` is FedAvg's weighted mean.
    ``weighting="uniform"`` takes ``p_k = 1/K`` as the paper's q-FedAvg does for sites sampled
    in proportion to their data, and as Flower's ``QFedAvg`` does. Flower's ``QFedAvg`` further
    differs: it uses ONE loss for every site (the server's ``evaluate_fn`` on the global model)
    rather than each site's own, and adds 1e-10 to it (``loss_offset=1e-10`` here). Flower's
    default ``q_param`` is 0.2. The report maps each site to its effective coefficient ``c_k``
    in ``Σ_k c_k delta_k`` (``c_k = L p_k F_k^q / Σ_j p_j h_j``; not normalized to one).

    A zero loss with ``0 < q < 1`` makes ``h_k`` infinite and is refused (use ``loss_offset``);
    if every ``p_k h_k`` is zero (all losses zero) the step is zero.
    """
    def apply(stack: StackedUploads, state, global_params, round_):
        if stack.kind != "delta":
            raise ConfigError(f"fair aggregates 'delta' uploads (local − global); got {stack.kind!r} uploads")
        F = _site_losses(stack, "fair") + loss_offset
        negative = [s for s, x in zip(stack.sites, F) if x < 0]
        if negative:
            raise DataError(f"fair needs non-negative losses (F_k^q); negative for {negative}")
        K = len(stack.sites)
        p = stack.weights / stack.weights.sum() if weighting == "examples" else np.full(K, 1.0 / K)
        # ‖Δw_k‖² / L = ‖delta_k‖² / lr: dividing h_k by L keeps q = 0 free of 1/lr · lr rounding.
        sq = sum(np.einsum("ki,ki->k", v.reshape(K, -1), v.reshape(K, -1)) for v in stack.payload.values())
        Fq = np.float_power(F, q)
        if q == 0:
            h = Fq  # q · F^(q−1) · ‖Δw‖² vanishes; skipping it avoids 0 · inf at F = 0
        else:
            if q < 1 and np.any((F == 0) & (sq > 0)):
                zero = [s for s, f in zip(stack.sites, F) if f == 0]
                raise DataError(
                    f"fair with 0 < q < 1 needs positive losses (F_k^(q-1) is infinite at 0); zero for {zero}; "
                    "set loss_offset > 0 (Flower uses 1e-10)"
                )
            with np.errstate(divide="ignore", invalid="ignore"):
                first = np.where(sq > 0, q * np.float_power(F, q - 1) * sq / lr, 0.0)
            h = first + Fq
        denominator = p @ h
        c = p * Fq / denominator if denominator > 0 else np.zeros(K)
        return _combine(stack, c), state, {s: float(x) for s, x in zip(stack.sites, c)}

    return Aggregator(_stateless_init, apply, "fair")


GUIDED_RULES = ("agreement", "positive")


def guided(rule: str = "agreement", agreement: float = 1.0) -> Aggregator:
    """Guided aggregation (Fan et al., 2021): of the example-weighted mean of the sites'
    updates, apply only the components the sites' own updates agree with.

    The survey (Guan & Liu, §3.3) says "only positive values of the aggregated weights are used
    to update the global", after guided backpropagation (Springenberg et al., 2015), which lets
    only positive gradient signals through. Read literally (``rule="positive"``: the positive
    part of the averaged delta) the rule is not sign-symmetric: a parameter can only grow from
    its initial value, so a logistic model started at 0 never learns a negative coefficient
    (adni-like, 2 repeats, ADNI-1 / ADNI-2: ACC 0.459 / 0.507, AUC 0.466 / 0.514, where FedAvg
    gets 0.890 / 0.896 and 0.945 / 0.950, and this default 0.866 / 0.910 and 0.948 / 0.952;
    breast-cancer Dirichlet α = 0.5 over 5 sites: within 0.06 ACC of FedAvg). The reading built by
    default (``rule="agreement"``) keeps guided backpropagation's rule — pass a signal only
    where it is positive — and applies it to each site's contribution along the aggregated
    direction: component ``i`` of the mean ``m`` is applied where the example-weighted share of
    sites with ``delta_k,i · m_i < 0`` (sites opposing it) is at most ``1 − agreement``, and set
    to zero elsewhere. Every site's update counts, so the step reduces the stacked uploads
    itself (it is a reducing step, not an update→update step).

    Consequences: ``agreement = 1`` (the default) applies a component only if no site opposes
    it (the AND-mask of Parascandolo et al., 2021); ``agreement = 0`` is
    :func:`~medfed.server.aggregate.weighted_mean` exactly; one site is FedAvg. Parameters move
    either way, so any sign can be learned, but a component the sites keep disagreeing on
    stays where it is (on very heterogeneous sites, parameters can stay near their start).
    The Fan et al. paper's own text was not available to us: this is our reading of the
    survey's sentence and of guided backpropagation's intent, not a transcription.

    ``delta`` and ``gradient`` uploads are accepted (agreement is sign-symmetric); ``params``
    are refused (the signs of parameters say nothing about a direction). With
    ``rule="positive"`` on ``gradient`` uploads the positive gradient part is kept, so
    parameters only shrink. The report gives the fraction of components applied.
    """
    # the opposing share is a sum of example weights: allow its rounding error at the threshold
    allowed = 1.0 - float(agreement) + 1e-12

    def apply(stack: StackedUploads, state, global_params, round_):
        if stack.kind == "params":
            raise ConfigError("guided aggregates 'delta' or 'gradient' uploads, not 'params'")
        w = stack.weights / stack.weights.sum()
        mean = _combine(stack, w)
        if rule == "positive":
            keep = {k: m > 0 for k, m in mean.items()}
        else:
            keep = {k: np.tensordot(w, stack.payload[k] * m < 0, axes=1) <= allowed for k, m in mean.items()}
        out = {k: np.where(keep[k], m, 0.0) for k, m in mean.items()}
        total = sum(np.size(m) for m in mean.values())
        applied = sum(int(np.count_nonzero(keep[k] & (m != 0))) for k, m in mean.items())
        return out, state, {"kept_fraction": applied / total if total else 0.0}

    return Aggregator(_stateless_init, apply, "guided")
