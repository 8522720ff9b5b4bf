"""Secure aggregation in the round (SecAgg+): the server receives masked vectors only and unmasks
their sum; steps on the sum give the plain numbers to the fixed-point resolution; steps that
read individual uploads, screening and compression are refused; dropouts inside a round are
recovered; --dp distributed noises at the sites and is accounted like --dp client."""

import math

import numpy as np
import pytest

pytest.importorskip("cryptography")
pytest.importorskip("Crypto")

from medfed.client.local import LocalData  # noqa: E402
from medfed.client.upload import Upload  # noqa: E402
from medfed.comm import secagg, secure  # noqa: E402
from medfed.data.datasets import load_dataset  # noqa: E402
from medfed.engine.executors.inprocess import InProcessExecutor  # noqa: E402
from medfed.errors import ConfigError, DataError  # noqa: E402
from medfed.experiments.config import build_config  # noqa: E402
from medfed.experiments.harness import TrainingPlan, run_experiment  # noqa: E402
from medfed.experiments.results import results_document  # noqa: E402
from medfed.methods import resolve_methods  # noqa: E402
from medfed.rng import KeyedRng  # noqa: E402
from medfed.server.dp import dp_sensitivity  # noqa: E402

CLIP = 50.0  # large enough that no update of these runs is clipped: the plain run is the reference
SECURE = {"secure_aggregation": True, "clip": CLIP}


@pytest.fixture(scope="module")
def fed():
    return load_dataset("heart-disease")


def _config(privacy, drop=(), executor="inprocess", rounds=2, methods=("fedavg",), model=None, compress="none",
            **training):
    model = {} if model is None else {"model": model[0], "model_options": model[1]}
    return build_config({"data": {"dataset": "heart-disease"}, "methods": list(methods), "repeats": 1, "seed": 1,
                         "training": {"rounds": rounds, "local_steps": 3, **training}, "privacy": privacy,
                         "drop": list(drop), "executor": executor, "compress": compress, **model})


def _federated(fed, method, privacy, **kwargs):
    """One federated run of ``method`` on heart-disease's sites (standardized), its FederatedRun."""
    config = _config(privacy, methods=(method,), **kwargs)
    (spec, opts), = resolve_methods([method], {}, None)
    plan = TrainingPlan.of(config, fed)
    X = np.concatenate([s.X for s in fed.sites])
    mean, std = np.nanmean(X, 0), np.nanstd(X, 0) + 1e-9
    train = [LocalData(s.name, np.nan_to_num((s.X - mean) / std), s.y) for s in fed.sites]
    return plan.federated(spec, opts, train, plan.initial(fed, 0), KeyedRng(1, (7,)))


def _max_diff(a, b):
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def _bound(n_sites, value_range, steps=1.0):
    """The documented error of one decoded sum entry, B K / (2 scale), with room for the mean's
    division by the summed weight (itself within the same error) and float64's own rounding."""
    scale = secagg.fixed_point_scale(1.0, n_sites)
    return 4 * steps * value_range * n_sites / (2 * scale) + 1e-15


@pytest.mark.parametrize("method", ["fedavg", "fedprox", "fedavgm", "fedadam", "scaffold", "fedsgd", "ditto"])
def test_steps_on_the_sum_give_the_plain_numbers_to_the_fixed_point_resolution(fed, method):
    plain = _federated(fed, method, {}, rounds=1)
    masked = _federated(fed, method, SECURE, rounds=1)
    bound = _bound(len(fed.sites), CLIP, steps=10 if method in ("fedadam", "fedsgd") else 1)
    assert _max_diff(plain.params, masked.params) <= bound
    assert plain.params.keys() == masked.params.keys()
    assert abs(plain.train_loss[0] - masked.train_loss[0]) <= _bound(len(fed.sites), secure.LOSS_BOUND)
    r = masked.history[0]
    assert r.secure["threshold"] >= r.secure["degree"] // 2 + 1 and r.sites == tuple(s.name for s in fed.sites)
    more = _federated(fed, method, SECURE, rounds=3)  # and over rounds the runs stay together
    assert _max_diff(_federated(fed, method, {}, rounds=3).params, more.params) < 1e-9


