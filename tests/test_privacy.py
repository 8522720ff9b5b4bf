"""Client-level differential privacy (McMahan et al., 2018): clipping, the noised
fixed-denominator mean, Poisson participation, accounting with dp-accounting, the ledger."""

import math

import numpy as np
import pytest

dp_accounting = pytest.importorskip("dp_accounting")
from dp_accounting.pld import PLDAccountant  # noqa: E402
from dp_accounting.rdp import RdpAccountant  # noqa: E402

from medfed.client.optimizer import descend  # noqa: E402
from medfed.client.upload import Upload  # noqa: E402
from medfed.comm.privacy import calibrate_noise, client_level_epsilon, clip_update  # noqa: E402
from medfed.data.datasets import load_dataset  # noqa: E402
from medfed.engine.protocol import FederatedAlgorithm, ServerProgram  # noqa: E402
from medfed.errors import ConfigError  # noqa: E402
from medfed.experiments.config import build_config  # noqa: E402
from medfed.experiments.harness import run_experiment  # noqa: E402
from medfed.experiments.results import privacy_lines, results_document  # noqa: E402
from medfed.rng import KeyedRng  # noqa: E402
from medfed.server.aggregate import StackedUploads, apply_delta, chain, weighted_mean  # noqa: E402
from medfed.server.dp import dp_gaussian_mean, dp_sensitivity  # noqa: E402

LEDGER_KEYS = {"site", "mode", "clip", "noise_multiplier", "sampling_rate", "steps", "delta", "accountant", "epsilon"}


@pytest.mark.parametrize("q,z,rounds", [(1.0, 1.0, 10), (0.5, 1.1, 50), (0.1, 0.8, 200), (0.3, 2.0, 7)])
@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_epsilon_is_dp_accountings(q, z, rounds, kind):
    gaussian = dp_accounting.GaussianDpEvent(z)
    event = dp_accounting.SelfComposedDpEvent(
        gaussian if q >= 1 else dp_accounting.PoissonSampledDpEvent(q, gaussian), rounds)
    accountant = PLDAccountant() if kind == "pld" else RdpAccountant()
    expected = accountant.compose(event).get_epsilon(1e-5)
    assert client_level_epsilon(q, z, rounds, 1e-5, kind) == pytest.approx(expected, rel=1e-9)
    assert math.isinf(client_level_epsilon(q, 0.0, rounds, 1e-5, kind))


def test_calibrated_noise_meets_the_target_and_little_less_does_not():
    z = calibrate_noise(0.5, 40, 1e-5, 2.0)
    assert client_level_epsilon(0.5, z, 40, 1e-5) <= 2.0
    assert client_level_epsilon(0.5, z * 0.98, 40, 1e-5) > 2.0


def test_rdp_accounting_does_not_flood_the_output(caplog):
    # at these (q, z) dp-accounting's RDP logs a warning per dropped order (dozens of lines)
    with caplog.at_level("WARNING"):
        eps = client_level_epsilon(0.3, 2.55, 150, 1e-5, "rdp")
    assert math.isfinite(eps)
    assert not [r for r in caplog.records if r.name == "absl"]


def test_clipping_bounds_every_update_and_leaves_small_ones_alone():
    gen = np.random.default_rng(0)
    clip = clip_update(1.5)
    for scale in (0.01, 1.0, 100.0):
        up = Upload("a", {"w": gen.normal(0, scale, 20), "b": gen.normal(0, scale, 1)}, 10, "delta")
        out = clip(up)
        norm = math.sqrt(sum(float(v @ v) for v in out.payload.values()))
        before = math.sqrt(sum(float(v @ v) for v in up.payload.values()))
        assert norm <= 1.5 * (1 + 1e-12)
        if before <= 1.5:
            assert out is up
        else:
            np.testing.assert_allclose(out.payload["w"] / up.payload["w"], 1.5 / before)


def test_the_noise_standard_deviation_is_z_times_the_sensitivity():
    sizes = {"a": 100.0, "b": 300.0, "c": 50.0}
    step = dp_gaussian_mean(1.3, 2.0, sizes, 0.5, KeyedRng(7))
    stack = StackedUploads(("a", "b"), {"w": np.zeros((2, 4000))}, np.array([100.0, 300.0]), "delta", {})
    draws = np.concatenate([step.apply(stack, None, {}, r)[0]["w"] for r in range(10)])
    expected = 1.3 * dp_sensitivity(2.0, sizes, 0.5)
    assert expected == pytest.approx(1.3 * 2.0 * 300 / (0.5 * 450))
    assert np.std(draws) == pytest.approx(expected, rel=0.02)
    assert abs(np.mean(draws)) < 4 * expected / math.sqrt(draws.size)
    again = step.apply(stack, None, {}, 3)[0]["w"]  # the same round draws the same noise (resume)
    np.testing.assert_array_equal(again, draws[3 * 4000:4 * 4000])


