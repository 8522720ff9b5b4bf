"""Named, serializable state: a chain's state is keyed by step name, every stateful step and
site rule keeps a registered frozen dataclass, and every method's server and site states
survive the wire bit for bit after real rounds."""

import dataclasses
import importlib.util

import numpy as np
import pytest
from test_wire import identical

from medfed.client import LocalData, LocalTraining
from medfed.client.drift import label_counts
from medfed.comm.wire import decode, encode
from medfed.engine import run_federated
from medfed.errors import ConfigError
from medfed.experiments.config import TrainingSpec
from medfed.client.distill import Teacher
from medfed.methods import METHODS
from medfed.methods import context_for
from medfed.models import LogisticRegression
from medfed.rng import KeyedRng
from medfed.server.aggregate import (
    Aggregator,
    ChainState,
    StackedUploads,
    apply_delta,
    chain,
    step_names,
    weighted_mean,
)
from medfed.server.optimizers import MomentumState, server_momentum
from medfed.methods.steps import build_pipeline
from medfed.wiretypes import wire_name

FEDERATED = sorted(name for name, spec in METHODS.items() if spec.kind == "federated")
PARTIAL_SHARING = {"fedbn", "fedper", "multitask"}  # they keep layers private that the numpy logistic model has none of
TORCH = importlib.util.find_spec("torch") is not None
IMAGE = (1, 4, 4)
# every state class some method keeps; the round trip below must meet each of them
STATE_CLASSES = {
    "ChainState", "ControlState", "LabelCountsState", "TimeBudgetState", "MomentumState", "AdaptiveState",
    "FourierServerState", "ScaffoldSiteState", "ApflSiteState", "DittoSiteState", "FourierSiteState", "PrivateState",
}


def _sites(shape, k=7, n=12):
    """Seven tiny sites (Krum and Bulyan with f = 1 need K >= 7), both labels at each."""
    sites = []
    for i in range(k):
        rng = np.random.default_rng(40 + i)
        y = (np.arange(n) % 2).astype(np.float64)
        X = rng.normal(size=(n, *shape)) + 0.3 * i
        X[y == 1] += 0.8
        sites.append(LocalData(f"site-{i}", X.astype(np.float32 if len(shape) > 1 else np.float64), y))
    return sites


def _run(name, model_name):
    if model_name == "logistic":
        model, sites = LogisticRegression(), _sites((3,))
        init = model.init(3)
    else:
        from medfed.models.registry import make_model

        model, sites = make_model("cnn2d", IMAGE, channels=(2,), norm="batch"), _sites(IMAGE)
        init = model.init_params(IMAGE, KeyedRng(0))
    teacher = Teacher(model, init, "a teacher") if name == "distill" else None  # distill's: a saved model file
    context = context_for([s.name for s in sites], 0, {s.name: label_counts(s.y) for s in sites}, teacher=teacher)
    spec = METHODS[name]
    algorithm = spec.build(dict(spec.defaults), TrainingSpec(rounds=2, local_steps=2, lr=0.1), context)
    training = LocalTraining(model, 0.1, 2, None, 1e-2)
    return run_federated(algorithm, init, sites, training, 2, KeyedRng(5))


CASES = [(name, "logistic") for name in FEDERATED if name not in PARTIAL_SHARING] + [
    (name, "cnn2d") for name in ("fedbn", "fedper", "multitask", "fourier") if TORCH  # fourier: kernels whose high frequencies a site keeps
]


def _walk(value, found):
    """Collect the dataclass names in ``value``; fail on a tuple, whose meaning is positional."""
    assert not isinstance(value, tuple), f"a positional tuple in a state: {value!r}"
    if dataclasses.is_dataclass(value):
        found.add(type(value).__name__)
        assert wire_name(type(value)) is not None, f"{type(value).__name__} is not registered with @wire_type"
        assert type(value).__dataclass_params__.frozen, f"{type(value).__name__} is not frozen"
        for f in dataclasses.fields(value):
            _walk(getattr(value, f.name), found)
    elif isinstance(value, dict):
        for v in value.values():
            _walk(v, found)
    return found