@pytest.mark.parametrize("method,model", [("fedbn", ("mlp", {"norm": "batch"})), ("fedper", ("mlp", {}))])
def test_private_parameters_never_enter_the_masked_vector(fed, method, model):
    plain = _federated(fed, method, {}, rounds=2, model=model)
    masked = _federated(fed, method, SECURE, rounds=2, model=model)
    assert _max_diff(plain.params, masked.params) < 1e-9
    np.testing.assert_allclose(plain.train_loss, masked.train_loss, rtol=0, atol=1e-9)


def test_client_dp_on_the_secure_sum_is_the_plain_noised_mean(fed):
    dp = {"dp": "client", "clip": 0.5, "noise": 0.7}
    plain, masked = _federated(fed, "fedavg", dp), _federated(fed, "fedavg", {**dp, "secure_aggregation": True})
    assert _max_diff(plain.params, masked.params) < 1e-12  # the server's keyed noise is the same


class _Spy(InProcessExecutor):
    """Records everything the coordinator receives from the sites."""

    received: list = []

    def train(self, plan):
        replies = super().train(plan)
        self.received.extend(replies.values())
        return replies

    def stage(self, name, round_, messages):
        answers = super().stage(name, round_, messages)
        self.received.extend(answers.values())
        return answers


def test_the_server_receives_masked_vectors_only_and_executors_agree(fed, monkeypatch):
    import medfed.engine.executors.inprocess as inprocess

    monkeypatch.setattr(inprocess, "InProcessExecutor", _Spy)
    _Spy.received = []
    run = _federated(fed, "scaffold", SECURE, rounds=2)
    kinds = {type(m).__name__ for m in _Spy.received}
    assert not any(isinstance(m, Upload) for m in _Spy.received)
    assert kinds == {"SecureReady", "tuple", "MaskedInput", "UnmaskResponse"}
    masked = [m.masked for m in _Spy.received if isinstance(m, secagg.MaskedInput)]
    bits = np.unpackbits(np.concatenate(masked).view(np.uint8))
    assert abs(bits.mean() - 0.5) < 4 * 0.5 / math.sqrt(bits.size)  # uniform-looking ring entries
    monkeypatch.undo()
    process = _federated(fed, "scaffold", SECURE, rounds=2, executor="process")
    assert all(np.array_equal(run.params[k], process.params[k]) for k in run.params)
    assert np.array_equal(run.train_loss, process.train_loss)
    assert all(r.bytes_up > 8 * 2 * 14 * len(fed.sites) for r in run.history)  # masked update + control delta


def test_a_site_that_drops_inside_the_round_is_recovered_or_left_out(fed):
    site = fed.sites[-1].name
    base = _federated(fed, "fedavg", SECURE, rounds=3)
    before = _federated(fed, "fedavg", SECURE, rounds=3, drop=[f"{site}@2"])
    for stage in ("share", "mask"):  # not in the sum; after sharing, its pairwise masks are removed from its key
        run = _federated(fed, "fedavg", SECURE, rounds=3, drop=[f"{site}@2:{stage}"])
        assert _max_diff(run.params, before.params) < 1e-12
        assert site not in run.history[1].sites and site in run.history[1].missing
    assert run.history[1].secure["dropped_after_sharing"] == [site]
    late = _federated(fed, "fedavg", SECURE, rounds=3, drop=[f"{site}@2:unmask"])  # masked, then gone: in the sum
    assert _max_diff(late.params, base.params) < 1e-12
    assert late.history[1].secure["dropped_after_masking"] == [site] and site in late.history[1].sites


def test_too_many_dropouts_skip_the_round_with_the_reason(fed):
    others = [s.name for s in fed.sites[1:]]
    unmask = _federated(fed, "fedavg", SECURE, rounds=2, drop=[f"{s}@2:unmask" for s in others])
    r = unmask.history[1]
    assert r.skipped and "cannot unmask" in r.skipped and "t=2" in r.skipped
    assert r.sites == ()
    one = _federated(fed, "fedavg", SECURE, rounds=2)
    first = _federated(fed, "fedavg", SECURE, rounds=1)
    assert _max_diff(unmask.params, first.params) < 1e-15 and _max_diff(one.params, first.params) > 1e-6
    masked = _federated(fed, "fedavg", {**SECURE}, rounds=2, drop=[f"{s}@2:mask" for s in others])
    assert "fewer than the 2" in masked.history[1].skipped


