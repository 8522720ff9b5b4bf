"""Results that must not be silently wrong (issue 8 §3) and a study refused before it trains (§2).

A model whose loss, parameters or scores become NaN/Inf is *diverged*, not "AUC 0.500"; a setting
with no accepted upload is not computable; Cross with one site says why it has no rows; every
method option error is one line before training; the robustness audit trains through the same
path as the harness.
"""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from medfed.cli.app import app
from medfed.data.federation import Federation, Site
from medfed.errors import ConfigError
from medfed.experiments.audit import Attack, run_robustness_audit
from medfed.experiments.config import build_config
from medfed.experiments.harness import federated_failure, run_experiment
from medfed.experiments.results import communication_lines, results_document, table_rows

from conftest import synthetic_federation

runner = CliRunner()
SHORT = {"rounds": 6, "local_steps": 3}


def _config(methods, repeats=2, **training):
    return build_config({
        "data": {"dataset": "adni-like"}, "methods": methods, "repeats": repeats,
        "training": {**SHORT, **training},
    })


def _doc(config, federation=None):
    from medfed.experiments.harness import load_federation

    federation = federation or load_federation(config.data)
    return results_document(run_experiment(config, federation))


def _rows(doc, setting):
    return [r for r in doc["results"] if r["setting"] == setting]


# --------------------------------------------------------------------------- divergence


@pytest.mark.parametrize("training", [{"lr": 1e6}, {"l2": 1e308}])
def test_a_model_that_blows_up_is_reported_diverged_not_scored(training):
    # the survey's budget (50 rounds x 10 steps), where these values used to score "AUC 0.500"
    doc = _doc(_config(["single", "mix", "fedavg", "fedsgd"], rounds=50, local_steps=10, **training))
    for setting in ("Single", "Mix", "FedAvg", "FedSGD"):
        for row in _rows(doc, setting):
            assert not row["computable"], (setting, row)
            assert row["diverged"] and all(d["reason"].startswith("diverged") for d in row["diverged"])
            assert {d["repeat"] for d in row["diverged"]} == {0, 1}
            assert all(row["metrics"][m]["mean"] is None for m in ("acc", "sen", "spe", "auc"))
    # a federated model says in which round it blew up
    fedavg = _rows(doc, "FedAvg")[0]["diverged"][0]
    assert isinstance(fedavg["round"], int) and 1 <= fedavg["round"] <= 50
    cells = {r["label"]: r["cells"] for r in table_rows(doc)}
    assert cells["FedAvg"] == ["diverged"] * 4 and cells["Mix"] == ["diverged"] * 4


def test_a_feature_near_the_largest_float_diverges_instead_of_scoring_chance():
    fed = synthetic_federation(sizes=(60, 50), d=3)
    sites = [Site(s.name, np.where(np.arange(s.X.shape[1]) == 0, 1e307, 0.0) * s.X, s.y) for s in fed.sites]
    fed = Federation("huge", tuple(sites), fed.feature_names)
    config = build_config({"data": {"dataset": "adni-like"}, "methods": ["mix", "fedavg"], "repeats": 1,
                           "scaling": "none", "training": SHORT})
    doc = _doc(config, fed)
    for row in doc["results"]:
        assert row["diverged"] and not row["computable"], row


def test_a_training_loss_that_ends_far_above_its_start_is_warned_about():
    doc = _doc(_config(["single", "mix", "fedavg"], repeats=1, lr=10.0, rounds=5))
    rising = [w for w in doc["warnings"] if "ended above 2x where it started" in w]
    assert {w.split(":")[0] for w in rising} >= {"Mix", "FedAvg"}
    notes = {r["label"]: r["notes"] for r in table_rows(doc)}  # and the rows themselves say so
    assert any("ended above 2x" in n for n in notes["Mix"]) and any("ended above 2x" in n for n in notes["FedAvg"])
    quiet = _doc(_config(["mix", "fedavg"], repeats=1))
    assert not [w for w in quiet["warnings"] if "ended above" in w]


def test_a_setting_whose_every_upload_was_rejected_is_not_computable():
    doc = _doc(_config(["fedavg", "mix"], max_update_norm=1e-12))
    for row in _rows(doc, "FedAvg"):
        assert not row["computable"] and not row["diverged"]
        assert "accepted no upload in any of the 6 rounds" in row["reason"]
        assert "exceeds the bound" in row["reason"]
    assert all(r["computable"] for r in _rows(doc, "Mix"))
    assert {r["label"]: r["cells"] for r in table_rows(doc)}["FedAvg"] == ["not computable"] * 4


