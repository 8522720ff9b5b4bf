"""Corrupted sites (client/adversary.py) and the robustness audit (experiments/audit.py, CLI)."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from medfed.cli.app import app
from medfed.client import LocalData, LocalTraining, local_sgd_update
from medfed.client.adversary import (
    check_attack,
    corrupt_data,
    corrupt_rule,
    flip_labels,
    noisy_labels,
)
from medfed.client.upload import Upload
from medfed.data.datasets import load_dataset
from medfed.errors import ConfigError, DataError
from medfed.experiments.audit import Attack, choose_corrupted, run_robustness_audit
from medfed.experiments.config import build_config
from medfed.experiments.harness import run_experiment
from medfed.methods.registry import METHODS
from medfed.models import LogisticRegression
from medfed.rng import KeyedRng

MODEL = LogisticRegression()
FAST = {"rounds": 10, "local_steps": 5}


# --------------------------------------------------------------------------- data attacks


def test_flip_labels_flips_every_label_and_is_an_involution():
    y = np.random.default_rng(0).integers(0, 2, size=500).astype(np.int8)
    flipped = flip_labels(y)
    assert (flipped != y).all() and flipped.dtype == y.dtype
    np.testing.assert_array_equal(flip_labels(flipped), y)


def test_noisy_labels_change_about_half_the_rate_and_nothing_at_rate_zero():
    y = np.random.default_rng(1).integers(0, 2, size=40_000).astype(float)
    rng = KeyedRng(3, (7,))
    np.testing.assert_array_equal(noisy_labels(y, 0.0, rng), y)
    changed = {r: noisy_labels(y, r, KeyedRng(3, (7,))) != y for r in (0.2, 0.6)}
    for r, mask in changed.items():  # a redrawn label keeps its value half the time
        assert abs(mask.mean() - r / 2) < 4 * np.sqrt(r / 2 * (1 - r / 2) / y.size)
    assert not (changed[0.2] & ~changed[0.6]).any()  # same draws: a larger rate redraws a superset
    at_one = noisy_labels(y, 1.0, KeyedRng(3, (7,)))  # rate 1: labels carry no information
    assert abs(at_one[y == 1].mean() - 0.5) < 0.02 and abs(at_one[y == 0].mean() - 0.5) < 0.02
    np.testing.assert_array_equal(noisy_labels(y, 0.2, KeyedRng(3, (7,))), noisy_labels(y, 0.2, KeyedRng(3, (7,))))
    assert (noisy_labels(y, 0.2, KeyedRng(3, (8,))) != noisy_labels(y, 0.2, KeyedRng(3, (7,)))).any()


def test_label_attacks_need_binary_labels_and_only_touch_labels():
    with pytest.raises(DataError, match="binary"):
        flip_labels(np.array([0, 1, 2]))
    data = LocalData("s", np.ones((4, 2)), np.array([0.0, 1.0, 1.0, 0.0]))
    poisoned = corrupt_data(data, "label_flip", KeyedRng(0))
    assert poisoned.X is data.X and poisoned.name == "s"
    np.testing.assert_array_equal(poisoned.y, 1 - data.y)
    with pytest.raises(ConfigError, match="uploads, not data"):
        corrupt_data(data, "sign_flip", KeyedRng(0))


# --------------------------------------------------------------------------- update attacks


def _fixed_rule(kind, payload, n=17):
    def rule(global_params, data, config, state, rng, **message):
        return Upload(data.name, {k: v.copy() for k, v in payload.items()}, n, kind, {"loss": 0.5}), (state or 0) + 1

    return rule


GLOBAL = {"weight": np.array([1.0, -2.0, 0.5]), "bias": np.array([0.25])}
HONEST = {"weight": np.array([0.3, 0.1, -0.2]), "bias": np.array([-0.4])}
SITE = LocalData("bad", np.zeros((3, 3)), np.zeros(3))


def _send(rule, site=SITE, rng=None):
    return rule(GLOBAL, site, None, 0, rng or KeyedRng(0, (1,)))


@pytest.mark.parametrize("kind", ["delta", "gradient"])
def test_sign_flip_negates_scale_multiplies_free_rider_sends_zero(kind):
    honest = _fixed_rule(kind, HONEST)
    for attack, scale, factor in [("sign_flip", None, -1.0), ("sign_flip", 4.0, -4.0), ("scale", 3.0, 3.0),
                                  ("scale", None, 10.0), ("free_rider", None, 0.0)]:
        upload, state = _send(corrupt_rule(honest, attack, scale=scale))
        assert state == 1 and upload.kind == kind and upload.n_examples == 17 and upload.metrics == {"loss": 0.5}
        for k, value in HONEST.items():
            np.testing.assert_array_equal(upload.payload[k], factor * value)


def test_params_uploads_are_corrupted_as_updates_and_free_rider_returns_the_global_model():
    local = {k: GLOBAL[k] + HONEST[k] for k in GLOBAL}
    honest = _fixed_rule("params", local)
    flipped, _ = _send(corrupt_rule(honest, "sign_flip"))
    rider, _ = _send(corrupt_rule(honest, "free_rider"))
    for k, value in GLOBAL.items():
        np.testing.assert_allclose(flipped.payload[k], value - HONEST[k], rtol=0, atol=1e-15)
        np.testing.assert_array_equal(rider.payload[k], value)


def test_gaussian_replaces_the_upload_with_noise_of_the_stated_std():
    big = {"weight": np.full(40_000, 5.0), "bias": np.array([5.0])}
    upload, _ = _send(corrupt_rule(_fixed_rule("delta", big), "gaussian", sigma=2.5))
    w = upload.payload["weight"]
    assert abs(w.mean()) < 4 * 2.5 / np.sqrt(w.size)  # replaced, not added: mean 0, not 5
    assert abs(w.std() / 2.5 - 1) < 0.02
    again, _ = _send(corrupt_rule(_fixed_rule("delta", big), "gaussian", sigma=2.5))
    np.testing.assert_array_equal(again.payload["weight"], w)  # keyed by the rule's rng
    other, _ = _send(corrupt_rule(_fixed_rule("delta", big), "gaussian", sigma=2.5), rng=KeyedRng(0, (2,)))
    assert not np.array_equal(other.payload["weight"], w)


def test_wrapped_real_rule_is_negated_only_at_corrupted_sites():
    rng = np.random.default_rng(0)
    sites = [LocalData(n, rng.normal(size=(30, 3)), rng.integers(0, 2, 30).astype(float)) for n in ("a", "b")]
    training = LocalTraining(MODEL, 0.1, 5)
    rule = corrupt_rule(local_sgd_update, "sign_flip", sites={"b"})
    for site in sites:
        honest, _ = local_sgd_update(GLOBAL, site, training, None, KeyedRng(0))
        sent, _ = rule(GLOBAL, site, training, None, KeyedRng(0))
        sign = -1.0 if site.name == "b" else 1.0
        for k in GLOBAL:
            np.testing.assert_array_equal(sent.payload[k], sign * honest.payload[k])


@pytest.mark.parametrize(
    "kwargs,needle",
    [({"attack": "poison"}, "attack"), ({"attack": "scale", "scale": -2.0}, "scale"),
     ({"attack": "gaussian", "sigma": 0.0}, "sigma"), ({"attack": "noisy_labels", "rate": 1.5}, "rate"),
     ({"attack": "scale", "scale": float("nan")}, "scale"), ({"attack": "noisy_labels", "rate": "x"}, "rate")],
)
def test_bad_attack_parameters_are_one_clear_error(kwargs, needle):
    kwargs = dict(kwargs)
    with pytest.raises(ConfigError, match=needle):
        check_attack(kwargs.pop("attack"), **kwargs)


def test_data_attacks_are_not_rule_attacks():
    with pytest.raises(ConfigError, match="corrupt_data"):
        corrupt_rule(local_sgd_update, "label_flip")


# --------------------------------------------------------------------------- the audit


@pytest.fixture(scope="module")
def federation():
    return load_dataset("breast-cancer", n_sites=8)


def _config(methods, repeats=2, **extra):
    return build_config({"data": {"dataset": "breast-cancer", "options": {"n_sites": 8}}, "methods": methods,
                         "repeats": repeats, "training": FAST, **extra})


def _audit(federation, methods, attack, repeats=2, **extra):
    return run_robustness_audit(_config(methods, repeats, **extra), attack, federation=federation)


def _pooled(row, condition, metric):
    return np.array([r[condition]["pooled"][metric] for r in row["per_repeat"]])


@pytest.fixture(scope="module")
def sign_flip_doc(federation):
    methods = ["fedavg", "fedprox"] + (["median"] if "median" in METHODS else [])
    return _audit(federation, methods, Attack("sign_flip", corrupt=2, scale=10.0))


def test_sign_flip_times_ten_breaks_fedavg_on_clean_sites(sign_flip_doc):
    doc = sign_flip_doc
    assert doc["corrupt"] == 2 and len(doc["corrupted_sites"]) == 2
    names = [s["name"] for s in doc["sites"]]
    for chosen in doc["corrupted_sites"]:
        assert len(set(chosen)) == 2 and set(chosen) <= set(names)
    for row in doc["defenses"][:2]:  # fedavg, fedprox: one weighted mean, no defense
        for metric in ("auc", "acc"):
            assert (_pooled(row, "clean", metric) - _pooled(row, "attacked", metric) > 0.3).all(), row["name"]
        assert row["drop"]["auc"]["mean"] > 0.3 and row["clean"]["auc"]["mean"] > 0.9
        assert row["notes"] == []
    for r in doc["defenses"][0]["per_repeat"]:  # evaluated on the clean sites only
        assert set(r["attacked"]["sites"]) == set(names) - set(doc["corrupted_sites"][r["repeat"]])
    json.dumps(doc, allow_nan=False)


@pytest.mark.skipif("median" not in METHODS, reason="robust method 'median' is not registered in METHODS yet")
def test_median_restores_clean_site_auc_under_sign_flip(sign_flip_doc):
    median = next(d for d in sign_flip_doc["defenses"] if d["name"] == "median")
    fedavg = sign_flip_doc["defenses"][0]
    assert (_pooled(median, "attacked", "auc") > _pooled(median, "clean", "auc") - 0.02).all()
    assert (_pooled(median, "attacked", "auc") > _pooled(fedavg, "attacked", "auc") + 0.5).all()


@pytest.mark.filterwarnings("ignore::medfed.data.federation.SingleClassSiteWarning")
def test_clean_run_is_the_experiment_harness_fedavg(federation, sign_flip_doc):
    run = run_experiment(_config(["fedavg"]), federation)
    row = sign_flip_doc["defenses"][0]
    compared = 0
    for cell in run.cells:
        for r in row["per_repeat"]:
            if cell.test_site in r["clean"]["sites"]:
                for m in ("acc", "auc"):
                    assert r["clean"]["sites"][cell.test_site][m] == cell.metrics[m][r["repeat"]].value
                compared += 1
    assert compared == 2 * 6  # 2 repeats x 6 clean sites


@pytest.mark.filterwarnings("ignore::medfed.data.federation.SingleClassSiteWarning")
def test_the_audit_thresholds_each_clean_site_as_the_experiment_does(federation):
    from medfed.experiments.metrics import BINARY

    extra = {"evaluation": {"threshold": "youden"}}
    run = run_experiment(_config(["fedavg"], 1, **extra), federation)
    doc = _audit(federation, ["fedavg"], Attack("sign_flip", corrupt=2, scale=10.0), repeats=1, **extra)
    clean = doc["defenses"][0]["per_repeat"][0]["clean"]
    assert doc["threshold"] == "youden"
    for cell in run.cells:
        if cell.test_site in clean["sites"]:
            for m in BINARY.keys:
                assert clean["sites"][cell.test_site][m] == cell.metrics[m][0].value, m
            assert clean["threshold_logit"][cell.test_site] == cell.thresholds[0].logit
    assert len(set(clean["threshold_logit"].values())) > 1


def test_null_attacks_leave_the_run_unchanged(federation):
    # paired design: clean and attacked draw the same numbers, so an attack that changes nothing is exact
    for attack in (Attack("scale", corrupt=3, scale=1.0), Attack("noisy_labels", corrupt=3, rate=0.0)):
        row = _audit(federation, ["fedavg"], attack, repeats=1)["defenses"][0]
        assert row["per_repeat"][0]["clean"] == row["per_repeat"][0]["attacked"]
        assert row["drop"]["auc"]["mean"] == 0.0


def test_label_flip_lowers_fedavg_accuracy(federation):
    row = _audit(federation, ["fedavg"], Attack("label_flip", corrupt=3), repeats=3)["defenses"][0]
    assert row["drop"]["acc"]["mean"] > 0.05
    assert (_pooled(row, "attacked", "acc") < _pooled(row, "clean", "acc")).all()


def test_audit_is_deterministic_for_a_seed(federation):
    attack = Attack("gaussian", corrupt=2, sigma=3.0)
    a = _audit(federation, ["fedavg"], attack)
    b = _audit(federation, ["fedavg"], attack)
    a.pop("runtime_s"), b.pop("runtime_s")
    assert a == b


def test_corrupted_sites_depend_on_names_not_their_order():
    names = [f"site-{k}" for k in range(10)]
    for repeat in range(5):
        chosen = choose_corrupted(names, 3, seed=4, repeat=repeat)
        assert len(chosen) == 3
        assert set(choose_corrupted(names[::-1], 3, seed=4, repeat=repeat)) == set(chosen)


@pytest.mark.skipif(not {"krum", "bulyan"} <= set(METHODS), reason="robust methods not registered in METHODS yet")
def test_f_follows_corrupt_and_unmet_assumptions_are_noted_not_fatal(federation):
    doc = _audit(federation, ["krum", "bulyan"], Attack("sign_flip", corrupt=2), repeats=1)
    krum, bulyan = doc["defenses"]
    assert krum["options"]["f"] == 2 and bulyan["options"]["f"] == 2
    assert krum["computable"] == {"clean": True, "attacked": True}
    assert bulyan["computable"] == {"clean": False, "attacked": False}  # needs K >= 4f + 3 = 11 sites
    assert any("4f + 3" in n for n in bulyan["notes"]) and bulyan["attacked"]["auc"]["mean"] is None
    doc = _audit(federation, ["krum"], Attack("sign_flip", corrupt=2), repeats=1,
                 method_options={"krum": {"f": 1}})
    assert doc["defenses"][0]["options"]["f"] == 1
    assert any("f=1" in n for n in doc["defenses"][0]["notes"])


@pytest.mark.parametrize(
    "methods,attack,needle",
    [(["fedavg"], {"kind": "sign_flip", "corrupt": 8}, "corrupt"),
     (["fedavg"], {"kind": "sign_flip", "corrupt": 0}, "corrupt"),
     (["mix"], {"kind": "sign_flip", "corrupt": 1}, "defenses"),
     (["fedzzz"], {"kind": "sign_flip", "corrupt": 1}, "fedzzz")],
)
def test_bad_audit_inputs_are_one_clear_error(federation, methods, attack, needle):
    with pytest.raises(ConfigError, match=needle):
        _audit(federation, methods, Attack(**attack))


# --------------------------------------------------------------------------- command line


def test_cli_writes_json_csv_markdown_and_shows_the_table(tmp_path):
    out = tmp_path / "audit"
    args = ["audit", "robustness", "--dataset", "breast-cancer", "--dataset-option", "n_sites=8",
            "--attack", "sign_flip", "--scale", "10", "--corrupt", "2", "--defenses", "fedavg,fedprox",
            "--repeats", "2", "--rounds", "5", "--local-steps", "3", "--method-option", "fedprox.mu=0.5",
            "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "robustness.json").read_text())
    assert doc["attack"]["kind"] == "sign_flip" and doc["attack"]["scale"] == 10.0
    assert [d["name"] for d in doc["defenses"]] == ["fedavg", "fedprox"]
    assert doc["defenses"][1]["options"]["mu"] == 0.5 and doc["config"]["training"]["rounds"] == 5
    csv_lines = (out / "robustness.csv").read_text().splitlines()
    assert csv_lines[0].startswith("defense,method,condition") and len(csv_lines) == 1 + 2 * 3
    assert "| FedAvg | clean |" in (out / "robustness.md").read_text()
    assert "Attacked AUC" in result.output and "FedProx" in result.output
    assert not list(out.glob(".*tmp*"))


@pytest.mark.parametrize("flags,needle", [(["--attack", "poison"], "attack"), (["--corrupt", "8"], "corrupt"),
                                          (["--defenses", "single"], "defenses"), (["--rate", "2"], "rate")])
def test_cli_bad_inputs_exit_2_with_one_line_and_write_nothing(tmp_path, flags, needle):
    args = ["audit", "robustness", "--dataset", "breast-cancer", "--dataset-option", "n_sites=8",
            "--attack", "noisy_labels", "--defenses", "fedavg", "--rounds", "2", "--repeats", "1",
            "--out", str(tmp_path / "o"), *flags]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and needle in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_audit_runs_on_a_users_table_and_on_images_with_a_cnn(tmp_path):
    runner = CliRunner()
    rng = np.random.default_rng(0)
    rows = []
    for k in range(5):
        X = rng.normal(size=(30, 3))
        for x in X:
            rows.append(f"h{k},{int(x[0] + 0.3 * rng.normal() > 0)},{x[0]:.5f},{x[1]:.5f},{x[2]:.5f}")
    (tmp_path / "t.csv").write_text("site,dx,a,b,c\n" + "\n".join(rows) + "\n")
    result = runner.invoke(app, ["audit", "robustness", "--data", str(tmp_path / "t.csv"), "--site-column", "site",
                                 "--label-column", "dx", "--attack", "sign_flip", "--scale", "5", "--corrupt", "1",
                                 "--defenses", "fedavg,median", "--repeats", "1", "--rounds", "5",
                                 "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "a" / "robustness.json").read_text())
    assert [d["name"] for d in doc["defenses"]] == ["fedavg", "median"] and len(doc["sites"]) == 5

    pytest.importorskip("torch")
    result = runner.invoke(app, ["audit", "robustness", "--dataset", "mni-phantom", "--dataset-option",
                                 "n_per_site=40", "--dataset-option", "n_sites=4", "--model", "torch_logistic",
                                 "--attack", "scale", "--corrupt", "1", "--defenses", "fedavg", "--repeats", "1",
                                 "--rounds", "2", "--local-steps", "2", "--out", str(tmp_path / "img")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "img" / "robustness.json").read_text())["config"]["model"] == "torch_logistic"

    both = runner.invoke(app, ["audit", "robustness", "--dataset", "adni-like", "--data", str(tmp_path / "t.csv"),
                               "--attack", "scale", "--out", str(tmp_path / "x")])
    assert both.exit_code == 2 and "give one data source" in both.output