def test_without_noise_or_clipping_it_is_fedavgs_mean_bit_for_bit():
    fed = load_dataset("heart-disease")
    values = {"data": {"dataset": "heart-disease"}, "repeats": 1, "methods": ["fedavg", "fedprox"],
              "training": {"rounds": 6, "local_steps": 3}}
    plain = results_document(run_experiment(build_config(values), fed))
    private = results_document(run_experiment(build_config(
        {**values, "privacy": {"dp": "client", "clip": 1e300, "noise": 0.0}}), fed))
    assert private["results"] == plain["results"]
    assert private["histories"]["FedAvg"]["train_loss"] == plain["histories"]["FedAvg"]["train_loss"]
    assert private["privacy"]["dp"] == "client" and plain["privacy"]["ledger"] == []
    import json

    json.dumps(private, allow_nan=False)  # no noise: epsilon is unbounded, written as null, never inf
    assert private["privacy"]["epsilon_by_setting"]["FedAvg"] is None


def test_a_private_run_keeps_a_ledger_per_site_and_differs_from_the_plain_one():
    fed = load_dataset("heart-disease")
    values = {"data": {"dataset": "heart-disease"}, "repeats": 2, "methods": ["fedavg"],
              "training": {"rounds": 8, "local_steps": 3, "fraction_fit": 0.5},
              "privacy": {"dp": "client", "clip": 0.5, "target_epsilon": 4.0}}
    doc = results_document(run_experiment(build_config(values), fed))
    ledger = doc["privacy"]["ledger"]
    assert len(ledger) == 2 * len(fed.site_names)
    assert all(LEDGER_KEYS <= set(e) for e in ledger)
    assert {e["site"] for e in ledger} == set(fed.site_names)
    z = ledger[0]["noise_multiplier"]
    assert all(e["epsilon"] <= 4.0 and e["sampling_rate"] == 0.5 and e["steps"] == 8 for e in ledger)
    assert ledger[0]["epsilon"] == pytest.approx(client_level_epsilon(0.5, z, 8, 1e-5))
    # the run says which noise multiplier it chose for the target, in the file and under the table
    assert doc["privacy"]["noise_by_setting"] == {"FedAvg": z}
    assert f"FedAvg eps = 4 (z = {z:.3g} chosen)" in privacy_lines(doc)[0]


def test_poisson_participation_is_keyed_by_site_and_has_rate_q():
    algorithm = FederatedAlgorithm("fedavg", None, chain(weighted_mean(), apply_delta()))
    names = tuple(f"s{i}" for i in range(20))
    server = ServerProgram(algorithm, names, fraction=0.3, poisson=True)
    reordered = ServerProgram(algorithm, names[::-1], fraction=0.3, poisson=True)
    rng = KeyedRng(2)
    cohorts = [server.cohort(r, rng) for r in range(400)]
    assert np.mean([len(c) for c in cohorts]) == pytest.approx(0.3 * 20, rel=0.05)
    assert all(set(server.cohort(r, rng)) == set(reordered.cohort(r, rng)) for r in range(50))


@pytest.mark.parametrize("privacy,words", [
    ({"dp": "client", "noise": 1.0}, "needs clip"),
    ({"dp": "client", "clip": 1.0}, "noise multiplier"),
    ({"dp": "distributed", "clip": 1.0, "noise": 1.0}, "needs secure aggregation"),
    ({"dp": "sample", "noise": 1.0}, "each row's gradient"),
])
def test_incomplete_privacy_settings_are_one_clear_error(privacy, words):
    with pytest.raises(ConfigError, match=words):
        build_config({"data": {"dataset": "heart-disease"}, "privacy": privacy})


def test_a_method_that_reads_individual_uploads_is_refused_before_training():
    fed = load_dataset("heart-disease")
    for method in ("scaffold", "median", "fair"):
        config = build_config({"data": {"dataset": "heart-disease"}, "methods": [method], "repeats": 1,
                               "privacy": {"dp": "client", "clip": 1.0, "noise": 1.0}})
        with pytest.raises(ConfigError, match="cannot run with client-level DP"):
            run_experiment(config, fed)