def test_failure_reasons_read_the_round_history():
    from medfed.engine.loop import FederatedRun, RoundRecord

    finite = {"w": np.zeros(2)}
    rejected = RoundRecord(0, (), float("nan"), 0, rejected={"a": "'w' contains NaN or Inf",
                                                             "b": "'w' contains NaN or Inf"}, skipped="0 valid")
    fine = RoundRecord(1, ("a",), 0.5, 16)
    assert federated_failure(FederatedRun(finite, [fine])) is None
    diverged = federated_failure(FederatedRun(finite, [fine, rejected]))
    assert diverged.kind == "diverged" and diverged.round == 1  # 1-based round of the record with round 0
    norm = RoundRecord(0, (), float("nan"), 0, rejected={"a": "update norm 3 exceeds the bound 1"}, skipped="0 valid")
    assert federated_failure(FederatedRun(finite, [norm, norm])).kind == "not computable"
    assert federated_failure(FederatedRun({"w": np.array([np.nan])}, [fine])).kind == "diverged"


def test_cross_with_a_single_site_is_shown_as_not_computable():
    fed = synthetic_federation(sizes=(80,))
    config = build_config({"data": {"dataset": "adni-like"}, "methods": ["cross", "single", "fedavg"],
                           "repeats": 1, "training": SHORT})
    doc = _doc(config, fed)
    cross = _rows(doc, "Cross")
    assert len(cross) == 1 and not cross[0]["computable"] and "single site" in cross[0]["reason"]
    labels = [r["label"] for r in table_rows(doc)]
    assert labels[0].startswith("Cross") and "Single" in labels


def test_fedsgd_communication_is_shown_next_to_fedavg():
    doc = _doc(_config(["fedavg", "fedsgd"], repeats=1))
    comm = {c["setting"]: c for c in doc["communication"]}
    assert comm["FedSGD"]["rounds"] == SHORT["rounds"] * SHORT["local_steps"] == 3 * comm["FedAvg"]["rounds"]
    assert comm["FedSGD"]["bytes_up_per_run"] == 3 * comm["FedAvg"]["bytes_up_per_run"] > 0
    (line,) = communication_lines(doc)
    assert "FedAvg 6 rounds" in line and "FedSGD 18 rounds" in line and "kB" in line


# --------------------------------------------------------------------------- refused up front


def _cli(args):
    result = runner.invoke(app, args)
    return result.exit_code, result.output


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_bad_method_option_is_one_line_before_training_with_any_worker_count(tmp_path, workers):
    code, text = _cli(["run", "--dataset", "adni-like", "--methods", "fedprox", "--mu", "-1", "--workers", workers,
                       "--repeats", "2", "--out", str(tmp_path / "o")])
    assert code == 2 and "Traceback" not in text and "'mu' must be a number >= 0" in text
    assert not (tmp_path / "o").exists()


def test_every_method_option_error_surfaces_before_any_training(monkeypatch):
    import medfed.experiments.harness as harness

    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(harness, "run_repeat", no_training)
    fed = synthetic_federation(sizes=(40, 40, 40))
    bad = {"fedprox": {"mu": -1}, "fedsgd": {"server_lr": -0.5}, "fair": {"q": -1}, "dos": {"temperature": 0},
           "trimmed_mean": {"beta": 0.7}, "apfl": {"alpha": 2}, "ditto": {"lam": -1}, "scaffold": {"server_lr": 0}}
    for name, opts in bad.items():
        config = build_config({"data": {"dataset": "adni-like"}, "methods": [name], "method_options": {name: opts}})
        with pytest.raises(ConfigError, match=name.split("_")[0]):
            run_experiment(config, fed)


def test_krum_family_on_too_few_sites_names_the_fix():
    fed = synthetic_federation(sizes=(40, 40, 40))
    for name, fix in (("krum", "--byzantine"), ("bulyan", "--byzantine"), ("multikrum", "--byzantine")):
        with pytest.raises(ConfigError, match=fix) as info:
            run_experiment(build_config({"data": {"dataset": "adni-like"}, "methods": [name]}), fed)
        assert "more sites" in str(info.value)
    # under leave-one-site-out each model sees one site fewer: said so
    fed5 = synthetic_federation(sizes=(40,) * 5)
    with pytest.raises(ConfigError, match="with --loso each model trains on 4 sites"):
        run_experiment(build_config({"data": {"dataset": "adni-like"}, "methods": ["krum"], "loso": True}), fed5)
    with pytest.raises(ConfigError, match="--loso"):
        run_experiment(build_config({"data": {"dataset": "adni-like"}, "methods": ["fedavg"], "loso": True}),
                       synthetic_federation(sizes=(60,)))


