"""Data with missing labels (issue 14 §1): unlabeled rows in tables, --labeled-fraction, and
supervised methods that train on the labeled rows only and say so."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from medfed.cli.app import app
from medfed.data.federation import Federation
from medfed.data.tables import load_table
from medfed.errors import ConfigError, DataError
from medfed.experiments.config import build_config
from medfed.experiments.harness import (
    check_labeled_fractions,
    labeled_training_rows,
    prepare_repeat,
    run_experiment,
    training_rows,
)
from medfed.experiments.results import results_document

COLS = dict(site_column="site", label_column="label")
SITES = ("A", "B", "C")


def table(tmp_path, labels=("0", "1"), n=30, blank=(), marker=None, name="cohort.csv"):
    """``n`` rows per site, labels cycling through ``labels``, feature x1 tied to the label; rows in
    ``blank`` get an empty label cell, or ``marker`` when given."""
    rng = np.random.default_rng(0)
    y = np.tile(list(labels), len(SITES) * n // len(labels) + 1)[:len(SITES) * n]
    codes = np.unique(y, return_inverse=True)[1]
    df = pd.DataFrame({"site": np.repeat(SITES, n), "x1": codes + rng.normal(size=y.size),
                       "x2": rng.normal(size=y.size), "label": y})
    df.loc[list(blank), "label"] = "" if marker is None else marker
    path = tmp_path / name
    df.to_csv(path, index=False)
    return path


def config(path, methods=("mix", "fedavg"), **data):
    return build_config({"data": {"path": str(path), **COLS, **data}, "repeats": 2, "methods": list(methods),
                         "training": {"rounds": 4, "local_steps": 3}})


def numbers(doc):
    return {(r["setting"], r["train_site"], r["test_site"]): r["metrics"] for r in doc["results"]}


# --------------------------------------------------------------------------- unlabeled rows in a table

BLANK = (0, 1, 2, 3, 35, 61, 62)  # A: 4 rows, B: 1, C: 2


def test_empty_label_cells_are_unlabeled_training_rows(tmp_path):
    path = table(tmp_path, blank=BLANK)
    fed = load_table(path, **COLS)
    assert fed.task == "binary" and fed.info["unlabeled_rows"] == len(BLANK)
    summary = {s["name"]: s for s in fed.site_summaries()}
    assert [(summary[s]["n_labeled"], summary[s]["n_unlabeled"]) for s in SITES] == [(26, 4), (29, 1), (28, 2)]
    # class counts are those of the labeled rows: rows 0..3 of A were 0,1,0,1
    assert (summary["A"]["n_positive"], summary["A"]["n_negative"]) == (13, 13)
    cfg = config(path)
    for repeat in range(2):
        for i, site in enumerate(fed.sites):
            train = training_rows(site, i, cfg, repeat)
            assert train[site.unlabeled].all()  # never a test row
        for site, split in zip(fed.sites, prepare_repeat(fed, cfg, repeat)):
            assert len(split.X_unlabeled) == site.n_unlabeled and split.n_hidden == 0
            assert len(split.y_train) + len(split.y_test) == site.n - site.n_unlabeled
    doc = results_document(run_experiment(cfg, fed))
    assert {s["name"]: s["n_unlabeled"] for s in doc["sites"]} == {"A": 4, "B": 1, "C": 2}
    assert any(w.startswith("7 unlabeled training rows (A: 4, B: 1, C: 2; repeat 1) not used by Mix, FedAvg")
               for w in doc["warnings"])


def test_unlabeled_value_is_ignored_by_inference_and_classes(tmp_path):
    path = table(tmp_path, labels=("AD", "MCI", "NC"), blank=BLANK, marker="unknown")
    # as a label, 'unknown' would be a fourth class
    assert load_table(path, **COLS).classes == ("AD", "MCI", "NC", "unknown")
    fed = load_table(path, **COLS, unlabeled_value="unknown")
    assert fed.task == "multiclass" and fed.classes == ("AD", "MCI", "NC")
    assert [s.n_unlabeled for s in fed.sites] == [4, 1, 2]
    assert fed.site_summaries()[0]["class_counts"] == {"AD": 8, "MCI": 9, "NC": 9}
    # a binary column with a marker: two labeled values are 0/1, inferred binary
    coded = table(tmp_path, blank=BLANK, marker="-1", name="coded.csv")
    assert load_table(coded, **COLS, unlabeled_value="-1").task == "binary"


def test_a_site_without_labeled_rows_is_refused_naming_site_and_file(tmp_path):
    path = table(tmp_path, blank=range(30, 60))  # every row of site B
    with pytest.raises(DataError) as info:
        load_table(path, **COLS)
    msg = str(info.value)
    assert str(path) in msg and "site 'B' (0 of 30)" in msg and "fewer than 2 labeled rows" in msg


# --------------------------------------------------------------------------- --labeled-fraction


def test_labeled_fraction_hides_a_stratified_seeded_share_of_training_labels(tmp_path):
    path = table(tmp_path)
    fed = load_table(path, **COLS)
    cfg = config(path, labeled_fraction=0.5)
    for repeat in range(2):
        for i, site in enumerate(fed.sites):
            train = training_rows(site, i, cfg, repeat)
            kept = labeled_training_rows(site, train, cfg, repeat)
            assert not (kept & ~train).any()
            for c in (0, 1):  # half of each class's training rows
                assert kept[site.y == c].sum() == round(0.5 * train[site.y == c].sum())
            # keyed by the site's name: the same rows whatever its position in the federation
            reordered = Federation("r", tuple(reversed(fed.sites)), fed.feature_names)
            assert (labeled_training_rows(reordered.site(site.name), train, cfg, repeat) == kept).all()
    again = [s.y_train for s in prepare_repeat(fed, config(path, labeled_fraction=0.5), 0)]
    assert all((a == b.y_train).all() for a, b in zip(again, prepare_repeat(fed, cfg, 0)))
    splits = prepare_repeat(fed, cfg, 0)
    assert [s.n_hidden for s in splits] == [len(s.X_unlabeled) for s in splits]
    assert all(abs(len(s.y_train) - s.n_hidden) <= 2 for s in splits)
    # per site: B keeps every label, the others half
    mixed = prepare_repeat(fed, config(path, labeled_fraction=0.5, labeled_fraction_site={"B": 1.0}), 0)
    assert [s.n_hidden > 0 for s in mixed] == [True, False, True]


def test_fraction_one_is_bit_identical_and_below_one_changes_mix_and_fedavg(tmp_path):
    path = table(tmp_path)
    fed = load_table(path, **COLS)
    plain = numbers(results_document(run_experiment(config(path), fed)))
    assert numbers(results_document(run_experiment(config(path, labeled_fraction=1.0), fed))) == plain
    doc = results_document(run_experiment(config(path, labeled_fraction=0.5), fed))
    half = numbers(doc)
    for setting in ("Mix", "FedAvg"):
        keys = [k for k in plain if k[0] == setting]
        assert keys and [half[k] for k in keys] != [plain[k] for k in keys]
    assert any("not used by Mix, FedAvg" in w and "hidden by the labeled fraction" in w for w in doc["warnings"])


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("fraction", [0, -0.5, 1.5])
def test_fraction_outside_zero_one_is_refused(tmp_path, fraction):
    with pytest.raises(ConfigError, match="labeled_fraction"):
        config(table(tmp_path), labeled_fraction=fraction)
    with pytest.raises(ConfigError, match=r"--labeled-fraction-site A=.*must lie in \(0, 1\]"):
        config(table(tmp_path), labeled_fraction_site={"A": fraction})


def test_unknown_site_and_no_labeled_training_row_refused_before_training(tmp_path):
    path = table(tmp_path)
    fed = load_table(path, **COLS)
    with pytest.raises(ConfigError, match=r"no site 'Z'; sites are A, B, C"):
        check_labeled_fractions(config(path, labeled_fraction_site={"Z": 0.5}), fed)
    # 0.01 of 12 training rows per class rounds to none
    with pytest.raises(ConfigError, match=r"--labeled-fraction 0.01 leaves site 'A' no labeled training row"):
        run_experiment(config(path, labeled_fraction=0.01), fed)
    with pytest.raises(ConfigError, match=r"--labeled-fraction-site C=0.01 leaves site 'C'"):
        run_experiment(config(path, labeled_fraction_site={"C": 0.01}), fed)


def test_cli_flags_and_their_one_line_errors(tmp_path):
    path = table(tmp_path, blank=BLANK, marker="?")
    base = ["run", "--data", str(path), "--site-column", "site", "--label-column", "label", "--methods", "fedavg",
            "--rounds", "2", "--local-steps", "2", "--repeats", "1", "--unlabeled-value", "?"]
    runner = CliRunner()
    for extra, expected in ((["--labeled-fraction", "0"], "--labeled-fraction"),
                            (["--labeled-fraction-site", "Z=0.5"], "no site 'Z'"),
                            (["--labeled-fraction", "0.01"], "no labeled training row")):
        result = runner.invoke(app, base + extra + ["--out", str(tmp_path / "bad")])
        assert result.exit_code == 2, result.output
        assert expected in result.output and len(result.output.strip().splitlines()) == 1
        assert not (tmp_path / "bad").exists()
    result = runner.invoke(app, base + ["--labeled-fraction", "0.5", "--labeled-fraction-site", "B=1",
                                        "--out", str(tmp_path / "ok")])
    assert result.exit_code == 0, result.output
    assert "unlabeled training rows" in (tmp_path / "ok" / "table.md").read_text()


# --------------------------------------------------------------------------- image manifests


def manifest(tmp_path, unlabeled, marker=""):
    """Two sites of 12 PNGs (image i filled with i), labels alternating; ``unlabeled`` rows get ``marker``."""
    from PIL import Image

    (tmp_path / "img").mkdir()
    lines = ["path,label,site"]
    for i in range(24):
        Image.fromarray(np.full((4, 4), i, np.uint8)).save(tmp_path / "img" / f"{i}.png")
        lines.append(f"img/{i}.png,{marker if i in unlabeled else i % 2},{'S' if i < 12 else 'T'}")
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "manifest.csv"


def test_manifest_rows_without_a_label_are_unlabeled_images(tmp_path):
    from medfed.data.images import load_image_manifest

    fed = load_image_manifest(manifest(tmp_path, unlabeled={0, 1, 2, 13}, marker="NA"), unlabeled_value="NA")
    assert [s.n_unlabeled for s in fed.sites] == [3, 1]
    assert [(s["n_labeled"], s["n_positive"]) for s in fed.site_summaries()] == [(9, 5), (11, 5)]
    cfg = build_config({"data": {"manifest": str(tmp_path / "manifest.csv"), "unlabeled_value": "NA"}})
    for site, split in zip(fed.sites, prepare_repeat(fed, cfg, 0)):
        assert sorted(split.X_unlabeled[:, 0, 0, 0]) == sorted(site.X[site.unlabeled][:, 0, 0, 0])
        assert not set(split.X_test[:, 0, 0, 0]) & set(site.X[site.unlabeled][:, 0, 0, 0])


def test_manifest_site_without_labels_is_refused(tmp_path):
    from medfed.data.images import load_image_manifest

    path = manifest(tmp_path, unlabeled=set(range(12, 24)))
    with pytest.raises(DataError, match=r"manifest.csv: label column 'label': site 'T' \(0 of 12\)"):
        load_image_manifest(path)
