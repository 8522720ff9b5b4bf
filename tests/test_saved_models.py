"""Saved models (issue 9 §3): `medfed run --save-model` writes OUT/models/<Setting>.npz, and
`medfed predict` scores new rows with one exactly as the run scored that site's test rows."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from image_support import png_classification
from typer.testing import CliRunner

import medfed.experiments.harness as harness
from medfed.cli.app import app
from medfed.experiments.config import build_config
from medfed.experiments.harness import SPLIT_STREAM, load_federation, run_experiment
from medfed.experiments.report import (
    MANIFEST,
    TEMP_FILE,
    report_files,
    write_atomically,
)
from medfed.experiments.results import results_document
from medfed.experiments.saved_model import SavedModel, load_saved_model
from medfed.experiments.splits import stratified_split
from medfed.rng import KeyedRng

runner = CliRunner()
TINY = {"training": {"rounds": 3, "local_steps": 2}}


def invoke(args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def one_line_error(code, text, *needles):
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), text
    for needle in needles:
        assert needle in text, (needle, text)


def run_and_write(values, out):
    """A run from a config dict, its report written as `medfed run` writes it."""
    config = build_config({"save_model": True, **values})
    run = run_experiment(config, load_federation(config.data))
    write_atomically(out, report_files(results_document(run), run))
    return config, run


def test_rows_csv(federation, config, i, path, label="label"):
    """Site i's raw test rows of repeat 1 (missing values as empty cells) and their 0/1 labels."""
    site = federation.sites[i]
    train = stratified_split(site.y, config.test_fraction, KeyedRng(config.seed, (SPLIT_STREAM, 0)).child(i).generator)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([*federation.feature_names, label])
        for x, y in zip(site.X[~train], site.y[~train]):
            writer.writerow(["" if np.isnan(v) else repr(float(v)) for v in x] + [int(y)])


test_rows_csv.__test__ = False  # a helper, not a test


def predicted(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def cell(run, setting, test_site, train_site=None):
    return next(c for c in run.cells if c.setting == setting and c.test_site == test_site
                and c.train_site == train_site and c.model == "global" and c.evaluation == "split")


def test_predict_gives_the_runs_scores_for_every_setting_and_site_on_heart_disease(tmp_path):
    """Global models (FedAvg, Ditto's global, Mix) and the per-site models Single and Cross share,
    scored by `medfed predict` on each site's raw test rows of repeat 1 (missing values filled with
    that site's training medians), equal the run's scores: bit for bit, well inside 1e-12."""
    out = tmp_path / "out"
    config, run = run_and_write({"data": {"dataset": "heart-disease"}, "methods": ["single", "cross", "mix",
                                 "fedavg", "ditto"], "repeats": 2, **TINY}, out)
    fed = load_federation(config.data)
    doc = json.loads((out / "results.json").read_text())
    names = {"FedAvg", "Ditto", "Mix", *(f"Single-{s}" for s in fed.site_names)}
    assert set(doc["models"]["files"]) == names and doc["models"]["not_saved"] == {}
    assert sorted(p.name for p in (out / "models").iterdir()) == sorted(f"{n}.npz" for n in names)
    checked = 0
    for i, site in enumerate(fed.site_names):
        rows = tmp_path / f"{site}.csv"
        test_rows_csv(fed, config, i, rows)
        jobs = [(name, cell(run, name, site)) for name in ("FedAvg", "Ditto", "Mix")]
        jobs.append((f"Single-{site}", cell(run, "Single", site, site)))
        if i:  # Cross: Cleveland's model on this site's rows
            jobs.append(("Single-Cleveland", cell(run, "Cross", site, "Cleveland")))
        for name, expected in jobs:
            preds = tmp_path / "preds.csv"
            code, text = invoke(["predict", "--model", out / "models" / f"{name}.npz", "--data", rows,
                                 "--out", preds, "--site", site, "--label-column", "label"])
            assert code == 0, text
            scores = np.array([float(r["score"]) for r in predicted(preds)])
            _, harness_scores = expected.scores[0]  # repeat 1's model and test rows
            np.testing.assert_allclose(scores, harness_scores, rtol=0, atol=1e-12)
            assert [int(r["predicted"]) for r in predicted(preds)] == (harness_scores >= 0.5).astype(int).tolist()
            acc = expected.metrics["acc"][0].value
            assert f"ACC {acc:.3f}" in text and f"AUC {expected.metrics['auc'][0].value:.3f}" in text, text
            checked += 1
    assert checked == 4 * 4 + 3
    meta = load_saved_model(out / "models" / "Single-Hungary.npz").meta
    assert meta["setting"] == "Single" and set(meta["settings"]) == {"Single", "Cross"}
    assert meta["train_sites"] == ["Hungary"] and (meta["repeat"], meta["repeats"]) == (1, 2)
    assert "repeat 1 of 2" in meta["note"] and meta["impute"] == "median" and meta["scaling"] == "global"
    assert "personal model" in load_saved_model(out / "models" / "Ditto.npz").meta["personal_models"]
    # the VA rows have missing values: which site's medians fill them is the user's to say
    code, text = invoke(["predict", "--model", out / "models" / "FedAvg.npz", "--data", tmp_path / "VA.csv",
                         "--out", tmp_path / "p.csv"])
    one_line_error(code, text, "missing values", "--site", "VA.csv", "FedAvg.npz")
    assert not (tmp_path / "p.csv").exists()


def _table(path):
    """Three sites, a predefined split, a categorical column with a level only test rows hold,
    missing values, text labels."""
    rng = np.random.default_rng(3)
    rows = []
    for k, site in enumerate("ABC"):
        for r in range(40):
            test = r % 4 == 0
            grp = "w" if test and site == "B" and r % 8 == 0 else "xyz"[r % 3]
            f1 = rng.normal() + k
            f2 = "" if r % 7 == 3 else repr(float(rng.normal() * 3 - k))
            label = "yes" if f1 - k + 0.5 * (grp == "x") + rng.logistic() * 0.5 > 0 else "no"
            rows.append([f"{site}{r}", site, "test" if test else "train", grp, repr(float(f1)), f2, label])
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "site", "split", "grp", "f1", "f2", "y"])
        writer.writerows(rows)
    return rows