def test_options_for_a_method_not_run_are_refused_like_a_flag_no_method_takes(tmp_path):
    with pytest.raises(ConfigError, match=r"\[method_options.fedprox\].*not among the methods run"):
        run_experiment(build_config({"data": {"dataset": "adni-like"}, "methods": ["fedavg"],
                                     "method_options": {"fedprox": {"mu": 0.5}}}), synthetic_federation())
    config = tmp_path / "c.toml"
    config.write_text('methods = ["fedavg"]\n[data]\ndataset = "adni-like"\n[method_options.fedprox]\nmu = 0.5\n')
    code, text = _cli(["run", str(config), "--out", str(tmp_path / "o")])
    assert code == 2 and "not among the methods run" in text
    code, text = _cli(["run", "--dataset", "adni-like", "--methods", "fedavg", "--mu", "0.5", "--out", str(tmp_path)])
    assert code == 2 and "not among the methods run" in text


# --------------------------------------------------------------------------- the audit trains like the harness


def _audit(defenses, **training):
    config = build_config({"data": {"dataset": "breast-cancer", "options": {"n_sites": 4}}, "methods": defenses,
                           "repeats": 1, "training": {"rounds": 4, "local_steps": 2, **training}})
    return run_robustness_audit(config, Attack("sign_flip", corrupt=1))


def test_the_audit_honours_local_epochs():
    one = _audit(["fedavg"], batch_size=32, local_epochs=1)["defenses"][0]["clean"]["auc"]["values"]
    three = _audit(["fedavg"], batch_size=32, local_epochs=3)["defenses"][0]["clean"]["auc"]["values"]
    steps = _audit(["fedavg"], batch_size=32)["defenses"][0]["clean"]["auc"]["values"]
    assert one != three and one != steps


def test_the_audit_gives_fedsld_the_label_counts_at_setup(monkeypatch):
    import medfed.methods.client_end as client_methods

    priors = []
    real = client_methods.fedsld_update

    def spy(*args, label_prior=None, **kwargs):
        priors.append(label_prior)
        return real(*args, label_prior=label_prior, **kwargs)

    monkeypatch.setattr(client_methods, "fedsld_update", spy)
    _audit(["fedsld"])
    assert priors and priors[0] is not None  # the first round already knows the federation's labels


def test_the_audit_trims_one_site_per_side_on_three_sites_by_default():
    config = build_config({"data": {"dataset": "breast-cancer", "options": {"n_sites": 3}},
                           "methods": ["trimmed_mean"], "repeats": 1, "training": {"rounds": 3, "local_steps": 2}})
    doc = run_robustness_audit(config, Attack("sign_flip", corrupt=1))
    (row,) = doc["defenses"]
    assert row["computable"] == {"clean": True, "attacked": True}, row["notes"]
    assert int(row["options"]["beta"] * 3) == 1 and row["options"]["beta"] < 0.5


def test_the_audit_reports_a_defense_that_diverges_under_attack(tmp_path):
    config = build_config({"data": {"dataset": "breast-cancer", "options": {"n_sites": 4}},
                           "methods": ["fedavg", "median"], "repeats": 1, "training": {"rounds": 4, "local_steps": 2}})
    doc = run_robustness_audit(config, Attack("scale", corrupt=1, scale=1e150))
    fedavg, median = doc["defenses"]
    assert fedavg["diverged"]["attacked"] and not fedavg["computable"]["attacked"]
    assert median["computable"]["attacked"]
    json.dumps(doc, allow_nan=False)


# --------------------------------------------------------------------------- the audit's command line


def _hospital_table(path, rng_seed=0):
    import pandas as pd

    rng = np.random.default_rng(rng_seed)
    frames = []
    for k, n in enumerate((50, 45, 40, 35)):
        X = rng.normal(size=(n, 3))
        age = X[:, 0].copy()
        age[::9] = np.nan  # missing values: need --impute
        frames.append(pd.DataFrame({
            "hospital": f"H{k}", "age": age, "vol": X[:, 1], "noise": X[:, 2],
            "scanner": np.where(X[:, 2] > 0, "GE", "Siemens"),
            "dx": np.where(X[:, 1] + rng.normal(size=n) > 0, "AD", "NC"),
        }))
    pd.concat(frames, ignore_index=True).to_csv(path, index=False)
    return path