@pytest.mark.parametrize("method,steps", [("median", "median"), ("krum", "krum"), ("trimmed_mean", "trimmed_mean"),
                                          ("fair", "fair"), ("dos", "dos"), ("fedsld", "label_distribution")])
def test_a_method_that_reads_individual_uploads_is_refused_in_one_line(fed, method, steps):
    with pytest.raises(ConfigError, match=f"method '{method}' cannot run with --secure-aggregation: its server "
                                          f"step.s. {steps}"):
        run_experiment(_config(SECURE, methods=(method,)), fed)


def test_distributed_dp_names_its_own_mode_when_it_refuses_a_method(fed):
    privacy = {**SECURE, "dp": "distributed", "noise": 1.0}
    with pytest.raises(ConfigError, match=r"'scaffold' cannot run with client-level DP \(--dp distributed\)"):
        run_experiment(_config(privacy, methods=("scaffold",)), fed)


@pytest.mark.parametrize("extra,words", [
    ({"training": {"max_update_norm": 1.0}}, "--max-update-norm cannot run with --secure-aggregation"),
    ({"compress": "topk:0.1"}, "--compress topk:0.1 cannot run with --secure-aggregation: each site's sparse"),
    ({"compress": "lossless"}, "--compress lossless cannot run with --secure-aggregation: a masked vector is uniform"),
    ({"drop": ["VA@2:mask"], "privacy": {}}, "without --secure-aggregation"),
])
def test_what_cannot_apply_to_masked_uploads_is_refused_in_one_line(fed, extra, words):
    values = {"data": {"dataset": "heart-disease"}, "methods": ["fedavg"], "repeats": 1, "privacy": SECURE}
    for key, value in extra.items():
        values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) and value else value
    with pytest.raises(ConfigError, match=words):
        run_experiment(build_config(values), fed)


def test_a_federation_of_one_site_is_refused():
    one = load_dataset("breast-cancer", n_sites=1)
    config = build_config({"data": {"dataset": "breast-cancer", "options": {"n_sites": 1}}, "methods": ["fedavg"],
                           "repeats": 1, "privacy": SECURE})
    with pytest.raises(ConfigError, match="--secure-aggregation sums at least 2 sites"):
        run_experiment(config, one)


@pytest.mark.parametrize("privacy,words", [
    ({"secure_aggregation": True}, "secure aggregation needs clip"),
    ({"dp": "distributed", "clip": 1.0, "noise": 1.0}, "needs secure aggregation"),
    ({"dp": "distributed", "clip": 1.0, "noise": 1.0, "secure_aggregation": True, "adaptive_clip": True},
     "adaptive_clip is not available"),
])
def test_incomplete_secure_settings_are_one_clear_error(privacy, words):
    with pytest.raises(ConfigError, match=words):
        build_config({"data": {"dataset": "heart-disease"}, "privacy": privacy})