def test_the_markdown_table_gains_an_epsilon_column_with_dp():
    from medfed.experiments.report import results_markdown

    fed = load_dataset("heart-disease")
    values = {"data": {"dataset": "heart-disease"}, "repeats": 1, "methods": ["mix", "fedavg"],
              "training": {"rounds": 4, "local_steps": 2}}
    plain = results_markdown(results_document(run_experiment(build_config(values), fed)))
    private = results_markdown(results_document(run_experiment(build_config(
        {**values, "privacy": {"dp": "client", "clip": 1.0, "noise": 1.0}}), fed)))
    assert "ε" not in plain
    eps = client_level_epsilon(1.0, 1.0, 4, 1e-5)
    fedavg_rows = [line for line in private.splitlines() if "| FedAvg |" in line]
    mix_rows = [line for line in private.splitlines() if "| Mix |" in line]
    assert fedavg_rows and all(line.rstrip(" |").endswith(f"{eps:.3g}") for line in fedavg_rows)
    assert mix_rows and all(line.rstrip(" |").endswith("—") for line in mix_rows)  # no federated release


def test_adaptive_clipping_tracks_the_median_update_norm():
    """Andrew et al., 2021: without noise the clip moves geometrically toward the quantile."""
    from medfed.client.local import LocalData, LocalTraining
    from medfed.engine import run_federated
    from medfed.methods.privacy import client_dp
    from medfed.models import LogisticRegression

    norms = {f"s{i}": float(i + 1) for i in range(5)}  # updates of norm 1..5: the median is 3

    def constant(params, data, training, state, rng):
        return Upload(data.name, {"weight": np.zeros(2), "bias": np.array([norms[data.name]])}, 10, "delta",
                      {"loss": 0.5}), state

    sites = [LocalData(name, np.zeros((10, 2)), np.zeros(10)) for name in norms]
    algorithm = client_dp(FederatedAlgorithm("fedavg", constant, chain(weighted_mean(), apply_delta())),
                             "fedavg", clip=100.0, noise_multiplier=0.0, sizes={s: 10.0 for s in norms}, rate=1.0,
                             rng=KeyedRng(0), adaptive=True)
    init = {"weight": np.zeros(2), "bias": np.zeros(1)}
    run = run_federated(algorithm, init, sites, LocalTraining(LogisticRegression(), 0.1, 1), 200, KeyedRng(0))
    clips = [r.report["dp_adaptive_mean"]["clip"] for r in run.history]
    assert clips[0] == 100.0 and clips[30] < clips[0] * math.exp(-0.1 * 29) * 1.0001
    assert 2.0 <= run.server_state["dp_adaptive_mean"].clip <= 4.0
    # every round's uploads were clipped to the bound the server had sent for that round
    last = run.history[-1].report["dp_adaptive_mean"]
    assert last["next_clip"] == run.server_state["dp_adaptive_mean"].clip


def test_the_adaptive_noise_split_keeps_the_overall_multiplier():
    from medfed.server.dp import adaptive_noise

    for z in (0.5, 1.0, 3.0):
        z_update, sigma_bits = adaptive_noise(z, 0.1)
        assert z_update ** -2 + (2 * sigma_bits) ** -2 == pytest.approx(z ** -2, rel=1e-12)


# -- sample level: DP-SGD inside local training -------------------------------------------------

def _rows(n=60, d=3, seed=0):
    gen = np.random.default_rng(seed)
    X = gen.normal(0, 1, (n, d))
    return X, (X @ np.arange(1.0, d + 1) + gen.normal(0, 1, n) > 0).astype(float)


def test_per_example_gradients_average_to_the_models_gradient():
    from medfed.models import LogisticRegression

    X, y = _rows()
    model = LogisticRegression()
    params = {"weight": np.array([0.3, -0.2, 0.1]), "bias": np.array([0.05])}
    per = model.per_example_gradients(params, X, y)
    full, _ = model.gradient(params, X, y)
    for k in full:
        np.testing.assert_allclose(per[k].mean(axis=0), full[k], rtol=0, atol=1e-15)


def test_dp_sgd_without_noise_or_clipping_on_every_row_is_gradient_descent():
    from medfed.client.dp_sgd import DpSgd, dp_sgd_descend
    from medfed.models import LogisticRegression

    X, y = _rows()
    model = LogisticRegression()
    init = model.init_params((3,), KeyedRng(0))
    plain, _ = descend(model, init, X, y, [None] * 10, 0.5, 0.01)
    private, loss = dp_sgd_descend(model, init, X, y, 10, 10**6, 0.5, 0.01, KeyedRng(1), DpSgd(1e300, 0.0))
    assert math.isnan(loss)  # no loss on the site's rows leaves it
    for k in plain:
        np.testing.assert_allclose(private[k], plain[k], rtol=0, atol=1e-12)


