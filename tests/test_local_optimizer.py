"""Methods whose server rule assumes plain SGD local steps (SCAFFOLD's (x - y)/(K lr), q-FFL's
L = 1/lr) refuse another local optimizer before any training, and run as on the numpy model
with SGD."""

import numpy as np
import pytest
from typer.testing import CliRunner

from medfed.cli.app import app
from medfed.errors import ConfigError
from medfed.experiments import harness
from medfed.experiments.config import build_config
from medfed.experiments.harness import TrainingPlan, prepare_repeat, run_experiment
from medfed.methods.registry import METHODS
from medfed.methods.method import context_for, local_optimizer
from medfed.rng import KeyedRng

SGD_ONLY = ("scaffold", "fair")
FAST = {"rounds": 3, "local_steps": 2, "batch_size": None, "lr": 0.1, "l2": 1e-2}  # the same for every model


def _config(methods, model="torch_logistic", **model_options):
    return build_config({
        "data": {"dataset": "adni-like"}, "model": model, "model_options": model_options,
        "methods": list(methods), "repeats": 1, "training": FAST,
    })


def test_the_build_context_knows_the_local_optimizer():
    assert local_optimizer() == "sgd"  # the numpy model: plain gradient descent
    assert local_optimizer("torch_logistic") == "sgd"  # the torch models' own default
    network = _config(["fedavg"])  # network models default to Adam in a configuration
    assert network.model_options["optimizer"] == "adam"
    assert context_for(["a"], model=network.model, model_options=network.model_options).optimizer == "adam"
    assert context_for(["a"], model="torch_logistic", model_options={"optimizer": "sgd"}).optimizer == "sgd"


@pytest.mark.parametrize("method", SGD_ONLY)
def test_sgd_only_methods_refuse_adam_before_any_training(federation, monkeypatch, method):
    def trained(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(harness, "run_repeat", trained)
    with pytest.raises(ConfigError, match=rf"method '{method}' assumes plain SGD local steps .*optimizer is 'adam'; "
                                          r"use --model-option optimizer=sgd"):
        run_experiment(_config(["fedavg", method]), federation)
    # other methods, and these with SGD, pass the same check
    harness.check_study(_config(["fedavg", "fedadam"]), federation, [(METHODS["fedavg"], {})])
    harness.check_study(_config([method], optimizer="sgd"), federation, [(METHODS[method], dict(METHODS[method].defaults))])


def test_the_command_line_says_it_in_one_line_and_exits_2(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", "--dataset", "adni-like", "--model", "torch_logistic",
                                      "--methods", "fedavg,scaffold", "--repeats", "1", "--rounds", "2",
                                      "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "'scaffold'" in lines[0] and "'adam'" in lines[0]
    assert "--model-option optimizer=sgd" in lines[0]
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("method", SGD_ONLY)
def test_with_sgd_steps_torch_logistic_computes_what_the_numpy_model_computes(torch_one_thread, federation, method):
    """The fix the error names gives the method its assumption back: torch_logistic in float64
    with SGD (its head starts at zero, like the numpy model) follows the numpy model's run."""
    scores = {}
    for model, options in (("logistic", {}), ("torch_logistic", {"optimizer": "sgd", "dtype": "float64"})):
        config = _config([method], model, **options)
        plan = TrainingPlan.of(config, federation)
        sites = prepare_repeat(federation, config, 0)
        train, tests = harness.ScaledViews(sites, config.scaling)(tuple(range(len(sites))))
        spec = METHODS[method]
        run = plan.federated(spec, dict(spec.defaults), train, plan.initial(federation, 0), KeyedRng(0))
        assert not any(r.rejected or r.skipped for r in run.history)
        scores[model] = np.concatenate([plan.model.predict_proba(run.params, X) for X in tests])
    assert np.abs(scores["logistic"] - 0.5).max() > 1e-2  # it did learn
    np.testing.assert_allclose(scores["torch_logistic"], scores["logistic"], rtol=0, atol=1e-10)