def test_the_cli_flag_and_the_privacy_section(tmp_path):
    import json

    from typer.testing import CliRunner

    from medfed.cli.app import app

    base = ["run", "--dataset", "heart-disease", "--methods", "fedavg", "--rounds", "2", "--repeats", "1"]
    result = CliRunner().invoke(app, [*base, "--secure-aggregation", "--out", str(tmp_path / "a")])
    assert result.exit_code == 2 and "--clip" in result.output and len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(app, [*base, "--methods", "median", "--secure-aggregation", "--clip", "5",
                                      "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "'median'" in result.output, result.output
    result = CliRunner().invoke(app, [*base, "--secure-aggregation", "--clip", "5", "--drop", "VA@2:mask",
                                      "--out", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert "secure aggregation (SecAgg+, 64-bit ring, clip 5): the server saw sums only" in result.output
    p = json.loads((tmp_path / "c" / "results.json").read_text())["privacy"]
    assert p["secure_aggregation"] is True and p["channel"] == ["sharing policy", "clip", "mask"]
    s = p["secure"]
    assert s["ring_bits"] == 64 and s["clip"] == 5.0 and s["min_sites"] == 2
    fedavg = s["settings"]["FedAvg"]
    assert fedavg["range"]["payload@examples"] == 5.0 and fedavg["thresholds"] == [2] and fedavg["degrees"] == [3]
    assert fedavg["dropped_after_sharing"] == {"VA": 1}


def test_ring_entries_stay_in_range_and_the_layout_round_trips():
    shapes = {"w": (3,), "b": ()}
    lay = secure.layout([secure.SumTerm("payload")], shapes, clip=1.0, total=10.0, noise_std=0.1)
    ups = [Upload("a", {"w": np.array([3.0, 4.0, 0.0]), "b": np.array(0.0)}, 4, "delta", {"loss": 0.5}),
           Upload("b", {"w": np.array([0.1, -0.2, 0.3]), "b": np.array(-0.1)}, 6, "delta", {"loss": 2e9})]
    xs = [secure.encode(lay, u) for u in ups]
    assert all(np.abs(x).max() <= 1.0 for x in xs)
    total = secure.decode(lay, sum(xs))
    assert total["weight@examples"] == pytest.approx(1.0)
    want = 0.4 * np.array([0.6, 0.8, 0.0]) + 0.6 * np.array([0.1, -0.2, 0.3])  # a clipped to norm 1
    np.testing.assert_allclose(total["payload@examples"]["w"], want, atol=1e-12)
    assert total["metrics/loss@examples"] == pytest.approx(0.4 * 0.5 + 0.6 * secure.LOSS_BOUND)  # capped
    wild = secure.encode(lay, ups[1], noise_std=1e3, rng=KeyedRng(0))  # noise beyond the range is held there
    assert np.abs(wild).max() <= 1.0
    assert secure.malformed(Upload("c", {"w": np.array([np.nan])}, 1, "delta")) is not None


def test_distributed_noise_of_the_sum_is_at_least_the_claimed_std():
    sizes = {f"s{i}": float(n) for i, n in enumerate([30, 50, 70, 90, 110])}
    z, clip, m, d = 1.3, 0.5, 3, 20000
    sigma = secure.site_noise_std(z, clip, sizes, m)
    lay = secure.layout([secure.SumTerm("payload")], {"w": (d,)}, clip=clip, total=sum(sizes.values()),
                        noise_std=sigma)
    claimed_sum = z * dp_sensitivity(clip, sizes, 1.0)  # --dp client's std on the mean, q = 1: on the sum of n_i/N x_i
    for survivors in (m, 5):
        names = list(sizes)[:survivors]
        xs = {s: secure.encode(lay, Upload(s, {"w": np.zeros(d)}, int(sizes[s]), "delta"), sigma,
                               KeyedRng(3, (i,))) for i, s in enumerate(names)}
        total = secagg.simulate_round(xs, seed=1, clip_range=1.0)
        noise = secure.decode(lay, total)["payload@examples"]["w"]
        std = float(noise.std())
        assert std >= claimed_sum * (1 - 4 / math.sqrt(2 * d))  # >= the claim, up to its sampling error
        assert std == pytest.approx(claimed_sum * math.sqrt(survivors / m), rel=4 / math.sqrt(2 * d))


def test_distributed_and_client_dp_keep_ledgers_with_equal_epsilon(fed):
    pytest.importorskip("dp_accounting")
    docs = {}
    for mode in ("client", "distributed"):
        config = _config({"dp": mode, "clip": 0.5, "noise": 1.1, "secure_aggregation": True}, rounds=3)
        docs[mode] = results_document(run_experiment(config, fed))["privacy"]
    a, b = docs["client"]["ledger"], docs["distributed"]["ledger"]
    assert [e["epsilon"] for e in a] == [e["epsilon"] for e in b] and math.isfinite(a[0]["epsilon"])
    assert {e["mode"] for e in b} == {"distributed"}
    assert docs["distributed"]["channel"] == ["sharing policy", "clip", "noise (distributed)", "mask"]
    assert docs["distributed"]["secure"]["settings"]["FedAvg"]["site_noise_std"] > 0
    assert docs["client"]["secure"]["settings"]["FedAvg"]["site_noise_std"] == 0


# --------------------------------------------------------------------------- quantized in the ring (--compress q8|q4)


@pytest.mark.parametrize("compress,bits", [("q8", 8), ("q4", 4)])
def test_quantized_secure_rounds_send_the_narrower_ring_and_agree_across_executors(fed, compress, bits):
    plain = _federated(fed, "scaffold", SECURE, rounds=2)
    run = _federated(fed, "scaffold", SECURE, rounds=2, compress=compress)
    process = _federated(fed, "scaffold", SECURE, rounds=2, compress=compress, executor="process")
    assert all(np.array_equal(run.params[k], process.params[k]) for k in run.params)  # the sites' keyed dither
    assert np.array_equal(run.train_loss, process.train_loss)
    k = len(fed.sites)
    for r, p in zip(run.history, plain.history):
        assert r.secure["ring_bits"] == 16 and r.secure["quantization"]["levels"] == 2**bits - 1 and "scale" not in r.secure
        assert p.secure["ring_bits"] == 64
        entries = 2 * (fed.sites[0].X.shape[1] + 1) + 3  # update, control delta (logistic: w, b); weight, loss
        # and loss weight, each scalar as 48/b digits
        ring = entries + 3 * (48 // bits - 1)
        for site in r.bytes_by_site:  # the masked vector is all that changes: 2 bytes an entry instead of 8
            assert p.bytes_by_site[site] - r.bytes_by_site[site] == 8 * entries - 2 * ring
        assert set(r.sites) == {s.name for s in fed.sites} and r.secure["degree"] == k - 1
    assert all(np.isfinite(v).all() for v in run.params.values())
    # the scalars are exact to 2^-48 of their range: round 1's weighted training loss (of the same model) is the plain one
    assert abs(run.train_loss[0] - plain.train_loss[0]) <= k * 2e6 / 2**48 * 4


def test_the_quantized_round_decodes_the_weighted_sum_without_bias():
    """A layout's update quantized to 8 bits over [-C, C]: over many entries with the same inputs the
    decoded sum averages to the exact weighted sum, with variance at most the documented bound."""
    d, clip, sizes = 20_000, 1.0, {"a": 30, "b": 50, "c": 20}
    values = {"a": 0.004, "b": -0.003, "c": 0.006}  # norm value * sqrt(d) <= C: nothing is clipped
    lay = secure.layout([secure.SumTerm("payload")], {"w": (d,)}, clip=clip, total=float(sum(sizes.values())))
    xs = {s: secure.encode(lay, Upload(s, {"w": np.full(d, v)}, sizes[s], "delta", {"loss": 0.5})) for s, v in
          values.items()}
    params = secagg.secagg_params(xs, clip_range=1.0, length=lay.length, graph_seed=2, bits=8, wide=lay.scalars())
    total = secagg.simulate_transcript(params, xs).result
    sums = secure.decode(lay, total.total)
    w = sums["payload@examples"]["w"]
    truth = sum(sizes[s] / 100 * v for s, v in values.items())
    assert abs(w.mean() - truth) < 4 * w.std() / math.sqrt(d)
    bound = secure.quantization_variance(lay, 3, 8)
    assert w.var() <= bound["payload@examples"] * (1 + 6 / math.sqrt(d))
    assert sums["weight@examples"] == pytest.approx(1.0, abs=1e-12)
    assert sums["metrics/loss@examples"] == pytest.approx(0.5, abs=1e-7)


@pytest.mark.parametrize("dp", ["client", "distributed"])
def test_dp_with_quantization_in_the_ring_is_refused(fed, dp):
    # rounding can carry a clipped update past the clip the noise is sized for, and the server,
    # seeing only the sum, cannot clip it back: the ledger's sensitivity would not hold
    privacy = {"dp": dp, "clip": 0.5, "noise": 1.1, "secure_aggregation": True}
    with pytest.raises(ConfigError, match=f"--compress q8 with --dp {dp} cannot run with --secure-aggregation"):
        run_experiment(_config(privacy, rounds=2, compress="q8"), fed)


def test_a_site_refuses_a_round_that_quantizes_otherwise_than_its_config():
    site = secure.SiteSecure(bits=8)
    up = Upload("a", {"w": np.zeros(2)}, 3, "delta")
    slot, _ = site.ready(up, 0)
    lay = secure.layout([secure.SumTerm("payload")], {"w": (2,)}, clip=1.0, total=6.0)
    params = secagg.secagg_params(["a", "b"], clip_range=1.0, length=lay.length, graph_seed=0)
    with pytest.raises(DataError, match="quantizes to 0 bits .* configured for 8"):
        site.answer("share", slot, 0, {"params": params, "layout": lay, "adverts": {}}, KeyedRng(0))