def test_per_site_scaling_categorical_levels_and_text_labels(tmp_path):
    """A table run with --scaling site: predict needs --site (one line otherwise) and then
    equals the run's scores; a level no training row held and a level the model never had are
    all-zero indicators, noted; the model's label column and positive label give the metrics."""
    data = tmp_path / "all.csv"
    rows = _table(data)
    out = tmp_path / "out"
    _, run = run_and_write({"data": {"path": str(data), "site_column": "site", "label_column": "y",
                                          "split_column": "split", "positive_label": "yes", "exclude": ["id"],
                                          "categorical": ["grp"], "impute": "mean"},
                                 "methods": ["fedavg", "mix"], "scaling": "site", "repeats": 1, **TINY}, out)
    test_b = [r for r in rows if r[1] == "B" and r[2] == "test"]
    assert any(r[3] == "w" for r in test_b)  # the level no training row holds
    new = tmp_path / "b.csv"
    with open(new, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["y", "f2", "grp", "id", "f1"])  # any column order
        writer.writerows([[r[6], r[5], r[3], r[0], r[4]] for r in test_b] + [["no", "1.5", "v", "new", "0.2"]])
    model = out / "models" / "FedAvg.npz"
    code, text = invoke(["predict", "--model", model, "--data", new, "--out", tmp_path / "p.csv"])
    one_line_error(code, text, "--site", "--scaling site", "FedAvg.npz")
    for name in ("FedAvg", "Mix"):
        code, text = invoke(["predict", "--model", out / "models" / f"{name}.npz", "--data", new, "--out",
                             tmp_path / "p.csv", "--site", "B", "--id-column", "id"])
        assert code == 0, text
        preds = predicted(tmp_path / "p.csv")
        assert [r["id"] for r in preds] == [r[0] for r in test_b] + ["new"]
        expected = cell(run, name, "B")
        np.testing.assert_allclose([float(r["score"]) for r in preds[:-1]], expected.scores[0][1], rtol=0, atol=1e-12)
        assert "'w'" in text and "'v'" in text and "all-zero" in text, text
    meta = load_saved_model(model).meta
    assert meta["label"] == {"column": "y", "positive_label": "yes", "positive_class": "yes"}
    assert meta["categorical"] == [{"column": "grp", "levels": ["w", "x", "y", "z"], "start": 0,
                                    "trained": ["x", "y", "z"]}]
    # labels read with the model's positive label: the metrics of exactly the run's test rows
    only = tmp_path / "only.csv"
    with open(only, "w", newline="") as fh:
        csv.writer(fh).writerows([["y", "f2", "grp", "f1"], *[[r[6], r[5], r[3], r[4]] for r in test_b]])
    code, text = invoke(["predict", "--model", model, "--data", only, "--out", tmp_path / "p.csv", "--site", "B"])
    assert code == 0, text
    expected = cell(run, "FedAvg", "B")
    assert f"ACC {expected.metrics['acc'][0].value:.3f}" in text and "label column 'y'" in text, text


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    config, _ = run_and_write({"data": {"dataset": "heart-disease"}, "methods": ["fedavg"], "repeats": 1, **TINY}, out)
    rows = out / "rows.csv"
    test_rows_csv(load_federation(config.data), config, 0, rows)
    return out / "models" / "FedAvg.npz", rows


