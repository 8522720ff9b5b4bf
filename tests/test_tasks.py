"""The task contract (medfed.data.tasks): inference from a label column, refusals, class names,
stratified splits by class and by quantile bin, sites missing a class."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medfed.data.federation import Federation, Site
from medfed.data.tables import load_table
from medfed.data.tasks import strata
from medfed.errors import ConfigError, DataError
from medfed.experiments.splits import stratified_split

COLS = dict(site_column="site", label_column="label")


def table(tmp_path, labels, n=30, sites=("A", "B")) -> str:
    rng = np.random.default_rng(0)
    rows = n * len(sites)
    df = pd.DataFrame({"site": np.repeat(list(sites), n), "x1": rng.normal(size=rows), "x2": rng.normal(size=rows),
                       "label": (list(labels) * rows)[:rows]})
    path = tmp_path / "t.csv"
    df.to_csv(path, index=False)
    return path


def test_class_names_infer_multiclass_in_sorted_order(tmp_path):
    fed = load_table(table(tmp_path, ["nc", "mci", "ad"]), **COLS)
    assert fed.task == "multiclass" and fed.classes == ("ad", "mci", "nc") and "3 class names" in fed.task_source
    assert fed.sites[0].y.dtype == np.int64
    np.testing.assert_array_equal(fed.sites[0].y[:3], [2, 1, 0])  # nc, mci, ad
    assert fed.site_summaries()[0]["class_counts"] == {"ad": 10, "mci": 10, "nc": 10}


def test_whole_numbers_sort_numerically(tmp_path):
    fed = load_table(table(tmp_path, [10, 2, 1]), **COLS)
    assert fed.classes == ("1", "2", "10")


def test_fractional_numbers_infer_regression(tmp_path):
    fed = load_table(table(tmp_path, [61.5, 70.25, 55.0, 80.75]), **COLS)
    assert fed.task == "regression" and fed.classes == ()
    assert fed.sites[0].y.dtype == np.float64 and fed.sites[0].y[1] == 70.25
    assert fed.site_summaries()[0]["target_max"] == 80.75


def test_zero_one_stays_binary_bit_for_bit(tmp_path):
    fed = load_table(table(tmp_path, [0, 1]), **COLS)
    assert fed.task == "binary" and fed.sites[0].y.dtype == np.int8 and fed.positive_label == "1"


@pytest.mark.parametrize("labels, given", [(["AD", "NC"], "'AD'"), (list(range(30)), "more"), (["a", 1, 2], "'a'")])
def test_ambiguous_columns_are_refused_with_the_flags(tmp_path, labels, given):
    with pytest.raises(DataError) as info:
        load_table(table(tmp_path, labels), **COLS)
    msg = str(info.value)
    assert "'label'" in msg and given in msg and "--positive-label VALUE" in msg and "--task" in msg


def test_given_task_overrides_inference(tmp_path):
    path = table(tmp_path, list(range(30)))  # 30 whole numbers: ambiguous until the user says
    assert load_table(path, **COLS, task="regression").task == "regression"
    fed = load_table(table(tmp_path, ["AD", "NC"]), **COLS, task="multiclass")
    assert fed.classes == ("AD", "NC") and fed.task_source == "given"


def test_positive_label_binarizes_and_refuses_other_tasks(tmp_path):
    path = table(tmp_path, ["nc", "mci", "ad"])
    fed = load_table(path, **COLS, positive_label="ad")
    assert fed.task == "binary" and fed.sites[0].y.tolist()[:3] == [0, 0, 1]
    with pytest.raises(DataError, match="--positive-label .* does not apply to task 'multiclass'"):
        load_table(path, **COLS, positive_label="ad", task="multiclass")


@pytest.mark.parametrize("task, what", [("segmentation", "a segmentation task reads a mask per image"),
                                        ("ordinal", "not a task")])
def test_reserved_and_unknown_tasks(tmp_path, task, what):
    with pytest.raises(DataError, match=what):
        load_table(table(tmp_path, [0, 1]), **COLS, task=task)


def test_regression_needs_numbers(tmp_path):
    with pytest.raises(DataError, match="label column 'label' is not numeric.*--task multiclass"):
        load_table(table(tmp_path, ["a", "b", "c"]), **COLS, task="regression")


def test_site_missing_a_class_is_legal_and_reported():
    X = np.zeros((12, 2))
    a = Site("A", X, np.array([0, 1, 2] * 4), task="multiclass")
    b = Site("B", X, np.array([0, 1] * 6), task="multiclass")
    fed = Federation("f", (a, b), ("x1", "x2"), task="multiclass", classes=("u", "v", "w"))
    assert fed.missing_classes() == {"B": ["w"]}
    with pytest.raises(DataError, match="class index 2 but only 2 classes"):
        Federation("f", (a,), ("x1", "x2"), task="multiclass", classes=("u", "v"))
    with pytest.raises(DataError, match="site 'A' holds multiclass targets"):
        Federation("f", (a,), ("x1", "x2"))


def test_stratified_split_by_class_and_by_quantile_bin():
    y = np.repeat([0, 1, 2], [50, 30, 20])
    train = stratified_split(strata("multiclass", y), 0.2, np.random.default_rng(0))
    np.testing.assert_array_equal(np.bincount(y[~train]), [10, 6, 4])
    values = np.random.default_rng(1).normal(size=100)
    bins = strata("regression", values)
    assert np.bincount(bins).tolist() == [20] * 5  # quintiles
    train = stratified_split(bins, 0.2, np.random.default_rng(0))
    assert np.bincount(bins[~train]).tolist() == [4] * 5  # every quintile held out in proportion
    assert strata("binary", y) is y  # binary splits are today's


def test_run_refuses_a_task_the_data_set_does_not_have():
    from medfed.experiments.config import DataSpec
    from medfed.experiments.harness import load_federation

    with pytest.raises(ConfigError, match="--task regression: the data 'heart-disease' hold binary targets"):
        load_federation(DataSpec(dataset="heart-disease", task="regression"))


def test_adni_like_age_is_a_regression_target():
    from medfed.data.datasets import load_dataset

    fed = load_dataset("adni-like", target="age")
    binary = load_dataset("adni-like")
    assert fed.task == "regression" and fed.covariate_names == ("sex",)
    np.testing.assert_array_equal(fed.sites[0].y, binary.sites[0].covariates["age"])
    np.testing.assert_array_equal(fed.sites[0].X, binary.sites[0].X)
    with pytest.raises(ConfigError, match="'target' must be one of diagnosis, age"):
        load_dataset("adni-like", target="sex")