def test_dp_sgd_clips_each_row_and_adds_noise_of_z_clip_over_the_expected_batch():
    from medfed.client.dp_sgd import DpSgd, dp_sgd_descend
    from medfed.models import LogisticRegression

    X, y = _rows(n=200)
    model = LogisticRegression()
    zero = {"weight": np.zeros(3), "bias": np.zeros(1)}
    # no noise: one step moves at most lr * clip * rows / expected (every row's gradient clipped)
    for clip in (0.01, 0.1):
        step, _ = dp_sgd_descend(model, zero, X * 100, y, 1, 200, 1.0, 0.0, KeyedRng(2), DpSgd(clip, 0.0))
        moved = math.sqrt(sum(float(v @ v) for v in step.values()))
        assert moved <= clip * (1 + 1e-9)
    # rows that carry no signal: the weight moves by the noise alone, std lr * z * clip / (q n)
    draws = [dp_sgd_descend(model, zero, np.zeros((200, 3)), y, 1, 50, 1.0, 0.0, KeyedRng(3, (i,)),
                            DpSgd(2.0, 1.5))[0]["weight"] for i in range(3000)]
    assert np.std(draws) == pytest.approx(1.5 * 2.0 / 50, rel=0.03)


def test_sample_level_dp_keeps_each_sites_own_ledger():
    fed = load_dataset("heart-disease")
    values = {"data": {"dataset": "heart-disease"}, "repeats": 1, "methods": ["fedavg", "median"],
              "training": {"rounds": 5, "local_steps": 4, "batch_size": 32},
              "privacy": {"dp": "sample", "clip": 1.0, "noise": 1.1}}
    doc = results_document(run_experiment(build_config(values), fed))
    sizes = {}
    for e in doc["privacy"]["ledger"]:
        assert LEDGER_KEYS <= set(e) and e["mode"] == "sample" and e["steps"] == 20
        assert e["epsilon"] == pytest.approx(client_level_epsilon(e["sampling_rate"], 1.1, 20, 1e-5))
        sizes[e["site"]] = e["sampling_rate"]
    assert len(set(sizes.values())) == len(fed.site_names)  # each site its own rate: its own spending
    assert all(r["computable"] for r in doc["results"])  # no reported loss is not a divergence


@pytest.mark.parametrize("method,extra,words", [
    ("ditto", {}, "own optimizer terms"),
    ("fedavg", {"training": {"batch_size": None}}, "--batch-size"),
])
def test_what_dp_sgd_cannot_run_yet_is_refused_before_training(method, extra, words):
    fed = load_dataset("heart-disease")
    values = {"data": {"dataset": "heart-disease"}, "repeats": 1, "methods": [method],
              "training": {"rounds": 2, "batch_size": 32}, "privacy": {"dp": "sample", "clip": 1.0, "noise": 1.0}}
    values.update({k: {**values[k], **v} for k, v in extra.items()})
    with pytest.raises(ConfigError, match=words):
        run_experiment(build_config(values), fed)


def test_the_server_holds_every_decoded_update_to_the_clip_the_noise_is_sized_for():
    # a lossy codec (q8, top-k with error feedback) can carry a clipped update past the clip;
    # the noised mean must still move by at most the sensitivity when one site changes
    sizes = {"a": 10.0, "b": 30.0}
    step = dp_gaussian_mean(0.0, 1.0, sizes, 1.0, KeyedRng(0))
    inside = np.array([[0.6, 0.0]])
    beyond = np.array([[3.0, 4.0]])  # norm 5: five times the clip
    stack = StackedUploads(("a", "b"), {"w": np.vstack([inside, beyond])}, np.array([10.0, 30.0]), "delta", {})
    mean, _, _ = step.apply(stack, None, {"w": np.zeros(2)}, 0)
    np.testing.assert_allclose(mean["w"], (10 * inside[0] + 30 * beyond[0] / 5) / 40, rtol=1e-15)
    within = StackedUploads(("a", "b"), {"w": np.vstack([inside, beyond / 5])}, np.array([10.0, 30.0]), "delta", {})
    plain = weighted_mean().apply(within, None, {"w": np.zeros(2)}, 0)[0]
    assert np.array_equal(step.apply(within, None, {"w": np.zeros(2)}, 0)[0]["w"], plain["w"])  # within: untouched