def test_a_bad_model_file_or_table_is_one_line(tmp_path, tiny_model):
    model, rows = tiny_model
    preds = tmp_path / "p.csv"

    def refused(model_path, *needles, data=rows, extra=()):
        code, text = invoke(["predict", "--model", model_path, "--data", data, "--out", preds, *extra])
        one_line_error(code, text, *needles)
        assert not preds.exists()

    refused(tmp_path / "none.npz", "model file not found", "none.npz")
    refused(tmp_path, "is a folder")
    (tmp_path / "text.npz").write_text("not a zip\n")
    refused(tmp_path / "text.npz", "text.npz", "not a medfed model file")
    np.save(tmp_path / "array.npy", np.zeros(3))
    refused(tmp_path / "array.npy", "array.npy", "not a medfed model file")
    np.savez(tmp_path / "plain.npz", weight=np.zeros(3))
    refused(tmp_path / "plain.npz", "plain.npz", "metadata")
    saved = load_saved_model(model)
    newer = SavedModel({**saved.meta, "format_version": 99}, saved.params, saved.arrays)
    (tmp_path / "newer.npz").write_bytes(newer.to_bytes())
    refused(tmp_path / "newer.npz", "newer.npz", "format version 99")
    damaged = SavedModel(saved.meta, {"weight": saved.params["weight"]}, saved.arrays)
    (tmp_path / "damaged.npz").write_bytes(damaged.to_bytes())
    refused(tmp_path / "damaged.npz", "damaged.npz", "'bias' is missing")
    image = SavedModel({**saved.meta, "sample_shape": [1, 8, 8]}, saved.params, saved.arrays)
    (tmp_path / "image.npz").write_bytes(image.to_bytes())
    refused(tmp_path / "image.npz", "image model", "--manifest FILE")
    refused(model, "--site", "'Nowhere'", "Cleveland", extra=["--site", "Nowhere"])
    # the table: a missing feature column, a non-numeric value, an absent --label-column / --id-column
    lines = rows.read_text().splitlines()
    header = lines[0].split(",")
    cut = tmp_path / "cut.csv"
    cut.write_text("\n".join(",".join(c for j, c in enumerate(ln.split(",")) if header[j] != "chol")
                             for ln in lines) + "\n")
    refused(model, "'chol'", "not in the file", str(model), data=cut)
    text_value = tmp_path / "word.csv"
    text_value.write_text("\n".join([lines[0], lines[1].replace(lines[1].split(",")[0], "old", 1), *lines[2:]]) + "\n")
    refused(model, "'age'", "not numeric", "data row 1", data=text_value)
    refused(model, "'truth'", "--label-column", extra=["--label-column", "truth"])
    refused(model, "'mrn'", "--id-column", extra=["--id-column", "mrn"])
    # --out: a CSV file name that is neither input
    code, text = invoke(["predict", "--model", model, "--data", rows, "--out", tmp_path / "p.txt"])
    one_line_error(code, text, "--out", ".csv")
    code, text = invoke(["predict", "--model", model, "--data", rows, "--out", rows])
    one_line_error(code, text, "--out", "--data")
    assert rows.read_text().splitlines() == lines


def _temp_files(folder):
    return [p for p in Path(folder).rglob("*") if TEMP_FILE.match(p.name)]


