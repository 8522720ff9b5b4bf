"""load_table: every bad input gives one DataError/ConfigError naming what is wrong; partitions."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from medfed.data.partition import dirichlet_label_partition, iid_partition
from medfed.data.tables import load_table
from medfed.errors import ConfigError, DataError

COLS = dict(site_column="site", label_column="label")


def frame(sites=("A", "B"), n=12, seed=0, **extra) -> pd.DataFrame:
    """A valid table: ``n`` rows per site, two numeric features, labels alternating 0/1."""
    rng = np.random.default_rng(seed)
    rows = len(sites) * n
    df = pd.DataFrame(
        {
            "site": np.repeat(list(sites), n),
            "age": rng.integers(50, 90, rows),
            "volume": np.round(rng.normal(3.0, 0.5, rows), 3),
            "label": np.tile([0, 1], rows // 2 + 1)[:rows],
        }
    )
    for k, v in extra.items():
        df[k] = v
    return df


def write(tmp_path, df, name="cohort.csv", **kw):
    path = tmp_path / name
    if path.suffix in (".parquet", ".pq"):
        df.to_parquet(path, index=False)
    else:
        sep = {".tsv": "\t"}.get(path.suffix, kw.pop("sep", ","))
        df.to_csv(path, index=False, sep=sep)
    return path


def error(exc_type, path, **kw):
    with pytest.raises(exc_type) as info:
        load_table(path, **{**COLS, **kw})
    return str(info.value)


# --------------------------------------------------------------------------- happy paths


def test_csv_happy_path(tmp_path):
    path = write(tmp_path, frame())
    fed = load_table(path, **COLS)
    assert fed.name == "cohort"
    assert fed.site_names == ["A", "B"]
    assert fed.feature_names == ("age", "volume")
    assert [s.n for s in fed.sites] == [12, 12]
    assert fed.positive_label == "1"
    assert fed.impute is None
    assert not fed.has_predefined_split
    assert fed.info == {
        "source": str(path),
        "site_column": "site",
        "label_column": "label",
        "split_column": None,
        "features_selected_by": "all",
    }
    df = frame()
    np.testing.assert_allclose(fed.sites[0].X[:, 1], df.volume[:12])
    np.testing.assert_array_equal(fed.sites[1].y, df.label[12:])


@pytest.mark.parametrize("name", ["cohort.parquet", "cohort.pq"])
def test_parquet_happy_path(tmp_path, name):
    df = frame(sites=(3, 1))  # numeric site ids become strings, in order of appearance
    df["smoker"] = np.tile([True, False], 12)
    fed = load_table(write(tmp_path, df, name), **COLS, name="mine")
    assert fed.name == "mine"
    assert fed.site_names == ["3", "1"]
    assert fed.feature_names == ("age", "volume", "smoker")
    np.testing.assert_array_equal(fed.sites[0].X[:, 2], np.tile([1.0, 0.0], 6))


def test_tsv_and_sniffed_txt(tmp_path):
    assert load_table(write(tmp_path, frame(), "c.tsv"), **COLS).site_names == ["A", "B"]
    txt = write(tmp_path, frame(), "c.txt", sep=";")
    assert load_table(txt, **COLS).feature_names == ("age", "volume")
    semi = write(tmp_path, frame(), "semi.csv", sep=";")
    assert load_table(semi, **COLS).feature_names == ("age", "volume")


def test_features_list_and_boolean_text(tmp_path):
    df = frame(smoker=["true", "False"] * 12, note=["x"] * 24)
    fed = load_table(write(tmp_path, df), **COLS, features=["smoker", "age"])
    assert fed.feature_names == ("smoker", "age")
    assert fed.info["features_selected_by"] == "list"
    np.testing.assert_array_equal(fed.sites[0].X[:4, 0], [1, 0, 1, 0])


def test_split_column(tmp_path):
    split = (["train"] * 8 + [" Test "] * 4) * 2
    fed = load_table(write(tmp_path, frame(split=split)), **COLS, split_column="split")
    assert fed.has_predefined_split
    assert fed.feature_names == ("age", "volume")
    assert fed.sites[0].split.sum() == 8
    assert fed.info["split_column"] == "split"


def test_positive_label_binarizes_strings(tmp_path):
    df = frame(label=["AD", "NC", "MCI"] * 8)
    fed = load_table(write(tmp_path, df), **COLS, positive_label="AD")
    assert fed.positive_label == "AD"
    np.testing.assert_array_equal(fed.sites[0].y[:6], [1, 0, 0, 1, 0, 0])


def test_positive_label_matches_numbers_as_text(tmp_path):
    df = frame(label=[0, 1, 2] * 8)
    fed = load_table(write(tmp_path, df, "n.parquet"), **COLS, positive_label="2")
    np.testing.assert_array_equal(fed.sites[0].y[:3], [0, 0, 1])
    fed = load_table(write(tmp_path, df), **COLS, positive_label=1)
    assert fed.positive_label == "1"
    np.testing.assert_array_equal(fed.sites[0].y[:3], [0, 1, 0])


@pytest.mark.parametrize("labels", [[0.0, 1.0], ["0", "1"], [True, False], ["yes", "no"]])
def test_binary_label_codings(tmp_path, labels):
    df = frame(label=labels * 12)
    path = write(tmp_path, df, "l.parquet")
    if labels == ["yes", "no"]:
        msg = error(DataError, path)
        assert "'yes'" in msg and "'no'" in msg and "--positive-label" in msg
    else:
        fed = load_table(path, **COLS)
        assert sorted(set(fed.sites[0].y.tolist())) == [0, 1]


@pytest.mark.parametrize("strategy", ["mean", "median"])
def test_impute_keeps_nan(tmp_path, strategy):
    df = frame()
    df["volume"] = df["volume"].astype(object)
    df.loc[[1, 14], "volume"] = ""
    df.loc[[2], "age"] = None
    fed = load_table(write(tmp_path, df), **COLS, impute=strategy)
    assert fed.impute == strategy
    assert np.isnan(fed.sites[0].X[1, 1]) and np.isnan(fed.sites[0].X[2, 0])
    assert np.isnan(fed.sites[1].X[2, 1])
    assert np.isnan(fed.sites[0].X).sum() == 2


def test_single_class_training_site_loads(tmp_path):
    df = frame()
    df.loc[:11, "label"] = 1
    fed = load_table(write(tmp_path, df), **COLS)
    assert fed.sites[0].y.tolist() == [1] * 12


def test_import_is_light():
    code = (
        "import sys, medfed.data.tables, medfed.data.partition, medfed.data.datasets.heart_disease;"
        "bad = [m for m in ('pandas', 'sklearn') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# --------------------------------------------------------------------------- errors: file


def test_missing_file(tmp_path):
    msg = error(DataError, tmp_path / "nope.csv")
    assert "nope.csv" in msg and "not found" in msg


def test_unsupported_extension(tmp_path):
    path = tmp_path / "cohort.xlsx"
    path.write_text("x")
    msg = error(DataError, path)
    assert ".xlsx" in msg and ".csv" in msg and ".parquet" in msg


def test_empty_and_header_only(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert "empty.csv" in error(DataError, empty)
    header = tmp_path / "header.csv"
    header.write_text("site,label,age\n")
    assert "no data rows" in error(DataError, header)


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"not parquet at all")
    msg = error(DataError, path)
    assert "bad.parquet" in msg and "Parquet" in msg


def test_duplicate_header(tmp_path):
    path = tmp_path / "dup.csv"
    path.write_text("site,label,age,age\n" + "A,0,1,2\n" * 12)
    msg = error(DataError, path)
    assert "'age'" in msg and "more than once" in msg


# --------------------------------------------------------------------------- errors: columns


@pytest.mark.parametrize(
    "kw, col",
    [
        (dict(site_column="hospital"), "hospital"),
        (dict(label_column="dx"), "dx"),
        (dict(split_column="fold"), "fold"),
        (dict(features=["age", "weight"]), "weight"),
    ],
)
def test_missing_column(tmp_path, kw, col):
    path = write(tmp_path, frame())
    msg = error(DataError, path, **kw)
    assert repr(col) in msg and "cohort.csv" in msg
    assert "'age'" in msg and "'volume'" in msg  # the available columns


def test_non_numeric_feature(tmp_path):
    df = frame()
    df["volume"] = df["volume"].astype(object)
    df.loc[5, "volume"] = "n/a-ish"
    msg = error(DataError, write(tmp_path, df))
    assert "'volume'" in msg and "cohort.csv" in msg and "'n/a-ish'" in msg


def test_infinite_feature(tmp_path):
    df = frame()
    df.loc[3, "volume"] = np.inf
    msg = error(DataError, write(tmp_path, df, "c.parquet"))
    assert "'volume'" in msg and "infinite" in msg


def test_missing_features_without_impute(tmp_path):
    df = frame()
    df.loc[[1, 2, 15], "volume"] = np.nan
    msg = error(DataError, write(tmp_path, df))
    assert "'volume'" in msg and "3 missing" in msg and "--impute mean|median" in msg
    assert "site 'A': 2" in msg and "site 'B': 1" in msg


def test_entirely_empty_feature(tmp_path):
    msg = error(DataError, write(tmp_path, frame(notes=[None] * 24)), impute="mean")
    assert "'notes'" in msg and "no values" in msg


@pytest.mark.parametrize(
    "kw",
    [
        dict(impute="zero"),
        dict(features="age"),
        dict(features=[]),
        dict(features=["age", "age"]),
        dict(features=["age", "label"]),
        dict(label_column="site"),
        dict(site_column=""),
    ],
)
def test_bad_parameters(tmp_path, kw):
    path = write(tmp_path, frame())
    msg = error(ConfigError, path, **kw)
    assert msg and "\n" not in msg


# --------------------------------------------------------------------------- errors: labels


def test_three_whole_numbers_are_classes_unless_binary_is_asked_for(tmp_path):
    path = write(tmp_path, frame(label=[0, 1, 2] * 8))
    fed = load_table(path, **COLS)  # inferred: three whole numbers are classes
    assert fed.task == "multiclass" and fed.classes == ("0", "1", "2") and "3 whole numbers" in fed.task_source
    msg = error(DataError, path, task="binary")
    assert "'label'" in msg and "'2'" in msg and "--positive-label VALUE" in msg


def test_string_labels_listed(tmp_path):
    msg = error(DataError, write(tmp_path, frame(label=["AD", "NC"] * 12)))
    assert "'AD'" in msg and "'NC'" in msg and "--positive-label" in msg


def test_many_label_values_are_truncated(tmp_path):
    msg = error(DataError, write(tmp_path, frame(label=list(range(24)))))
    assert "more" in msg and len(msg) < 500


def test_positive_label_absent(tmp_path):
    msg = error(DataError, write(tmp_path, frame(label=["AD", "NC"] * 12)), positive_label="MCI")
    assert "'MCI'" in msg and "'AD'" in msg


def test_missing_labels_are_unlabeled_rows(tmp_path):
    """An empty label cell is an unlabeled row (tests/test_unlabeled.py), no longer an error."""
    df = frame()
    df["label"] = df["label"].astype(float)
    df.loc[[0, 20], "label"] = np.nan
    fed = load_table(write(tmp_path, df), **COLS)
    assert [s.n_unlabeled for s in fed.sites] == [1, 1] and fed.task == "binary"


def test_missing_multilabel_labels(tmp_path):
    df = frame(other=np.tile([1, 0], 12))
    df["label"] = df["label"].astype(float)
    df.loc[[0, 20], "label"] = np.nan
    with pytest.raises(DataError) as info:
        load_table(write(tmp_path, df), site_column="site", label_columns=["label", "other"])
    assert "'label'" in str(info.value) and "2 missing" in str(info.value)


def test_one_class_overall(tmp_path):
    msg = error(DataError, write(tmp_path, frame(label=["AD"] * 24)), positive_label="AD")
    assert "both classes" in msg


# --------------------------------------------------------------------------- errors: sites, split


def test_small_site(tmp_path):
    df = pd.concat([frame(), frame(sites=("C",), n=4)], ignore_index=True)
    msg = error(DataError, write(tmp_path, df))
    assert "'C' (4 rows)" in msg and "cohort.csv" in msg


def test_missing_site_values(tmp_path):
    df = frame()
    df.loc[[3, 4], "site"] = ""
    msg = error(DataError, write(tmp_path, df))
    assert "'site'" in msg and "2 missing" in msg


def test_unknown_split_values(tmp_path):
    split = (["train"] * 8 + ["valid"] * 2 + ["test"] * 2) * 2
    msg = error(DataError, write(tmp_path, frame(split=split)), split_column="split")
    assert "'valid'" in msg and "train" in msg and "test" in msg


def test_site_without_test_rows(tmp_path):
    split = ["train"] * 12 + ["train"] * 8 + ["test"] * 4
    msg = error(DataError, write(tmp_path, frame(split=split)), split_column="split")
    assert "'A'" in msg and "no test rows" in msg


# --------------------------------------------------------------------------- partitions


def _check_cover(parts, n):
    allidx = np.concatenate(parts)
    assert allidx.size == n and np.array_equal(np.sort(allidx), np.arange(n))


def test_iid_partition_cover_sizes_and_determinism():
    parts = iid_partition(103, 4, seed=7)
    _check_cover(parts, 103)
    assert max(p.size for p in parts) - min(p.size for p in parts) <= 1
    again = iid_partition(103, 4, seed=np.random.default_rng(7))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = iid_partition(103, 4, seed=8)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_iid_partition_stratified():
    y = np.r_[np.zeros(90), np.ones(30)]
    parts = iid_partition(y, 3, seed=0)
    _check_cover(parts, 120)
    assert [int(y[p].sum()) for p in parts] == [10, 10, 10]


def test_dirichlet_cover_min_size_determinism():
    y = np.random.default_rng(0).integers(0, 3, 600)
    parts = dirichlet_label_partition(y, 5, alpha=0.3, seed=1, min_size=20)
    _check_cover(parts, 600)
    assert min(p.size for p in parts) >= 20
    again = dirichlet_label_partition(y, 5, alpha=0.3, seed=1, min_size=20)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def _skew(alpha):
    y = np.r_[np.zeros(1000), np.ones(1000)]
    out = []
    for seed in range(10):
        parts = dirichlet_label_partition(y, 4, alpha=alpha, seed=seed, min_size=5, max_tries=1000)
        out.append(np.mean([abs(y[p].mean() - 0.5) for p in parts]))
    return float(np.mean(out))


def test_dirichlet_skew_grows_as_alpha_shrinks():
    assert _skew(100.0) < _skew(1.0) < _skew(0.1)
    assert _skew(100.0) < 0.05


@pytest.mark.parametrize(
    "kw, word",
    [
        (dict(alpha=0), "alpha"),
        (dict(alpha=-1.0), "alpha"),
        (dict(alpha=float("nan")), "alpha"),
        (dict(n_sites=0), "n_sites"),
        (dict(n_sites=50), "n_sites"),  # 100 samples cannot make 50 sites of 10
        (dict(seed=-3), "seed"),
        (dict(min_size=-1), "min_size"),
    ],
)
def test_dirichlet_bad_parameters(kw, word):
    args = dict(y=np.tile([0, 1], 50), n_sites=3, alpha=0.5, seed=0)
    args.update(kw)
    with pytest.raises(ConfigError, match=word):
        dirichlet_label_partition(**args)


def test_dirichlet_impossible_after_max_tries():
    y = np.r_[np.zeros(50), np.ones(50)]
    with pytest.raises(ConfigError) as info:
        dirichlet_label_partition(y, 10, alpha=0.01, seed=0, min_size=10, max_tries=20)
    msg = str(info.value)
    assert "alpha=0.01" in msg and "n_sites=10" in msg


def test_iid_bad_parameters():
    with pytest.raises(ConfigError, match="n_sites"):
        iid_partition(5, 6, seed=0)
    with pytest.raises(ConfigError, match="n_sites"):
        iid_partition(5, 0, seed=0)
    with pytest.raises(ConfigError, match="seed"):
        iid_partition(5, 2, seed="x")


def test_ragged_rows(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("site,label,age\nA,1,2,3,4\n" + "A,0,1\n" * 12)
    msg = error(DataError, path)
    assert "ragged.csv" in msg and "more fields than the header" in msg


# --------------------------------------------------------------------------- unnamed columns, all problems at once


def test_pandas_default_index_column_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "indexed.csv"
    frame().to_csv(path)  # pandas' default: the row index as a first column with an empty header
    msg = error(DataError, path)
    assert "'Unnamed: 0'" in msg and "0..23" in msg
    assert '--exclude "Unnamed: 0"' in msg and "index=False" in msg
    assert load_table(path, **COLS, exclude=["Unnamed: 0"]).feature_names == ("age", "volume")


def test_blank_header_name_of_a_feature_is_refused(tmp_path):
    path = tmp_path / "blank.csv"
    df = frame()
    df.insert(2, "", np.arange(24) % 5)
    df.insert(3, " ", np.arange(24) % 3)
    df.to_csv(path, index=False)  # two blank names are not "duplicates"
    msg = error(DataError, path)
    assert "column 3 has no header name (read as 'Unnamed: 2')" in msg
    assert "column 4 has no header name (read as 'Unnamed: 3')" in msg
    assert '--exclude "Unnamed: 2"' in msg and "more than once" not in msg
    # naming the features leaves the unnamed columns out, as the user asked
    assert load_table(path, **COLS, features=["age"]).feature_names == ("age",)


def test_one_error_lists_every_problem_of_the_table(tmp_path):
    df = pd.concat([frame(), frame(sites=("C",), n=4, seed=1)], ignore_index=True)
    df["volume"] = df["volume"].astype(object)
    df.loc[5, "volume"] = "high"  # non-numeric feature
    df["age"] = df["age"].astype(float)
    df.loc[[1, 14], "age"] = np.nan  # missing values without --impute
    msg = error(DataError, write(tmp_path, df))  # and site C is too small
    assert msg.startswith(f"{tmp_path / 'cohort.csv'}: 3 problems: (1) ")
    assert "'C' (4 rows)" in msg
    assert "feature column 'volume' is not numeric" in msg and "'high' at data row 6" in msg
    assert "feature column 'age' has 2 missing values" in msg and "--impute mean|median" in msg
    assert "\n" not in msg


def test_every_missing_named_column_is_listed_with_its_flag(tmp_path):
    msg = error(DataError, write(tmp_path, frame()), site_column="hospital", features=["age", "weight"])
    assert "'hospital' (--site-column), 'weight' (--features) are not in the file" in msg
    assert "'volume'" in msg  # the available columns


def test_hints_name_the_flag_and_the_config_key(tmp_path):
    df = frame(note=["x"] * 24)
    msg = error(DataError, write(tmp_path, df))
    assert "--categorical note" in msg and "--exclude note" in msg
    assert "--features a,b (features = [...] in a config)" in msg
    df = frame()
    df.loc[2, "volume"] = np.nan
    assert '--impute mean|median (impute = "mean" in a config)' in error(DataError, write(tmp_path, df))
    msg = error(DataError, write(tmp_path, frame(label=["AD", "NC"] * 12)))
    assert '--positive-label VALUE (positive_label = "VALUE" in a config)' in msg
    assert "(features=)" not in msg and "(positive_label=)" not in msg
