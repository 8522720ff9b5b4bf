"""Frequency-domain image harmonization (medfed.data.frequency; `--harmonize frequency`): each
image's low-band amplitude moved toward the federation's mean, its phase kept; the fit from the
sites' mean amplitudes equals the pooled images'; in the harness per repeat, loso+adapt; the
audits apply [harmonize] as `medfed run` does."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest
from typer.testing import CliRunner

from medfed.cli.app import app
from medfed.comm.wire import decode, encode
from medfed.data.frequency import (
    amplitude_stats,
    federated_frequency,
    fit_frequency,
    low_band_mask,
)
from medfed.errors import ConfigError
from medfed.experiments.audit import Attack, run_robustness_audit
from medfed.experiments.config import build_config
from medfed.experiments.harness import (
    load_federation,
    prepare_repeat,
    repeat_harmonizer,
    run_experiment,
)
from medfed.experiments.leakage import run_privacy_audit

runner = CliRunner()
TINY_MNI = ["--dataset", "mni-phantom", "--dataset-option", "n_per_site=20", "--dataset-option", "size=16",
            "--model", "cnn2d", "--rounds", "2", "--local-steps", "1", "--repeats", "1"]


def _spectrum(X):
    return np.fft.rfftn(X, axes=tuple(range(2, X.ndim)))


def _images(rng, shape, scale=1.0, offset=0.0):
    return rng.random(shape) * scale + offset


@pytest.mark.parametrize("shape, band, strength", [((6, 2, 12, 10), 0.2, 0.3), ((4, 1, 6, 7, 8), 0.25, 1.0),
                                                   ((5, 1, 9, 9), 0.5, 0.7)])
def test_each_image_keeps_its_phase_and_moves_its_low_band_amplitude_by_the_strength(shape, band, strength):
    rng = np.random.default_rng(0)
    a, b = _images(rng, shape), _images(rng, (3, *shape[1:]), scale=3.0, offset=1.0)
    model = federated_frequency([("a", a), ("b", b)], band, strength)
    out = model.apply(a, "a")
    mask = low_band_mask(shape[2:], band)
    before, after = _spectrum(a), _spectrum(out)
    amplitude = np.abs(before[..., mask])
    # exactly the stated fraction of the way to the federation's mean, per image and channel
    np.testing.assert_allclose(np.abs(after[..., mask]), (1 - strength) * amplitude + strength * model.reference,
                               rtol=1e-10, atol=1e-10)
    assert np.abs(np.abs(after[..., mask]) - amplitude).max() > 0.1  # it did move
    kept = np.abs(after) > 1e-9  # the phase as a unit phasor (an angle wraps at ±pi)
    np.testing.assert_allclose(after[kept] / np.abs(after[kept]), before[kept] / np.abs(before[kept]), atol=1e-9)
    np.testing.assert_allclose(after[..., ~mask], before[..., ~mask], atol=1e-9)  # beyond the band: unchanged
    assert out.shape == a.shape and out.dtype == a.dtype


def test_strength_zero_is_the_identity_bit_for_bit_and_float32_stays_float32():
    rng = np.random.default_rng(1)
    for shape in ((5, 1, 16, 16), (3, 2, 6, 8, 5)):
        a = _images(rng, shape).astype(np.float32)
        b = _images(rng, shape, scale=2.0).astype(np.float32)
        same = federated_frequency([("a", a), ("b", b)], 0.1, 0.0).apply(a)
        assert same.dtype == np.float32 and same.shape == a.shape and np.array_equal(same, a)
        moved = federated_frequency([("a", a), ("b", b)], 0.1, 1.0).apply(a)
        assert moved.dtype == np.float32 and moved.shape == a.shape and not np.array_equal(moved, a)


def test_the_fit_from_site_means_equals_the_pooled_images_and_ignores_site_order():
    rng = np.random.default_rng(2)
    sites = [(f"s{i}", _images(rng, (n, 2, 10, 12), scale=1 + i)) for i, n in enumerate((4, 9, 2))]
    model = federated_frequency(sites, 0.15, 1.0)
    pooled = np.concatenate([x for _, x in sites])
    mask = low_band_mask((10, 12), 0.15)
    np.testing.assert_allclose(model.reference, np.abs(_spectrum(pooled)[..., mask]).mean(axis=0), rtol=1e-12)
    # what a site sends is its image count and mean low-band amplitude: no image, no phase
    stats = amplitude_stats("s1", sites[1][1], 0.15)
    assert stats.n == 9 and stats.mean_amplitude.shape == (2, int(mask.sum()))
    sent = decode(encode(stats))  # it travels as a wire type
    assert sent.spatial == (10, 12) and np.array_equal(sent.mean_amplitude, stats.mean_amplitude)
    np.testing.assert_allclose(fit_frequency([amplitude_stats(n, x, 0.15) for n, x in sites[::-1]], 1.0).reference,
                               model.reference, rtol=1e-14)


def test_the_low_band_is_a_box_in_cycles_per_pixel_and_always_holds_the_mean():
    assert low_band_mask((32, 32), 0.1).sum() == 7 * 4  # |k| <= 3 on the full axis, 0..3 on the half axis
    assert low_band_mask((32, 32), 0.5).all()  # the Nyquist frequency: the whole half spectrum
    only_mean = low_band_mask((8, 8, 8), 0.01)
    assert only_mean.sum() == 1 and only_mean[0, 0, 0]


def test_bad_fits_are_one_clear_error():
    rng = np.random.default_rng(3)
    with pytest.raises(ConfigError, match=r"--band must be in \(0, 0.5\]"):
        amplitude_stats("a", _images(rng, (2, 1, 8, 8)), 0.6)
    with pytest.raises(Exception, match="one image shape"):
        federated_frequency([("a", _images(rng, (2, 1, 8, 8))), ("b", _images(rng, (2, 1, 8, 6)))], 0.1, 1.0)


# --------------------------------------------------------------------------- in the harness


def _config(**over):
    values = {"data": {"dataset": "mni-phantom", "options": {"n_per_site": 20, "size": 16}}, "model": "cnn2d",
              "harmonize": {"method": "frequency", "band": 0.2, "strength": 0.8}, "repeats": 1}
    values.update(over)
    return build_config(values)


def test_the_fit_uses_training_images_only_and_an_unseen_site_adapts_itself():
    config = _config()
    fed = load_federation(config.data)
    sites = prepare_repeat(fed, config, 0)
    harmonizer = repeat_harmonizer(config, fed, sites)
    everyone = harmonizer((0, 1, 2))
    changed = list(sites)
    changed[0] = dataclasses.replace(sites[0], X_test=sites[0].X_test * np.float32(3.0))
    again = repeat_harmonizer(config, fed, changed)((0, 1, 2))
    np.testing.assert_array_equal(again[1].X_train, everyone[1].X_train)  # the fit never saw a test image
    np.testing.assert_array_equal(again[2].X_test, everyone[2].X_test)
    # under LOSO the held-out site is as it comes, or (adapt) moved by the others' reference
    without = harmonizer((1, 2))
    assert without[0] is sites[0]
    adapted = harmonizer((1, 2), adapt=True)[0]
    reference = harmonizer.fit((1, 2))
    np.testing.assert_array_equal(adapted.X_test, reference.apply(sites[0].X_test))
    assert not np.array_equal(adapted.X_test, sites[0].X_test) and adapted.X_test.dtype == np.float32


def test_run_with_frequency_reports_the_site_effect_and_adapted_unseen_sites(tmp_path):
    out = tmp_path / "res"
    result = runner.invoke(app, ["run", *TINY_MNI, "--harmonize", "frequency", "--band", "0.2", "--strength", "0.8",
                                 "--methods", "fedavg", "--loso", "--out", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "results.json").read_text())
    h = doc["harmonization"]
    assert (h["method"], h["band"], h["strength"]) == ("frequency", 0.2, 0.8)
    assert list(h["before"]["variance_ratio"])[:2] == ["T1 q01", "T1 q05"]
    # mni-phantom's scanners differ in gain: the test images' intensities tell the site apart less
    assert h["after"]["variance_ratio_mean"] < 0.7 * h["before"]["variance_ratio_mean"]
    adapted = {(r["setting"], r["test_site"]) for r in doc["results"] if r["evaluation"] == "loso+adapt"}
    assert adapted == {("FedAvg", s) for s in ("site-1", "site-2", "site-3")}
    assert "harmonized in the frequency domain (low band 0.2 cycles/pixel, strength 0.8)" in " ".join(
        result.output.split())


@pytest.mark.parametrize("flags, needle", [
    (["--harmonize", "frequency", "--band", "0.6"], "--band"),
    (["--harmonize", "frequency", "--band", "0"], "--band"),
    (["--harmonize", "frequency", "--strength", "1.5"], "--strength"),
    (["--harmonize", "combat"], "--harmonize combat adjusts feature tables; this federation holds images"),
    (["--harmonize", "combat", "--band", "0.2"], "band and strength (--band, --strength) are options of method"),
    (["--harmonize", "frequency", "--no-eb"], "eb (--no-eb) is an option of method = \"combat\""),
])
def test_run_refuses_bad_frequency_settings_in_one_line(tmp_path, flags, needle):
    result = runner.invoke(app, ["run", *TINY_MNI, "--out", str(tmp_path / "r"), *flags])
    text = result.output
    assert result.exit_code == 2 and needle in " ".join(text.split()) and len(text.strip().splitlines()) == 1, text
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("harmonize", [{"method": "none"}, {"method": "combat", "eb": False},
                                       {"method": "frequency"}, {"method": "frequency", "strength": 0.5}])
def test_a_config_dump_rebuilds_the_same_config(harmonize):
    # a deployed study travels as a dump of every field: the other method's options must not appear in it
    config = _config(harmonize=harmonize)
    assert build_config(config.model_dump(mode="json")) == config
    if harmonize["method"] == "frequency":
        assert (config.harmonize.band, config.harmonize.strength) == (0.1, harmonize.get("strength", 1.0))


# --------------------------------------------------------------------------- the audits


def _combat(**over):
    values = {"data": {"dataset": "adni-like", "covariates": ["age", "sex"]}, "harmonize": {"method": "combat"},
              "methods": ["fedavg"], "repeats": 1, "training": {"rounds": 3, "local_steps": 3}}
    values.update(over)
    return build_config(values)


def _run_metrics(config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = run_experiment(config, load_federation(config.data))
    return {c.test_site: {m: c.metrics[m][0].value for m in ("acc", "auc")} for c in run.cells}


def test_the_audits_train_on_the_harmonized_rows_that_medfed_run_uses():
    config = _combat()
    plain = _run_metrics(config)
    assert plain != _run_metrics(_combat(harmonize={"method": "none"}, data={"dataset": "adni-like"}))
    doc = run_privacy_audit(config, "membership", [0], None)
    for row in doc["rows"]:
        assert {m: row[m]["values"][0] for m in ("acc", "auc")} == plain[row["site"]]
    robust = run_robustness_audit(config, Attack("sign_flip", corrupt=1, scale=10.0))
    clean = robust["defenses"][0]["per_repeat"][0]["clean"]["sites"]
    assert clean and all({m: v[m] for m in ("acc", "auc")} == plain[site] for site, v in clean.items())


@pytest.mark.parametrize("method, files", [("combat", "manifest"), ("frequency", "table")])
def test_a_deployed_study_refuses_a_harmonization_of_another_kind_of_data(tmp_path, method, files):
    from medfed.deploy.study import load_study

    study = tmp_path / "study.toml"
    study.write_text(f'methods = ["fedavg"]\n[data]\nsite_column = "site"\nlabel_column = "y"\n'
                     f'[deploy]\nsites = ["a", "b"]\nsite_files = "{files}"\n[harmonize]\nmethod = "{method}"\n')
    with pytest.raises(ConfigError, match=f'method = "{method}" adjusts .* this study\'s sites give') as info:
        load_study(study)
    assert len(str(info.value).splitlines()) == 1