def test_models_folder_is_part_of_the_runs_file_set(tmp_path, monkeypatch):
    """Without --save-model no models/; with it (flag or `save_model = true`) every file is in the
    manifest, written atomically (no temp file left, nothing written when one fails) and the same
    bytes for the same seed; --overwrite guards models/ like the other files."""
    out = tmp_path / "out"
    base = ["run", "--dataset", "heart-disease", "--methods", "fedavg,mix", "--rounds", "2", "--repeats", "1",
            "--out", out]
    code, text = invoke(base)
    assert code == 0, text
    assert not (out / "models").exists() and json.loads((out / "results.json").read_text())["models"] is None
    toml = tmp_path / "study.toml"
    toml.write_text('save_model = true\nmethods = ["fedavg", "mix"]\nrepeats = 1\n[data]\ndataset = "heart-disease"\n'
                    '[training]\nrounds = 2\n')
    code, text = invoke(["run", toml, "--out", out])
    assert code == 0, text
    manifest = json.loads((out / MANIFEST).read_text())["files"]
    assert {"models/FedAvg.npz", "models/Mix.npz"} <= set(manifest) and not _temp_files(tmp_path)
    first = (out / "models" / "FedAvg.npz").read_bytes()
    code, text = invoke([*base, "--save-model"])  # the same study by flags: the same bytes
    assert code == 0, text
    assert (out / "models" / "FedAvg.npz").read_bytes() == first
    # a file medfed wrote and someone changed since is not replaced without --overwrite
    with (out / "models" / "Mix.npz").open("ab") as fh:
        fh.write(b"edited")
    code, text = invoke([*base, "--save-model"])
    one_line_error(code, text, "models/Mix.npz", "--overwrite")
    assert (out / "models" / "Mix.npz").read_bytes().endswith(b"edited")
    code, text = invoke([*base, "--save-model", "--overwrite"])
    assert code == 0, text
    # a user's own file there: refused for a run that writes models/, kept by one that does not
    (out / "models" / "mine.npz").write_bytes(b"a user's model")
    code, text = invoke([*base, "--save-model"])
    one_line_error(code, text, "models/mine.npz")
    code, text = invoke(base)
    assert code == 0, text
    assert sorted(p.name for p in (out / "models").iterdir()) == ["mine.npz"]  # medfed's own models went
    (out / "models" / "mine.npz").unlink()
    code, text = invoke([*base, "--save-model"])
    assert code == 0, text
    code, text = invoke(base)
    assert code == 0 and not (out / "models").exists(), text  # no empty models/ left behind
    # writing fails half-way: no file of the set is written or changed, no temp file, no models/
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def broken(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SavedModel, "to_bytes", broken)
    code, text = invoke([*base, "--save-model"])
    assert code == 4 and "no result file was written" in text, text
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not (out / "models").exists() and not _temp_files(tmp_path)
    # a file where models/ goes is refused before any work
    monkeypatch.undo()
    (out / "models").write_text("not a folder")
    code, text = invoke([*base, "--save-model"])
    one_line_error(code, text, "'models'", "folder")


def test_reproduce_takes_save_model(tmp_path):
    code, text = invoke(["reproduce", "--dataset", "heart-disease", "--repeats", "1", "--methods", "fedavg",
                         "--save-model", "--out", tmp_path])
    assert code == 0 and (tmp_path / "models" / "FedAvg.npz").is_file(), text
    assert "models/FedAvg.npz" in " ".join(text.split())


def test_a_setting_without_a_finite_global_model_gets_no_file_and_a_reason(tmp_path, monkeypatch):
    """Mix diverged (parameters NaN): no file, the results say why; PFA keeps part of the model
    at each site: no file, each with its reason.
    Files never hold NaN."""
    real = harness.TrainingPlan.centralized

    def diverging(self, data, initial, rng):
        fit = real(self, data, initial, rng)
        return harness.CentralFit({k: np.full_like(v, np.nan) for k, v in fit.params.items()}, fit.start_loss,
                                  float("nan"))

    monkeypatch.setattr(harness.TrainingPlan, "centralized", diverging)
    out = tmp_path / "out"
    run_and_write({"data": {"dataset": "heart-disease"}, "methods": ["mix", "fedavg", "fourier"],
                  "repeats": 1, **TINY}, out)
    doc = json.loads((out / "results.json").read_text())["models"]
    assert list(doc["files"]) == ["FedAvg"]
    assert doc["not_saved"]["Mix"].startswith("diverged")
    assert doc["not_saved"]["PFA"].startswith("no global model")
    assert sorted(p.name for p in (out / "models").iterdir()) == ["FedAvg.npz"]
    table = (out / "table.md").read_text()
    assert "no file for Mix: diverged" in table and "no file for PFA" in table
    with np.load(out / "models" / "FedAvg.npz", allow_pickle=False) as archive:
        assert all(np.isfinite(archive[k]).all() for k in archive.files if k != "metadata")


