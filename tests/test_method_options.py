"""Methods' options are declared once (medfed.methods.options) and checked once, when the study
is resolved: defaults valid, one ConfigError naming method, option and allowed values, the
command-line flags and `medfed methods` read from the same declarations."""

import inspect
import math
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medfed.errors import ConfigError
from medfed.experiments.config import PipelineSpec, TrainingSpec, build_config
from medfed.methods import METHOD_FLAGS, METHODS, resolve, resolve_methods
from medfed.methods.method import Method, context_for
from medfed.methods.options import Option, Range, number, validate
from medfed.methods.registry import _method_flags
from medfed.methods.steps import STEPS

SRC = Path(__file__).parents[1] / "src" / "medfed"


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_validates_its_own_defaults(name):
    method = METHODS[name]
    assert method.validate({}) == method.defaults == method.validate(method.defaults)
    for option in method.options:
        assert option.help and option.name == option.name.lower()
        assert option.coerce(option.default, "test") == option.default, option.name  # the default is allowed
    if method.kind == "federated":  # and the build takes exactly what validate returns
        method.build(method.validate({}), TrainingSpec(), context_for(["a", "b", "c", "d", "e", "f", "g"]))


@pytest.mark.parametrize("name", list(STEPS))
def test_every_pipeline_step_declares_its_factory_s_parameters_with_their_defaults(name):
    step = STEPS[name]
    params = inspect.signature(step.factory).parameters
    assert [o.name for o in step.options] == list(params)
    assert {o.name: o.default for o in step.options} == {k: p.default for k, p in params.items()}
    assert validate(f"step {name!r}", step.options, {}, step.check) == {o.name: o.default for o in step.options}


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("fedprox", {"mu": -1}, "method 'fedprox' option 'mu' must be a number >= 0, got -1"),
        ("fedadam", {"beta1": 1.0}, "method 'fedadam' option 'beta1' must be a number in [0, 1), got 1.0"),
        ("fedavgm", {"server_lr": 0}, "method 'fedavgm' option 'server_lr' must be a number > 0, got 0"),
        ("krum", {"f": "two"}, "method 'krum' option 'f' must be a whole number >= 0, got 'two'"),
        ("scaffold", {"weighting": "sqrt"},
         "method 'scaffold' option 'weighting' must be one of examples, uniform, got 'sqrt'"),
        ("fedbn", {"local_affine": "yes"}, "method 'fedbn' option 'local_affine' must be true or false, got 'yes'"),
        ("semisync", {"speeds": {"a": -1}},
         "method 'semisync' option 'speeds' must be a table of site name = number > 0; site 'a' has -1"),
        ("ditto", {"lamda": 0.1}, "method 'ditto' has no option 'lamda'; its options: lam, personal_steps"),
        ("fedavg", {"mu": 0.1}, "method 'fedavg' has no option 'mu'; its options: none"),
        ("fourier", {"start": 0.9, "end": 0.8},
         "method 'fourier': start (0.9) must not exceed end (0.8): the shared share only grows"),
    ],
)
def test_a_bad_option_is_one_config_error_naming_method_option_and_allowed_values(name, options, message):
    for check in (lambda: resolve(name, options), lambda: resolve_methods([name], {name: options})):
        with pytest.raises(ConfigError) as err:
            check()
        assert str(err.value) == message


def test_bad_options_are_refused_before_any_training(monkeypatch):
    import medfed.experiments.harness as harness

    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(harness, "run_repeat", no_training)
    config = build_config({"data": {"dataset": "adni-like"}, "methods": ["fedavg", "fedyogi"],
                           "method_options": {"fedyogi": {"tau": 0.0}}})
    with pytest.raises(ConfigError, match="method 'fedyogi' option 'tau' must be a number > 0, got 0.0"):
        harness.run_experiment(config, harness.load_federation(config.data))


def test_a_method_resolves_from_its_name_and_options_alone():
    method, options = resolve(" FedProx ", {"mu": 1})
    assert method is METHODS["fedprox"] and options == {"mu": 1.0} and isinstance(options["mu"], float)
    method, options = resolve("multikrum", {"m": 3.0})
    assert options == {"f": 1, "m": 3} and all(isinstance(v, int) for v in options.values())
    # a config pipeline is a method too, by its name
    pipelines = {"Robust": PipelineSpec(steps=["median", {"step": "server_adam", "lr": 0.05}])}
    method, options = resolve("robust", {}, pipelines)
    assert method.name == "Robust" and options == {} and method.kind == "federated"
    with pytest.raises(ConfigError, match="unknown method 'fedfoo'; available: cross, single"):
        resolve("fedfoo", {})
    # the same (name, options) builds the same method wherever it is resolved
    a = resolve("fedadam", {"server_lr": 0.02})
    b = resolve_methods(["fedadam"], {"fedadam": {"server_lr": 0.02}})[0]
    assert a == b


