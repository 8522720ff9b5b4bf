"""medfed's server chains agree with Flower 1.42's legacy strategies to 1e-12.

For FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad and QFedAvg, the same uploads (several
sites with different example counts, several rounds so that optimizer state matters) go
to ``flwr.server.strategy.<Name>.aggregate_fit`` and to the medfed chain, with the same
hyperparameters, and the new global models must agree round after round.
"""

import numpy as np
import pytest

pytest.importorskip("flwr")

from flower_support import FlowerProxy
from flwr.common import (
    Code,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import strategy as fl
from flwr.server.client_manager import SimpleClientManager

from medfed.client.upload import Upload
from medfed.server import apply_delta, chain, stack_uploads, weighted_mean
from medfed.server.optimizers import (
    server_adagrad,
    server_adam,
    server_momentum,
    server_yogi,
)
from medfed.server.weighting import fair

SHAPES = {"conv": (3, 2, 2), "bias": (4,), "head": (5, 3)}  # dict order = Flower's list order
COUNTS = (120, 37, 64, 5)
ROUNDS = 4




def _to_flower(params):
    return ndarrays_to_parameters([params[k] for k in SHAPES])


def _from_flower(parameters):
    return dict(zip(SHAPES, parameters_to_ndarrays(parameters), strict=True))


def _initial(seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s) for k, s in SHAPES.items()}


def _agree(strategy, aggregator, losses=None, qffl=False, stateful=True):
    """Run ROUNDS rounds on both sides; return the largest difference a stateless replay of
    the medfed chain would have had (to show that state was exercised)."""
    rng = np.random.default_rng(1)
    g_flower = g_medfed = _initial()
    state = aggregator.init(g_medfed)
    proxies = [FlowerProxy(f"site-{i}") for i in range(len(COUNTS))]
    manager = SimpleClientManager()
    for p in proxies:
        manager.register(p)
    stateless_gap = 0.0
    # a drift shared across rounds plus noise, like sites pulling toward their own optimum
    pull = [{k: rng.normal(size=s) for k, s in SHAPES.items()} for _ in COUNTS]
    for r in range(ROUNDS):
        server_round = r + 1  # Flower counts rounds from 1, medfed's engine from 0
        # Flower's legacy strategies receive each client's full local parameters and
        # subtract the server's current weights themselves; a medfed site uploads the delta
        # (local − global it received), which is what clipping, noise and compression act on
        # and lets a reducing step work without the global model. Same local models, so:
        local = [
            {k: g_flower[k] + 0.3 * pull[i][k] + 0.1 * rng.normal(size=s) for k, s in SHAPES.items()}
            for i in range(len(COUNTS))
        ]
        if qffl:  # QFedAvg takes the model before the round from configure_fit
            strategy.configure_fit(server_round, _to_flower(g_flower), manager)
        results = [
            (proxy, FitRes(Status(Code.OK, ""), _to_flower(p), n, {}))
            for proxy, p, n in zip(proxies, local, COUNTS, strict=True)
        ]
        new_parameters, _ = strategy.aggregate_fit(server_round, results, [])
        metrics = {} if losses is None else {"loss": float(losses[r])}
        uploads = [
            Upload(proxy.cid, {k: p[k] - g_medfed[k] for k in SHAPES}, n, "delta", metrics)
            for proxy, p, n in zip(proxies, local, COUNTS, strict=True)
        ]
        stack = stack_uploads(uploads)
        fresh, _, _ = aggregator.apply(stack, aggregator.init(g_medfed), g_medfed, r)
        g_medfed, state, _ = aggregator.apply(stack, state, g_medfed, r)
        g_flower = _from_flower(new_parameters)
        for k in SHAPES:
            np.testing.assert_allclose(g_medfed[k], g_flower[k], rtol=0, atol=1e-12, err_msg=f"round {server_round}, {k}")
            stateless_gap = max(stateless_gap, float(np.abs(fresh[k] - g_medfed[k]).max()))
    if stateful:
        assert stateless_gap > 1e-3, "optimizer state never mattered: the comparison would not test it"
    return g_medfed


def _avg_chain(step):
    return chain(weighted_mean(), step, apply_delta())


def test_fedavg_agrees_with_flower():
    final = _agree(fl.FedAvg(), chain(weighted_mean(), apply_delta()), stateful=False)
    assert not np.allclose(final["head"], _initial()["head"])  # the model did move


@pytest.mark.parametrize("lr, momentum", [(1.0, 0.0), (0.8, 0.0), (1.0, 0.9), (0.7, 0.5)])
def test_fedavgm_agrees_with_flower(lr, momentum):
    strategy = fl.FedAvgM(
        initial_parameters=_to_flower(_initial()), server_learning_rate=lr, server_momentum=momentum
    )
    _agree(strategy, _avg_chain(server_momentum(lr=lr, momentum=momentum)), stateful=momentum > 0)


def test_fedadam_agrees_with_flower_defaults_and_custom():
    _agree(fl.FedAdam(initial_parameters=_to_flower(_initial())), _avg_chain(server_adam()))
    strategy = fl.FedAdam(initial_parameters=_to_flower(_initial()), eta=0.03, beta_1=0.7, beta_2=0.9, tau=1e-4)
    _agree(strategy, _avg_chain(server_adam(lr=0.03, beta1=0.7, beta2=0.9, tau=1e-4)))


def test_fedadam_other_bias_corrections_differ_from_flower():
    """The paper variants are real alternatives, not aliases of Flower's rule."""
    for correction in ("kingma", "none"):
        with pytest.raises(AssertionError, match="round 1"):
            _agree(fl.FedAdam(initial_parameters=_to_flower(_initial())), _avg_chain(server_adam(bias_correction=correction)))


def test_fedyogi_agrees_with_flower_defaults_and_custom():
    _agree(fl.FedYogi(initial_parameters=_to_flower(_initial())), _avg_chain(server_yogi()))
    strategy = fl.FedYogi(initial_parameters=_to_flower(_initial()), eta=0.2, beta_1=0.5, beta_2=0.9, tau=1e-2)
    _agree(strategy, _avg_chain(server_yogi(lr=0.2, beta1=0.5, beta2=0.9, tau=1e-2)))


def test_fedadagrad_agrees_with_flower_defaults_and_custom():
    _agree(fl.FedAdagrad(initial_parameters=_to_flower(_initial())), _avg_chain(server_adagrad()))
    strategy = fl.FedAdagrad(initial_parameters=_to_flower(_initial()), eta=0.5, tau=1e-3)
    _agree(strategy, _avg_chain(server_adagrad(lr=0.5, tau=1e-3)))


@pytest.mark.parametrize("q, lr", [(0.2, 0.1), (2.0, 0.05), (0.0, 0.1)])
def test_qfedavg_agrees_with_flower(q, lr):
    # Flower's QFedAvg uses one server-side loss (evaluate_fn on the model before the round)
    # for every client and adds 1e-10 to it; medfed's fair uses each site's own training loss,
    # so the sites report that same loss here and loss_offset adds Flower's 1e-10.
    # weighting="uniform" is Flower's (and the paper's) p_k = 1/K.
    losses = np.random.default_rng(2).uniform(0.2, 2.5, size=ROUNDS)
    strategy = fl.QFedAvg(
        q_param=q,
        qffl_learning_rate=lr,
        evaluate_fn=lambda server_round, arrays, config: (float(losses[server_round - 1]), {}),
    )
    aggregator = chain(fair(q=q, lr=lr, weighting="uniform", loss_offset=1e-10), apply_delta())
    _agree(strategy, aggregator, losses=losses, qffl=True, stateful=False)