def test_a_torch_model_on_a_table_is_saved_and_predicts_the_runs_scores(tmp_path, torch_one_thread):
    pytest.importorskip("torch")
    out = tmp_path / "out"
    config, run = run_and_write({"data": {"dataset": "breast-cancer"}, "model": "mlp",
                                 "model_options": {"hidden": [4], "norm": "batch"}, "methods": ["fedavg"],
                                 "repeats": 1, "training": {"rounds": 2, "local_steps": 2}}, out)
    fed = load_federation(config.data)
    rows = tmp_path / "rows.csv"
    test_rows_csv(fed, config, 1, rows)
    code, text = invoke(["predict", "--model", out / "models" / "FedAvg.npz", "--data", rows, "--out",
                         tmp_path / "p.csv"])
    assert code == 0, text
    scores = [float(r["score"]) for r in predicted(tmp_path / "p.csv")]
    np.testing.assert_allclose(scores, cell(run, "FedAvg", fed.site_names[1]).scores[0][1], rtol=0, atol=1e-12)
    meta = load_saved_model(out / "models" / "FedAvg.npz").meta
    assert meta["model"]["name"] == "mlp" and any("norm.running_mean" in p for p in meta["parameters"])


def test_repeats_in_parallel_save_the_same_files(tmp_path):
    args = ["run", "--dataset", "heart-disease", "--methods", "single,fedavg", "--rounds", "2", "--repeats", "2",
            "--save-model"]
    for workers in ("1", "2"):
        code, text = invoke([*args, "--workers", workers, "--out", tmp_path / workers])
        assert code == 0, text
    files = sorted(p.name for p in (tmp_path / "1" / "models").iterdir())
    assert len(files) == 5 and files == sorted(p.name for p in (tmp_path / "2" / "models").iterdir())
    for name in files:
        assert (tmp_path / "1" / "models" / name).read_bytes() == (tmp_path / "2" / "models" / name).read_bytes()


def test_an_image_model_is_saved_and_predict_takes_its_images_as_a_manifest(tmp_path, torch_one_thread):
    """A CNN's parameter view (BatchNorm statistics included) and its per-channel standardization
    are saved; FedBN has no global model, so no file; predict refuses a table for an image model in one line."""
    pytest.importorskip("torch")
    pytest.importorskip("PIL.Image")
    png_classification(tmp_path)
    out = tmp_path / "out"
    code, text = invoke(["run", "--manifest", tmp_path / "manifest.csv", "--model", "cnn2d", "--model-option",
                         "channels=2,4", "--methods", "fedavg,fedbn", "--rounds", "1", "--local-steps", "1",
                         "--repeats", "1", "--save-model", "--out", out])
    assert code == 0, text
    saved = load_saved_model(out / "models" / "FedAvg.npz")
    assert saved.meta["sample_shape"] == [1, 10, 10] and saved.arrays["scaler/mean"].shape == (1,)
    assert any(name.endswith("running_var") for name in saved.params)
    assert json.loads((out / "results.json").read_text())["models"]["not_saved"]["FedBN"].startswith("no global")
    code, text = invoke(["predict", "--model", out / "models" / "FedAvg.npz", "--data", tmp_path / "manifest.csv",
                         "--out", tmp_path / "p.csv"])
    one_line_error(code, text, "image model", "cnn2d", "give its images as a manifest (--manifest FILE)")


def _task_table(path, task: str) -> dict:
    """Three sites of a multiclass, multilabel or regression table, and its [data] config."""
    rng = np.random.default_rng(0)
    n = 40
    X = rng.normal(size=(3 * n, 3))
    frame = {"site": np.repeat(["A", "B", "C"], n), "a": X[:, 0], "b": X[:, 1], "c": X[:, 2]}
    data = {"path": str(path), "site_column": "site"}
    if task == "multiclass":
        frame["dx"] = np.array(["ad", "mci", "nc"])[np.argmax(X @ rng.normal(size=(3, 3)) + rng.gumbel(size=(3 * n, 3)), 1)]
        data["label_column"] = "dx"
    elif task == "multilabel":
        logits = X @ rng.normal(size=(3, 2)) + rng.logistic(size=(3 * n, 2))
        frame["edema"], frame["effusion"] = (logits > 0).astype(int).T
        data["label_columns"] = ["edema", "effusion"]
    else:
        frame["age"] = np.round(70 + 5 * X @ np.array([1.0, -0.5, 0.3]) + rng.normal(size=3 * n), 2)
        data["label_column"] = "age"
    import pandas as pd

    pd.DataFrame(frame).to_csv(path, index=False)
    return data


