"""Upload compression: lossless is bit-identical, q8/q4 are unbiased, top-k keeps error feedback."""

import numpy as np
import pytest

from medfed.client.local import LocalData, LocalTraining
from medfed.client.upload import Upload
from medfed.comm.compress import Codec, ErrorFeedback, make_codec
from medfed.data.datasets import load_dataset
from medfed.engine import run_federated
from medfed.engine.protocol import FederatedAlgorithm
from medfed.errors import ConfigError
from medfed.experiments.config import build_config
from medfed.experiments.harness import run_experiment
from medfed.experiments.results import results_document
from medfed.models import LogisticRegression
from medfed.rng import KeyedRng
from medfed.server.aggregate import apply_delta, chain, weighted_mean


def _upload(gen, shape=(50,)):
    return Upload("a", {"w": gen.normal(0, 1, shape), "b": gen.normal(0, 1, (1,))}, 10, "delta", {"loss": 0.5})


def _shapes(up):
    return {k: v.shape for k, v in up.payload.items()}


def test_lossless_compression_is_bit_identical_to_none():
    fed = load_dataset("heart-disease")
    base = {"data": {"dataset": "heart-disease"}, "repeats": 1, "methods": ["fedavg", "ditto"],
            "training": {"rounds": 5, "local_steps": 3}}
    plain = results_document(run_experiment(build_config(base), fed))
    packed = results_document(run_experiment(build_config({**base, "compress": "lossless"}), fed))
    assert packed["results"] == plain["results"]
    assert packed["histories"]["FedAvg"]["train_loss"] == plain["histories"]["FedAvg"]["train_loss"]


@pytest.mark.parametrize("name,bits", [("q8", 8), ("q4", 4)])
def test_stochastic_quantization_is_unbiased_and_within_one_level(name, bits):
    gen = np.random.default_rng(0)
    up = _upload(gen)
    codec = make_codec(name)
    decoded = [codec.decode(codec.encode(up, None, KeyedRng(1, (i,)))[0], _shapes(up)).payload["w"]
               for i in range(4000)]
    w = up.payload["w"]
    step = (w.max() - w.min()) / (2**bits - 1)
    assert np.all(np.abs(np.array(decoded) - w) <= step * (1 + 1e-9))
    assert np.abs(np.mean(decoded, axis=0) - w).max() < 4 * step / np.sqrt(4000)
    encoded, _ = codec.encode(up, None, KeyedRng(0))
    assert encoded.payload["w/codes"].nbytes == (50 if bits == 8 else 25)


def test_topk_sends_the_largest_entries_and_keeps_the_rest_as_error_feedback():
    gen = np.random.default_rng(1)
    codec = make_codec("topk:0.2")
    first, second = _upload(gen), _upload(gen)
    sent1, state1 = codec.encode(first, None, KeyedRng(0))
    assert sent1.payload["w/index"].size == 10
    d1 = codec.decode(sent1, _shapes(first)).payload
    np.testing.assert_allclose(d1["w"] + state1.residual["w"], first.payload["w"], rtol=0, atol=0)
    assert np.abs(d1["w"][d1["w"] != 0]).min() >= np.abs(state1.residual["w"]).max()
    sent2, state2 = codec.encode(second, state1, KeyedRng(0))
    d2 = codec.decode(sent2, _shapes(second)).payload
    # nothing is lost: what was sent plus what is left is every update so far
    np.testing.assert_allclose(d1["w"] + d2["w"] + state2.residual["w"],
                               first.payload["w"] + second.payload["w"], rtol=0, atol=1e-12)


def test_error_feedback_is_site_state_committed_only_when_the_upload_is_used():
    gen = np.random.default_rng(2)
    sites = [LocalData(f"s{i}", gen.normal(0, 1, (40, 3)), (gen.random(40) > 0.5).astype(float)) for i in range(3)]
    from medfed.client.local import local_sgd_update

    algorithm = FederatedAlgorithm("fedavg", local_sgd_update, chain(weighted_mean(), apply_delta()))
    training = LocalTraining(LogisticRegression(), 0.5, 3)
    init = LogisticRegression().init_params((3,), KeyedRng(0))
    codec = Codec("topk", 0.25)
    from medfed.engine.executors.inprocess import InProcessExecutor
    from medfed.engine.protocol import programs

    site, server = programs(algorithm, training, [s.name for s in sites], codec=codec, max_update_norm=1e-9)
    runner = InProcessExecutor(site, sites, KeyedRng(0))
    from medfed.engine.driver import Driver

    run = Driver(server, runner, 2, KeyedRng(0)).run(init)
    assert all(run.history[r].rejected for r in range(2))  # every upload refused by the norm bound
    assert all(rt.memory.channel is None for rt in runner.runtimes.values())  # so no residual was kept
    ok = run_federated(algorithm, init, sites, training, 2, KeyedRng(0), codec=codec)
    assert ok.history[1].bytes_up < run_federated(algorithm, init, sites, training, 2, KeyedRng(0)).history[1].bytes_up


def test_an_upload_that_does_not_decode_is_rejected_not_fatal():
    codec = make_codec("q8")
    up = Upload("a", {"w/codes": np.zeros(3, dtype=np.uint8), "w/range": np.array([0.0, 1.0])}, 5, "delta")
    with pytest.raises(Exception, match="does not decode"):
        codec.decode(up, {"w": (50,)})


@pytest.mark.parametrize("spec", ["q16", "topk:0", "topk:1.5", "topk:x", "gzip"])
def test_a_bad_codec_is_one_clear_error(spec):
    with pytest.raises(ConfigError, match="use none, lossless, q8, q4"):
        make_codec(spec)
    with pytest.raises(ConfigError, match="compress"):
        build_config({"data": {"dataset": "heart-disease"}, "compress": spec})


def test_error_feedback_travels_as_wire_bytes():
    from medfed.comm.wire import decode, encode

    state = ErrorFeedback({"w": np.arange(3.0)})
    np.testing.assert_array_equal(decode(encode(state)).residual["w"], state.residual["w"])
