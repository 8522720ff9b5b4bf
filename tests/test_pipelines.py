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
