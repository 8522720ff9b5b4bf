"""String columns: --exclude drops them, --categorical one-hot encodes them with levels taken
from each repeat's training rows; test rows with an unseen level are all-zero and reported."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from medfed.cli.app import app
from medfed.data.tables import load_table
from medfed.errors import ConfigError, DataError
from medfed.experiments.config import build_config
from medfed.experiments.harness import prepare_repeat

COLS = dict(site_column="site", label_column="label")


def cohort(n=12) -> pd.DataFrame:
    """Two sites of ``n`` rows; ``scanner`` is GE/Siemens except where a test sets a rare level."""
    rng = np.random.default_rng(0)
    return pd.DataFrame({
        "site": np.repeat(["A", "B"], n),
        "age": np.round(rng.normal(60, 8, 2 * n), 1),
        "scanner": np.tile(["GE", "Siemens"], n),
        "note": ["free text"] * (2 * n),
        "label": np.tile([0, 1, 0, 1, 1, 0, 1, 0], n)[: 2 * n],
    })


def write(tmp_path, df, name="c.csv"):
    path = tmp_path / name
    df.to_csv(path, index=False)
    return path


def test_categorical_column_becomes_one_indicator_per_level(tmp_path):
    df = cohort()
    df.loc[3, "scanner"] = "Canon"
    fed = load_table(write(tmp_path, df), **COLS, exclude=["note"], categorical=["scanner"])
    assert fed.feature_names == ("age", "scanner=Canon", "scanner=GE", "scanner=Siemens")
    X = np.concatenate([s.X for s in fed.sites])
    np.testing.assert_array_equal(X[:, 1:].sum(axis=1), 1.0)  # exactly one level per row
    np.testing.assert_array_equal(X[:, 2], (df.scanner == "GE").to_numpy(float))
    assert X[3, 1] == 1.0
    assert fed.info["categorical_levels"] == {"scanner": ["Canon", "GE", "Siemens"]}
    assert fed.info["excluded"] == ["note"]


def test_exclude_drops_columns_and_names_the_flag_when_wrong(tmp_path):
    path = write(tmp_path, cohort().drop(columns=["scanner"]))
    assert load_table(path, **COLS, exclude=["note"]).feature_names == ("age",)
    with pytest.raises(DataError, match=r"'weight' \(--exclude\) is not in the file"):
        load_table(path, **COLS, exclude=["note", "weight"])
    with pytest.raises(ConfigError, match="--exclude and --features both name 'age'"):
        load_table(path, **COLS, features=["age"], exclude=["age"])
    with pytest.raises(ConfigError, match="--exclude must not include 'site'"):
        load_table(path, **COLS, exclude=["site"])


def test_categorical_must_be_a_listed_feature_and_complete(tmp_path):
    df = cohort()
    with pytest.raises(ConfigError, match="--categorical names 'scanner', which --features does not list"):
        load_table(write(tmp_path, df), **COLS, features=["age"], categorical=["scanner"])
    df.loc[[2, 5], "scanner"] = ""
    with pytest.raises(DataError, match=r"categorical column 'scanner' has 2 missing values \(first at data row 3\)"):
        load_table(write(tmp_path, df), **COLS, exclude=["note"], categorical=["scanner"])


def _split_fed(tmp_path):
    """A predefined split: 'Philips' only in a test row of site B; 'Canon' in training rows of
    site A and a test row of site B (known through the union over sites)."""
    df = cohort()
    df["split"] = np.tile(["train"] * 3 + ["test"], 6)
    df.loc[0, "scanner"] = "Canon"  # site A, train
    df.loc[15, "scanner"] = "Canon"  # site B, test
    df.loc[19, "scanner"] = "Philips"  # site B, test
    return df, load_table(write(tmp_path, df), **COLS, split_column="split", exclude=["note"], categorical=["scanner"])


def test_levels_a_repeat_uses_come_from_training_rows_of_all_sites(tmp_path):
    df, fed = _split_fed(tmp_path)
    config = build_config({"data": {"dataset": "adni-like"}, "scaling": "none", "repeats": 1})
    a, b = prepare_repeat(fed, config, 0)
    names = list(fed.feature_names)
    philips, canon = names.index("scanner=Philips"), names.index("scanner=Canon")
    block = slice(names.index("scanner=Canon"), len(names))
    # the unseen level's test row is all-zero in the scanner block; nothing else changed
    test_b = df[(df.site == "B") & (df.split == "test")].reset_index(drop=True)
    row = int(np.flatnonzero(test_b.scanner == "Philips")[0])
    assert b.X_test[row, block].sum() == 0 and b.X_test[:, philips].sum() == 0
    assert b.X_test[:, canon].sum() == 1  # Canon: seen in site A's training rows
    assert b.unseen_levels == {"scanner": {"Philips": 1}} and a.unseen_levels == {}
    np.testing.assert_array_equal(b.X_train, fed.sites[1].X[fed.sites[1].split])
    # the federation itself is untouched (the next repeat starts from the file's encoding)
    assert fed.sites[1].X[:, philips].sum() == 1


def test_unseen_levels_are_reported_under_the_table_and_in_results_json(tmp_path):
    df, _ = _split_fed(tmp_path)
    df = pd.concat([df, df.assign(site=df.site.map({"A": "C", "B": "D"}))], ignore_index=True)  # enough rows
    path = write(tmp_path, df)
    out = tmp_path / "o"
    result = CliRunner().invoke(app, [
        "run", "--data", str(path), "--site-column", "site", "--label-column", "label", "--split-column", "split",
        "--exclude", "note", "--categorical", "scanner", "--methods", "fedavg", "--rounds", "2",
        "--local-steps", "1", "--repeats", "1", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "results.json").read_text())
    assert "scanner=Philips" in doc["features"]
    [note] = [w for w in doc["warnings"] if "'scanner'" in w]
    assert "site 'B': 1 row(s) in 1 of 1 repeat(s) ('Philips')" in note
    assert "site 'D': 1 row(s) in 1 of 1 repeat(s) ('Philips')" in note
    assert "all-zero" in note and "'A'" not in note
    assert "Philips" in (out / "table.md").read_text()
    assert "Philips" in result.output


def test_exclude_and_categorical_are_refused_for_embedded_data(tmp_path):
    result = CliRunner().invoke(app, ["run", "--dataset", "adni-like", "--categorical", "x", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "--categorical" in result.output and "--data" in result.output and "Traceback" not in result.output
