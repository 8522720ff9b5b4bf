"""The local optimizer: a site's gradient steps, composed of small pieces around a model's session.

A model opens a *session* on a site's rows from the parameters the site received
(``model.session(params, X, y)``, a context manager): it holds the parameters being trained
(``values``; torch keeps its tensors on the device between steps) and gives the data-term
gradient of a batch (``gradient``) or the rows' own gradients (``example_gradients``, for
DP-SGD in :mod:`medfed.client.dp_sgd`). Everything else is here, one step at a time::

    data gradient  ->  [DP-SGD: per-example clip, noise]  ->  + L2  ->  + proximal  ->  + correction  ->  update

- L2: ``l2 * theta`` on the parameters the session names as penalized (weights, not biases
  or normalization parameters);
- proximal: FedProx's ``mu * (theta - center)`` (Li et al., 2020);
- correction: a constant added to every step, SCAFFOLD's ``c - c_i`` (Karimireddy et al., 2020);
- row weights (FedSLD's, Luo & Wu, 2022) enter the data gradient itself: each row's weight in
  the batch's mean loss;
- update: plain SGD ``theta -= lr * g``, or Adam (:class:`torch.optim.Adam`'s numbers, torch's defaults,
  torch models only, new at each call so its moments restart each round).

The session also supplies its array arithmetic (``axpy(alpha, g, x)``: ``g + alpha x``; ``load``), so one path serves numpy
arrays and torch tensors with each backend's own rounding. For plain SGD the learning rate is
folded into the coefficients of the parameters the session names as ``scaled`` (the numpy
weight: ``X^T r * (lr / n)``, then ``lr * l2``, ``lr * mu``, ``lr * correction``), which saves
passes over the vector; elsewhere the gradient is formed first and stepped with ``-lr``.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from medfed.errors import ConfigError
from medfed.models.logistic import Params

Term = Callable  # (gradient, parameter) -> gradient: one data-independent term added to a gradient


def optimizer_name(model) -> str:
    """The model's local optimizer: its ``optimizer`` option (torch models), else plain SGD."""
    return getattr(model, "options", {}).get("optimizer", "sgd")


def penalty(session, params: Params, l2: float) -> float:
    """The L2 term ``(l2 / 2) sum ||W||²`` of the objective at ``params`` (parameter view)."""
    if not l2:
        return 0.0
    return 0.5 * l2 * sum(float(np.vdot(params[k], params[k])) for k in session.penalized)


# --- the gradient terms -----------------------------------------------------------------


def _pull(axpy, coefficient: float, center) -> Term:
    def term(g, p):
        return axpy(coefficient, g, p - center)

    return term


def _shift(constant) -> Term:
    def term(g, p):
        g += constant
        return g

    return term


def gradient_terms(session, fold: Mapping[str, float], *, l2: float = 0.0, prox_center: Params | None = None,
                   mu: float = 0.0, correction: Params | None = None) -> dict[str, tuple[Term, ...]]:
    """Each trained parameter's data-independent terms, in the order they are added: L2 (on the
    penalized parameters), the proximal pull toward ``prox_center`` (when ``mu``), the constant
    ``correction``; each coefficient times the parameter's ``fold`` (the learning rate folded
    into it, 1 when not). Nothing is computed for a term that is not asked for."""
    axpy = session.axpy
    terms = {}
    for name in session.values:
        scale = fold.get(name, 1.0)
        chain = []
        if l2 and name in session.penalized:
            chain.append(functools.partial(axpy, scale * l2))
        if mu and prox_center is not None:
            chain.append(_pull(axpy, scale * mu, session.load(name, prox_center[name])))
        if correction is not None:
            chain.append(_shift(session.load(name, scale * np.asarray(correction[name], dtype=np.float64))))
        terms[name] = tuple(chain)
    return terms


# --- the update -------------------------------------------------------------------------


class Sgd:
    """Plain gradient descent ``theta -= lr * g``. With ``fold``, the session's ``scaled``
    parameters arrive with ``lr`` already in their gradient and terms (``fold``: name -> lr)."""

    def __init__(self, session, lr: float, *, fold: bool) -> None:
        self.fold = {name: lr for name in session.scaled} if fold else {}
        self.scale = lr if fold else 1.0  # what the session's gradient multiplies the scaled parameters by
        folded = operator.isub  # p -= g (in place for arrays), without a Python frame on the hot path
        unfolded = functools.partial(session.axpy, -lr)
        self._move = {name: folded if name in self.fold else unfolded for name in session.values}

    def step(self, values: dict, grads: Mapping, terms: Mapping[str, tuple[Term, ...]]) -> None:
        move = self._move
        for name, g in grads.items():
            p = values[name]
            for term in terms[name]:
                g = term(g, p)
            values[name] = move[name](p, g)