@pytest.fixture(scope="module")
def runs():
    return {case: _run(*case) for case in CASES}


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_every_methods_server_and_site_states_cross_the_wire_bit_for_bit(runs, case):
    run = runs[case]
    assert isinstance(run.server_state, ChainState)
    assert identical(decode(encode(run.server_state)), run.server_state)
    for site, state in run.client_states.items():
        assert identical(decode(encode(state), source=site), state), site


def test_the_states_are_named_frozen_registered_dataclasses_and_the_round_trip_meets_them_all(runs):
    found: set[str] = set()
    for run in runs.values():
        _walk(run.server_state, found)
        for state in run.client_states.values():
            _walk(state, found)
    expected = STATE_CLASSES if TORCH else STATE_CLASSES - {"PrivateState"}
    assert expected <= found, f"not met: {sorted(expected - found)}"


def test_a_chain_state_is_keyed_by_step_name_in_chain_order():
    state = METHODS["scaffold"].build(dict(METHODS["scaffold"].defaults), TrainingSpec(), context_for(["a", "b"])).aggregator.init(
        {"w": np.zeros(2)}
    )
    assert list(state) == ["scaffold_control", "weighted_mean", "apply_delta"]
    assert state["weighted_mean"] is None and np.array_equal(state["scaffold_control"].control["w"], np.zeros(2))
    with pytest.raises(KeyError, match="no step 'fourier'; its steps: scaffold_control, weighted_mean, apply_delta"):
        state["fourier"]


def test_repeated_steps_get_deterministic_suffixes_and_keep_their_own_state():
    g = {"w": np.zeros(3)}
    steps = [weighted_mean(), server_momentum(momentum=0.5), server_momentum(momentum=0.9), apply_delta()]
    agg = chain(*steps)
    assert agg.name == "chain(weighted_mean, server_momentum, server_momentum_2, apply_delta)"
    state = agg.init(g)
    assert list(state) == ["weighted_mean", "server_momentum", "server_momentum_2", "apply_delta"]
    stack = StackedUploads(("a",), {"w": np.ones((1, 3))}, np.ones(1), "delta", {})
    _, state, _ = agg.apply(stack, state, g, 0)
    assert isinstance(state["server_momentum_2"], MomentumState)
    # the first buffer accumulates the mean delta (1), the second the first's steps: 1, 1 then 1.5, 0.9 + 1.5
    np.testing.assert_array_equal(state["server_momentum"].momentum["w"], np.ones(3))
    np.testing.assert_array_equal(state["server_momentum_2"].momentum["w"], np.ones(3))
    _, state, _ = agg.apply(stack, state, g, 1)
    np.testing.assert_array_equal(state["server_momentum"].momentum["w"], np.full(3, 1.5))
    np.testing.assert_array_equal(state["server_momentum_2"].momentum["w"], np.full(3, 0.9 + 1.5))
    pipeline = build_pipeline(["weighted_mean", "server_momentum", "server_momentum"])
    assert list(pipeline.init(g)) == ["weighted_mean", "server_momentum", "server_momentum_2", "apply_delta"]


def test_names_that_suffixing_cannot_separate_are_refused():
    assert step_names(["a", "b", "a", "a"]) == ("a", "b", "a_2", "a_3")
    with pytest.raises(ConfigError, match=r"cannot be named apart \(\['a_2'\] would name two steps\)"):
        step_names(["a", "a_2", "a"])
    a, a_2 = (Aggregator(lambda g: None, lambda v, s, g, r: (v, s, None), name) for name in ("a", "a_2"))
    with pytest.raises(ConfigError, match="cannot be named apart"):
        chain(a, a_2, a)


def test_a_chain_refuses_the_state_of_another_chain():
    g = {"w": np.zeros(2)}
    fedavg = chain(weighted_mean(), apply_delta())
    momentum = chain(weighted_mean(), server_momentum(), apply_delta())
    stack = StackedUploads(("a",), {"w": np.ones((1, 2))}, np.ones(1), "delta", {})
    with pytest.raises(ConfigError, match=r"chain state has the steps \['weighted_mean', 'server_momentum', 'apply_delta'\]; "
                                          r"this chain's are \['weighted_mean', 'apply_delta'\]"):
        fedavg.apply(stack, momentum.init(g), g, 0)
