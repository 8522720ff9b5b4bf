"""medfed's robust aggregators agree with Flower 1.42's legacy strategies to 1e-12.

Each case drives the Flower strategy itself through ``aggregate_fit(server_round, results,
failures)`` with ``FitRes`` messages, so the check covers the strategy's own plumbing
(FedMedian, FedTrimmedAvg, Krum, Krum with ``num_clients_to_keep``, Bulyan with its default
inner rule ``aggregate_krum``).

Flower aggregates PARAMETERS, medfed aggregates DELTAS (local - global). These rules are
translation-equivariant (median, trimmed mean and the selections are unchanged by adding the
same vector to every update, and a weighted mean of ``g + d_k`` is ``g + `` the mean of
``d_k``), so ``flower(g + d) = g + medfed(d)``: each test feeds Flower ``g + d_k`` and compares
with ``g + medfed(d)`` explicitly.
"""

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")

from flower_support import FlowerProxy
from flwr.common import (
    Code,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.strategy import Bulyan, FedMedian, FedTrimmedAvg, Krum

from medfed.server.aggregate import StackedUploads
from medfed.server.robust import bulyan, krum, median, multikrum, trimmed_mean

SHAPES = {"conv": (2, 3, 2), "dense": (5,), "bias": (1,)}




def _round(K, seed, n_corrupt=0):
    """A global model, K site deltas (some far away) and example counts that differ."""
    rng = np.random.default_rng(seed)
    global_params = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    deltas = {k: 0.1 * rng.normal(size=(K, *s)) for k, s in SHAPES.items()}
    for i in rng.choice(K, size=n_corrupt, replace=False):
        for k, shape in SHAPES.items():
            deltas[k][i] = 50.0 * rng.normal(size=shape)
    n_examples = rng.integers(5, 500, size=K).astype(float)
    # Flower breaks exact Krum ties by arrival order, medfed by site name: sites arrive in name order
    stack = StackedUploads(tuple(f"site-{i:02d}" for i in range(K)), deltas, n_examples, "delta", {})
    return global_params, stack


def _flower(strategy, global_params, stack, order=None):
    results = []
    for i in range(len(stack.sites)) if order is None else order:
        site = stack.sites[i]
        params = [global_params[k] + stack.payload[k][i] for k in SHAPES]  # Flower sees parameters
        fit = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(params), int(stack.weights[i]), {})
        results.append((FlowerProxy(site), fit))
    aggregated, _ = strategy.aggregate_fit(2, results, [])  # round 1 only adds a metrics warning
    return dict(zip(SHAPES, parameters_to_ndarrays(aggregated)))


def _assert_agree(aggregator, strategy, K, seed, n_corrupt=0):
    global_params, stack = _round(K, seed, n_corrupt)
    expected = _flower(strategy, global_params, stack)
    update, _, _ = aggregator.apply(stack, aggregator.init(global_params), global_params, 0)
    for k in SHAPES:
        np.testing.assert_allclose(global_params[k] + update[k], expected[k], atol=1e-12, rtol=0)


@pytest.mark.parametrize("K", [3, 4, 9, 10])
@pytest.mark.parametrize("seed", [0, 1])
def test_median_agrees_with_fedmedian(K, seed):
    _assert_agree(median(), FedMedian(), K, seed, n_corrupt=(K - 1) // 2)


@pytest.mark.parametrize(("K", "beta"), [(10, 0.1), (10, 0.2), (10, 0.3), (7, 0.2), (7, 0.45), (4, 0.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_trimmed_mean_agrees_with_fedtrimmedavg(K, beta, seed):
    _assert_agree(trimmed_mean(beta=beta), FedTrimmedAvg(beta=beta), K, seed, n_corrupt=int(beta * K))


@pytest.mark.parametrize(("K", "f"), [(5, 1), (8, 1), (11, 3), (9, 0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("far", [False, True], ids=["all-near", "f-far"])
def test_krum_agrees_with_flower_krum(K, f, seed, far):
    strategy = Krum(num_malicious_clients=f, num_clients_to_keep=0)
    _assert_agree(krum(f=f), strategy, K, seed, n_corrupt=f if far else 0)


@pytest.mark.parametrize(("K", "f", "m"), [(8, 1, 3), (8, 1, 7), (11, 3, 5), (11, 3, 11)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multikrum_agrees_with_flower_krum_keeping_m(K, f, m, seed):
    # Flower's num_clients_to_keep=0 means plain Krum, so m is always given explicitly here
    _assert_agree(multikrum(f=f, m=m), Krum(num_malicious_clients=f, num_clients_to_keep=m), K, seed, n_corrupt=f)


@pytest.mark.parametrize(("K", "f"), [(8, 1), (10, 1)])
@pytest.mark.parametrize("seed", [0, 1])
def test_multikrum_default_m_is_flower_keeping_k_minus_f(K, f, seed):
    _assert_agree(multikrum(f=f), Krum(num_malicious_clients=f, num_clients_to_keep=K - f), K, seed, n_corrupt=f)


@pytest.mark.parametrize(("K", "f"), [(7, 1), (8, 1), (11, 2), (13, 2), (5, 0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("far", [False, True], ids=["all-near", "f-far"])
def test_bulyan_agrees_with_flower_bulyan(K, f, seed, far):
    # to_keep=0 is the kwarg Flower hands to its inner rule aggregate_krum (plain Krum);
    # with all updates near each other Krum's picks and the median window are not obvious
    _assert_agree(bulyan(f=f), Bulyan(num_malicious_clients=f, to_keep=0), K, seed, n_corrupt=f if far else 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bulyan_is_order_free_where_flowers_follows_arrival_order(seed):
    # Bulyan's last Krum rounds use one neighbour, so two mutually nearest sites tie exactly.
    # Flower keeps the first to arrive; medfed the first by name, so medfed equals Flower with
    # results in name order, whatever order the stack is in.
    K, f = 7, 1
    global_params, stack = _round(K, seed)
    reverse = np.arange(K)[::-1]
    by_name = _flower(Bulyan(num_malicious_clients=f, to_keep=0), global_params, stack)
    by_arrival = _flower(Bulyan(num_malicious_clients=f, to_keep=0), global_params, stack, order=reverse)
    assert any(not np.allclose(by_name[k], by_arrival[k], atol=1e-12, rtol=0) for k in SHAPES)
    reversed_stack = StackedUploads(
        tuple(stack.sites[i] for i in reverse),
        {k: v[reverse] for k, v in stack.payload.items()},
        stack.weights[reverse],
        "delta",
        {},
    )
    update, _, _ = bulyan(f=f).apply(reversed_stack, None, global_params, 0)
    for k in SHAPES:
        np.testing.assert_allclose(global_params[k] + update[k], by_name[k], atol=1e-12, rtol=0)
