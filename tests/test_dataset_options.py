"""Every embedded data set's options: a bad type, range or name is one ConfigError/DataError
naming the data set and the option, before any work; `--dataset-option seed=abc` exits 2."""

from __future__ import annotations

import inspect
import importlib

import pytest
from typer.testing import CliRunner

from medfed.cli.app import app
from medfed.data.datasets import DATASETS, load_dataset
from medfed.errors import ConfigError, DataError


def _options():
    for name, (module, func, _) in DATASETS.items():
        loader = getattr(importlib.import_module(module), func)
        for option in inspect.signature(loader).parameters:
            yield name, option


# "abc" is what `--dataset-option KEY=abc` passes; True what `KEY=true` passes
@pytest.mark.parametrize("value", ["abc", True])
@pytest.mark.parametrize("dataset, option", list(_options()))
def test_every_option_refuses_a_value_of_the_wrong_type(dataset, option, value):
    with pytest.raises(ConfigError) as info:
        load_dataset(dataset, **{option: value})
    msg = str(info.value)
    assert f"dataset {dataset!r}" in msg and "\n" not in msg
    # the option by its name, or (heart-disease's features, impute) by the flag that sets it
    assert option in msg or f"--{option}" in msg


@pytest.mark.parametrize(
    "dataset, options, needle",
    [
        ("adni-like", {"seed": -1}, "option 'seed' (--dataset-option seed=...) must be an integer ≥ 0"),
        ("adni-like", {"seed": 1.5}, "must be an integer ≥ 0, got 1.5"),
        ("breast-cancer", {"alpha": 0}, "option 'alpha' (--dataset-option alpha=...) must be a finite number > 0"),
        ("breast-cancer", {"alpha": float("inf")}, "must be a finite number > 0, got inf"),
        ("breast-cancer", {"seed": -2}, "option 'seed'"),
        ("breast-cancer", {"n_sites": 0}, "option 'n_sites'"),
        ("breast-cancer", {"partition": "label"}, "'iid', 'dirichlet', 'quantity'"),
        ("heart-disease", {"impute": "zero"}, "--impute mean|median"),
        ("mni-phantom", {"size": 4}, "option 'size'"),
    ],
)
def test_option_ranges(dataset, options, needle):
    with pytest.raises(ConfigError) as info:
        load_dataset(dataset, **options)
    assert needle in str(info.value)


def test_unknown_option_names_the_flag_and_the_options():
    with pytest.raises(DataError, match=r"dataset 'adni-like' has no option 'sed' \(--dataset-option KEY=VALUE\); its options: seed"):
        load_dataset("adni-like", sed=1)


@pytest.mark.parametrize("dataset", ["adni-like", "breast-cancer"])
def test_dataset_option_seed_abc_is_one_line_and_exit_2(tmp_path, dataset):
    result = CliRunner().invoke(app, ["run", "--dataset", dataset, "--dataset-option", "seed=abc",
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert "option 'seed'" in result.output and "integer" in result.output and "'abc'" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()
