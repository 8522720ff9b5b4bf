"""Server pipelines listed in a config file: built from step names, checked for shape."""

import numpy as np
import pytest

from medfed.errors import ConfigError
from medfed.experiments.config import build_config
from medfed.experiments.harness import run_experiment
from medfed.experiments.results import results_document
from medfed.methods.steps import REDUCING_STEPS, STEPS, UPDATE_STEPS, build_pipeline


def _config(methods, pipelines, **kw):
    values = {"data": {"dataset": "adni-like"}, "repeats": 1, "methods": methods, "pipelines": pipelines,
              "training": {"rounds": 6, "local_steps": 3}}
    values.update(kw)
    return build_config(values)


def _values(doc, setting):
    return [r["metrics"]["auc"]["values"] for r in doc["results"] if r["setting"] == setting]


def test_a_weighted_mean_pipeline_is_fedavg_and_server_steps_change_it(federation):
    pipelines = {
        "mine": {"steps": ["weighted_mean"]},
        "mine_momentum": {"steps": ["weighted_mean", {"step": "server_momentum", "lr": 1.0, "momentum": 0.0}]},
        "adam": {"steps": ["weighted_mean", {"step": "server_adam", "lr": 0.05}], "display": "Adam!"},
    }
    doc = results_document(run_experiment(_config(["fedavg", "mine", "mine_momentum", "adam"], pipelines), federation))
    assert _values(doc, "mine") == _values(doc, "FedAvg") == _values(doc, "mine_momentum")
    assert _values(doc, "Adam!") != _values(doc, "FedAvg")
    assert doc["histories"]["mine"]["train_loss"] == doc["histories"]["FedAvg"]["train_loss"]


def test_a_fedprox_client_pipeline_is_fedprox(federation):
    pipelines = {"prox": {"steps": ["weighted_mean", "apply_delta"], "client": "fedprox", "mu": 0.3}}
    config = _config(["fedprox", "prox"], pipelines, method_options={"fedprox": {"mu": 0.3}})
    doc = results_document(run_experiment(config, federation))
    assert _values(doc, "prox") == _values(doc, "FedProx")


@pytest.mark.parametrize(
    "steps, message",
    [
        (["server_adam"], "first step must reduce"),
        (["median", "krum"], "reduces uploads, but they were reduced by step 1"),
        (["median", "apply_delta", "guided"], "must be the last step"),
        (["medain"], "unknown step 'medain'"),
        ([{"step": "trimmed_mean", "bta": 0.2}], "step 'trimmed_mean' has no option 'bta'; its options: beta"),
        ([{"beta": 0.2}], "a step is a name or a table"),
        ([{"step": "trimmed_mean", "beta": 0.7}], "beta"),
    ],
)
def test_malformed_pipelines_are_refused_with_the_reason(steps, message):
    with pytest.raises(ConfigError) as err:
        build_pipeline(steps, "pipelines.p")
    assert message in str(err.value)


def test_pipeline_names_may_not_shadow_a_method(federation):
    with pytest.raises(ConfigError, match="reuse a method's name"):
        run_experiment(_config(["fedavg"], {"FedAvg": {"steps": ["median"]}}), federation)


def test_every_step_is_reachable_by_name_and_kinds_do_not_overlap():
    assert not set(REDUCING_STEPS) & set(UPDATE_STEPS)
    for name in STEPS:
        entries = [name] if name in REDUCING_STEPS else ["weighted_mean", name]
        aggregator = build_pipeline(entries)
        assert aggregator.init({"weight": np.zeros(3), "bias": np.zeros(1)}) is not None


def test_a_client_end_method_runs_under_any_server_pipeline(federation):
    """A few-label (or any client-end) method composes with server steps: under a weighted-mean
    pipeline its site rule is the method itself, bit for bit (same rng); under server Adam it
    differs; its options are the pipeline's (method_options.<pipeline>), checked against the
    client's schema."""
    from medfed.client import LocalData, LocalTraining
    from medfed.engine import run_federated
    from medfed.methods import context_for, resolve
    from medfed.models.registry import make_model
    from medfed.rng import KeyedRng

    pipelines = {
        "vat_mean": {"steps": ["weighted_mean"], "client": "vat"},
        "vat_adam": {"steps": ["weighted_mean", {"step": "server_adam", "lr": 0.05}], "client": "VAT"},
    }
    specs = build_config({"data": {"dataset": "adni-like"}, "methods": ["vat"], "pipelines": pipelines}).pipelines
    sites = [LocalData(s.name, s.X[:40], s.y[:40]) for s in federation.sites]
    model = make_model("logistic", (sites[0].X.shape[1],))
    init = model.init_params((sites[0].X.shape[1],), KeyedRng(0))
    context = context_for([s.name for s in sites])
    runs = {}
    for name in ("vat", "vat_mean", "vat_adam"):
        spec, opts = resolve(name, {"eps": 0.5}, specs)
        algorithm = spec.build(opts, build_config({"data": {"dataset": "adni-like"}}).training, context)
        runs[name] = run_federated(algorithm, init, sites, LocalTraining(model, 0.1, 3, 16), 4, KeyedRng(7))
    for k in runs["vat"].params:
        np.testing.assert_array_equal(runs["vat_mean"].params[k], runs["vat"].params[k])
    assert [r.train_loss for r in runs["vat_mean"].history] == [r.train_loss for r in runs["vat"].history]
    assert any(not np.array_equal(runs["vat_adam"].params[k], runs["vat"].params[k]) for k in runs["vat"].params)
    with pytest.raises(ConfigError, match="'vat_mean' has no option 'epz'"):
        resolve("vat_mean", {"epz": 1.0}, specs)


def test_a_semisupervised_pipeline_learns_from_the_unlabeled_rows(federation):
    pipelines = {"semi_adam": {"steps": ["weighted_mean", {"step": "server_adam", "lr": 0.05}],
                               "client": "semisupervised", "display": "SemiSup+Adam"}}
    config = _config(["fedavg", "semi_adam"], pipelines, method_options={"semi_adam": {"threshold": 0.6}},
                     data={"dataset": "adni-like", "labeled_fraction": 0.3})
    doc = results_document(run_experiment(config, federation))
    note = next(w for w in doc["warnings"] if "unlabeled training rows" in w)
    assert "not used by FedAvg" in note and note.endswith("used by SemiSup+Adam (semi-supervised)"), note


@pytest.mark.parametrize("client, message", [
    ("scaffold", "client 'scaffold' needs its own server"),
    ("fedsgd", "client 'fedsgd' is not a site rule a pipeline can run"),
    ("contrastive", "client 'contrastive' is not a site rule a pipeline can run"),
    ("mix", "client 'mix' is not a site rule a pipeline can run"),
    ("fedavgg", "allowed: fedavg, fedprox, "),
])
def test_a_pipeline_client_that_cannot_be_served_is_refused_before_training(federation, client, message):
    pipelines = {"p": {"steps": ["weighted_mean"], "client": client}}
    with pytest.raises(ConfigError, match=message):
        run_experiment(_config(["p"], pipelines, training={"rounds": 1, "local_steps": 1}), federation)