@pytest.mark.parametrize("task", ["multiclass", "multilabel", "regression"])
def test_predict_gives_the_runs_predictions_for_every_task(tmp_path, task):
    """Each task's Mix and FedAvg models and site B's Single model, scored by `medfed predict` on
    site B's raw test rows of repeat 1, give the run's test-row predictions bit for bit: class or
    label probabilities (score:<name>), the most probable class, the value on the target's scale."""
    out = tmp_path / "out"
    data = _task_table(tmp_path / "t.csv", task)
    config, run = run_and_write({"data": data, "methods": ["single", "mix", "fedavg"], "repeats": 1,
                                 "training": {"rounds": 4, "local_steps": 2, "lr": 0.3}}, out)
    fed = load_federation(config.data)
    i, site = 1, fed.sites[1]
    test = ~harness.training_rows(site, i, config, 0)
    rows = tmp_path / "rows.csv"
    with open(rows, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(fed.feature_names)
        writer.writerows([repr(float(v)) for v in x] for x in site.X[test])
    for setting, file in (("Mix", "Mix"), ("FedAvg", "FedAvg"), ("Single", "Single-B")):
        code, text = invoke(["predict", "--model", out / "models" / f"{file}.npz", "--data", rows,
                             "--out", tmp_path / f"{file}.csv"])
        assert code == 0, text
        got = predicted(tmp_path / f"{file}.csv")
        y_test, expected = cell(run, setting, "B", "B" if setting == "Single" else None).scores[0]
        np.testing.assert_array_equal(y_test, site.y[test])
        if task == "regression":
            assert list(got[0]) == ["row", "predicted"]
            np.testing.assert_array_equal([float(r["predicted"]) for r in got], expected)
            continue
        names = list(fed.classes)
        assert list(got[0]) == ["row", *(f"score:{c}" for c in names)] + (["predicted"] if task == "multiclass" else [])
        np.testing.assert_array_equal([[float(r[f"score:{c}"]) for c in names] for r in got], expected)
        if task == "multiclass":
            assert [r["predicted"] for r in got] == [names[k] for k in np.argmax(expected, axis=1)]
            assert "predicted class (the most probable): ad " in text
    meta = load_saved_model(out / "models" / "Mix.npz").meta
    assert meta["format_version"] == 1 and meta["task"] == task and meta["threshold"] is None
    assert meta["classes"] == list(fed.classes)
    if task == "regression":  # the scale the run trained Mix in, as results.json records it
        doc = json.loads((out / "results.json").read_text())
        scale = next(g for g in doc["target_scale"]["repeats"][0] if g["train_sites"] == ["A", "B", "C"])
        assert meta["target_scale"] == {"mean": scale["mean"], "std": scale["std"]} and scale["mean"] > 60
    code, text = invoke(["predict", "--model", out / "models" / "Mix.npz", "--data", rows, "--out", tmp_path / "p.csv",
                         "--label-column", "age"])
    one_line_error(code, text, "--label-column", f"holds a {task} model")


def test_a_binary_file_written_before_tasks_still_scores_identically(tmp_path):
    """A binary file without the task and classes fields (as version 1 files were first written)
    loads as a binary model and gives the same scores and decisions as the file the run wrote."""
    out = tmp_path / "out"
    config, run = run_and_write({"data": {"dataset": "heart-disease"}, "methods": ["fedavg"], "repeats": 1, **TINY}, out)
    saved = load_saved_model(out / "models" / "FedAvg.npz")
    assert saved.meta["task"] == "binary" and "target_scale" not in saved.meta
    old = {k: v for k, v in saved.meta.items() if k not in ("task", "classes")}
    (tmp_path / "old.npz").write_bytes(SavedModel(old, saved.params, saved.arrays).to_bytes())
    rows = tmp_path / "rows.csv"
    fed = load_federation(config.data)
    test_rows_csv(fed, config, 0, rows)
    for name in (out / "models" / "FedAvg.npz", tmp_path / "old.npz"):
        code, text = invoke(["predict", "--model", name, "--data", rows, "--out", tmp_path / f"{name.stem}.csv"])
        assert code == 0, text
    new, before = predicted(tmp_path / "FedAvg.csv"), predicted(tmp_path / "old.csv")
    assert new == before and list(new[0]) == ["row", "score", "predicted"]
    np.testing.assert_array_equal([float(r["score"]) for r in new], cell(run, "FedAvg", fed.site_names[0]).scores[0][1])