def test_audit_takes_the_data_flags_of_run(tmp_path):
    table = _hospital_table(tmp_path / "t.csv")
    common = ["--data", str(table), "--site-column", "hospital", "--label-column", "dx", "--positive-label", "AD"]
    args = ["audit", "robustness", "--attack", "sign_flip", "--defenses", "fedavg,median", "--repeats", "1",
            "--rounds", "3", "--local-steps", "2", *common]
    # without --impute or --features the table is refused, as `run` refuses it
    code, text = _cli([*args, "--out", str(tmp_path / "a")])
    assert code == 2 and "--impute" in text and "scanner" in text
    code, text = _cli([*args, "--features", "age,vol", "--impute", "mean", "--local-epochs", "1",
                       "--batch-size", "16", "--out", str(tmp_path / "b")])
    assert code == 0, text
    doc = json.loads((tmp_path / "b" / "robustness.json").read_text())
    assert doc["config"]["data"]["features"] == ["age", "vol"] and doc["config"]["data"]["impute"] == "mean"
    assert doc["config"]["training"]["local_epochs"] == 1
    code, text = _cli([*args, "--exclude", "scanner", "--impute", "median", "--out", str(tmp_path / "c")])
    assert code == 0, text
    assert json.loads((tmp_path / "c" / "robustness.json").read_text())["config"]["data"]["exclude"] == ["scanner"]


def test_audit_reads_a_config_file_whose_methods_are_the_defenses(tmp_path):
    _hospital_table(tmp_path / "t.csv")
    config = tmp_path / "study.toml"
    config.write_text(
        'methods = ["fedavg", "trimmed_mean"]\nrepeats = 1\n'
        '[data]\npath = "t.csv"\nsite_column = "hospital"\nlabel_column = "dx"\npositive_label = "AD"\n'
        'categorical = ["scanner"]\nimpute = "mean"\n'
        '[training]\nrounds = 3\nlocal_steps = 2\n'
    )
    code, text = _cli(["audit", "robustness", str(config), "--attack", "scale", "--out", str(tmp_path / "o")])
    assert code == 0, text
    doc = json.loads((tmp_path / "o" / "robustness.json").read_text())
    assert [d["name"] for d in doc["defenses"]] == ["fedavg", "trimmed_mean"] and doc["repeats"] == 1
    assert doc["config"]["training"]["rounds"] == 3
    # flags override the file
    code, text = _cli(["audit", "robustness", str(config), "--attack", "scale", "--defenses", "median",
                       "--repeats", "2", "--out", str(tmp_path / "p")])
    assert code == 0, text
    doc = json.loads((tmp_path / "p" / "robustness.json").read_text())
    assert [d["name"] for d in doc["defenses"]] == ["median"] and doc["repeats"] == 2


def test_a_method_whose_round_is_refused_mid_run_is_not_computable_and_the_others_still_run(monkeypatch):
    import dataclasses

    from medfed.errors import DataError
    from medfed.methods.registry import METHODS
    from medfed.server.aggregate import Aggregator, apply_delta, chain, weighted_mean

    def refuse_third_round():
        def apply(stack, state, global_params, round_):
            if round_ == 2:
                raise DataError("the server refused round 3 (a test of a data-dependent failure)")
            return stack, state, None

        return Aggregator(lambda params: None, apply, "refuse")

    fedavg = METHODS["fedavg"]

    def build(opts, training, context):
        algorithm = fedavg.build(opts, training, context)
        return dataclasses.replace(algorithm, aggregator=chain(refuse_third_round(), weighted_mean(), apply_delta()))

    monkeypatch.setitem(METHODS, "refusing", dataclasses.replace(fedavg, name="refusing", display="Refusing",
                                                                 build=build))
    doc = _doc(_config(["refusing", "fedavg"]))
    for row in _rows(doc, "Refusing"):
        assert not row["computable"] and "the server refused round 3" in row["reason"]
    assert all(r["computable"] for r in _rows(doc, "FedAvg"))


def test_scaffold_reports_the_control_variate_it_uploads_as_communication():
    doc = _doc(_config(["fedavg", "scaffold"], repeats=1))
    comm = {c["setting"]: c["bytes_up_per_run"] for c in doc["communication"]}
    assert comm["SCAFFOLD"] == 2 * comm["FedAvg"]  # the model delta and the control delta, same size