def test_ranges_say_what_they_take_and_infinity_only_where_a_closed_end_is_infinite():
    assert str(Range(0, 1, high_open=True)) == "in [0, 1)" and str(Range(0, low_open=True)) == "> 0"
    assert str(Range(high=1)) == "<= 1" and str(Range(0, math.inf, low_open=True)) == "in (0, inf]"
    assert math.inf in Range(0, math.inf, low_open=True) and math.inf not in Range(0)
    assert math.nan not in Range() and 0.0 not in Range(0, low_open=True) and 0.5 not in Range(0, 0.5, high_open=True)
    deadline = STEPS["dynamic_fusion"].option("deadline")
    assert deadline.coerce(math.inf, "x") == math.inf  # "inf = no deadline"
    with pytest.raises(ConfigError, match="got inf"):
        number("lr", 1.0, "rate").coerce(math.inf, "x")


def test_one_flag_means_one_option_of_one_type_for_every_method():
    def method(name, *options):
        return Method(name, name, "federated", "", "", options)

    lr = number("server_lr", 1.0, "server learning rate; of this method", flag="--server-lr")
    flags = _method_flags([method("a", lr), method("b", lr.but(default=0.1))])
    assert flags["server_lr"].methods == ("a", "b") and flags["server_lr"].help == "server learning rate"
    for other in (lr.but(flag="--slr"), lr.but(type="int", default=1), lr.but(name="lr")):
        with pytest.raises(TypeError):
            _method_flags([method("a", lr), method("b", other)])
    assert _method_flags([method("a", Option("path", "", "str", "a file", flag="--path"))])["path"].type == "str"
    with pytest.raises(TypeError, match="only numbers and strings"):
        _method_flags([method("a", Option("rule", "x", "choice", "a rule", ("x", "y"), flag="--rule"))])


def test_the_run_command_s_method_flags_are_the_schemas_flags():
    from medfed.cli.app import app

    text = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "300"}).output
    declared = {o.flag for m in METHODS.values() for o in m.options if o.flag}
    assert declared == {f.flag for f in METHOD_FLAGS.values()} >= {"--mu", "--server-lr", "--byzantine"}
    for f in METHOD_FLAGS.values():
        assert re.search(rf"{re.escape(f.flag)}\s+(FLOAT|INTEGER|TEXT)\s+{re.escape(f.help)} \({', '.join(f.methods)}\)",
                         text), f.flag


def test_a_flag_s_value_is_checked_by_the_option_it_sets(tmp_path):
    from medfed.cli.app import app

    result = CliRunner().invoke(app, ["run", "--dataset", "adni-like", "--methods", "fedavg,trimmed_mean",
                                      "--trim-beta", "0.5", "--rounds", "1", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "method 'trimmed_mean' option 'beta' must be a number in [0, 0.5), got 0.5" in " ".join(result.output.split())


def test_medfed_methods_lists_each_option_s_default_allowed_values_and_flag():
    from medfed.cli.app import render_methods
    from rich.console import Console

    console = Console(width=400, record=True)  # wide enough that no option wraps
    render_methods(console)
    screen = " ".join(console.export_text().split())
    for line in ("mu=0.1 (a number >= 0; --mu)", "weighting=examples (one of examples, uniform)",
                 "f=1 (a whole number >= 0; --byzantine)", "local_affine=true (true or false)",
                 "latencies={} (a table of site name = number >= 0)", "beta1=0.9 (a number in [0, 1))"):
        assert line in screen, line


def test_the_scattered_validators_are_gone():
    """The per-method option checks of the method modules and of the server and client code
    they call (the data layer's partitioners check their own arguments)."""
    gone = ["coerce_option", "check_number", "_with_defaults", "_check_positive", "_check_unit_interval",
            "_count", "_beta", "_temperature", "_share", "_options", "_number"]
    paths = [p for layer in ("methods", "server", "client", "engine", "experiments", "cli")
             for p in (SRC / layer).rglob("*.py")]
    found = [f"{path.relative_to(SRC)}: {name}" for path in paths for name in gone
             if re.search(rf"\b{name}\(", path.read_text())]
    assert len(paths) > 30 and found == []
    assert not (SRC / "experiments" / "spec.py").exists() and not (SRC / "server" / "steps.py").exists()