class Adam:
    """Adam (Kingma and Ba, 2015) with torch's defaults over a torch session's parameters, fed
    the gradient with its terms; new for each training, so its moments restart each round.

    On the CPU it is :class:`torch.optim.Adam`'s own single-tensor path (what torch runs there:
    ``foreach`` and ``fused`` default to CUDA only) written out with the same torch operations in
    the same order, so every bit is torch's (tested), without ``torch.optim``'s first step, which
    imports ``torch._dynamo`` (0.7 s of every torch run). Elsewhere, :class:`torch.optim.Adam`."""

    fold: Mapping[str, float] = {}  # nothing folded: Adam needs the gradient itself
    scale = 1.0
    BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults

    def __init__(self, session, lr: float) -> None:
        params = list(session.values.values())
        self.lr = lr
        self._steps = 0
        self._moments: dict[str, tuple] = {}  # name -> (exp_avg, exp_avg_sq)
        self._adam = None
        if any(p.device.type != "cpu" for p in params):  # torch's foreach path: its own sums
            import torch

            self._adam = torch.optim.Adam(params, lr=lr)

    def step(self, values: dict, grads: Mapping, terms: Mapping[str, tuple[Term, ...]]) -> None:
        for name, g in grads.items():
            p = values[name]
            for term in terms[name]:
                g = term(g, p)
            if self._adam is not None:
                p.grad = g
            else:
                self._update(name, p, g)
        if self._adam is not None:
            self._adam.step()
        else:
            self._steps += 1

    def _update(self, name: str, p, g) -> None:
        """torch.optim.adam._single_tensor_adam for one parameter (no weight decay, amsgrad,
        maximize, capturable or complex values: torch's defaults), in place."""
        import torch

        if name not in self._moments:
            self._moments[name] = (torch.zeros_like(p, memory_format=torch.preserve_format),
                                   torch.zeros_like(p, memory_format=torch.preserve_format))
        exp_avg, exp_avg_sq = self._moments[name]
        beta1, beta2 = self.BETA1, self.BETA2
        step = float(self._steps + 1)  # torch keeps it in a float tensor and reads it with .item()
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size = self.lr / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.EPS)
        p.addcdiv_(exp_avg, denom, value=-step_size)


def make_optimizer(model, session, lr: float, *, fold: bool = True) -> Sgd | Adam:
    """The model's local optimizer over ``session``; ``fold``: let SGD fold ``lr`` into the
    gradient (only where the gradient comes from the session's own ``gradient``)."""
    name = optimizer_name(model)
    if name == "sgd":
        return Sgd(session, lr, fold=fold)
    if name == "adam":
        return Adam(session, lr)
    raise ConfigError(f"model {getattr(model, 'name', model)!r}: unknown local optimizer {name!r}; use sgd or adam")


# --- local training ---------------------------------------------------------------------


class _by_rows:
    """Fixed per-row weights as a ``row_weights`` callable: the session passes only the batch's
    labels, so the batches are followed (:meth:`follow`) to know which rows the batch holds."""

    def __init__(self, weights: np.ndarray) -> None:
        self.weights, self.rows = np.asarray(weights, dtype=np.float64), None

    def follow(self, batches: Iterable[np.ndarray | None]):
        for rows in batches:
            self.rows = rows
            yield rows

    def __call__(self, y_batch: np.ndarray) -> np.ndarray:
        return self.weights if self.rows is None else self.weights[self.rows]


def descend(
    model,
    params: Params,
    X: np.ndarray,
    y: np.ndarray,
    batches: Iterable[np.ndarray | None],
    lr: float,
    l2: float = 0.0,
    *,
    prox_center: Params | None = None,
    mu: float = 0.0,
    correction: Params | None = None,
    row_weights: Callable[[np.ndarray], np.ndarray] | None = None,
    example_weights: np.ndarray | None = None,
) -> tuple[dict[str, np.ndarray], float]:
    """One optimizer step per entry of ``batches`` (row indices, ``None`` = all rows) from ``params``.

    Returns the new parameters and the objective at the start on all rows (unweighted, with
    the L2 term; torch: in eval mode), the loss of the model the site received. Optional terms:
    ``prox_center`` with ``mu > 0`` (FedProx), ``correction`` (SCAFFOLD), ``row_weights(y_batch)
    -> (B,)`` (FedSLD), or ``example_weights`` (n,): a fixed weight per row of ``X`` (the
    semi-supervised pseudo-labeled rows' lambda), looked up by the batch's rows; see the module docstring.
    """
    if example_weights is not None:
        if row_weights is not None:
            raise ValueError("descend takes row_weights or example_weights, not both")
        row_weights = _by_rows(example_weights)
        batches = row_weights.follow(batches)
    with model.session(params, X, y) as session:
        optimizer = make_optimizer(model, session, lr)
        terms = gradient_terms(session, optimizer.fold, l2=l2, prox_center=prox_center, mu=mu, correction=correction)
        values, scale, step, start = session.values, optimizer.scale, optimizer.step, None
        for rows in batches:
            grads, loss = session.gradient(rows, scale, row_weights, start is None)
            if start is None:
                start = loss + penalty(session, params, l2)
            step(values, grads, terms)
        if start is None:  # zero steps
            start = session.loss() + penalty(session, params, l2)
        return session.parameters(), start
