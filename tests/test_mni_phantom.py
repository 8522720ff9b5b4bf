"""mni-phantom: MNI152 anatomy, simulated scanners and a learnable but not trivial task."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("nibabel")

from medfed.data.datasets import DATASETS, load_dataset, mni_phantom
from medfed.errors import ConfigError, DataError

try:
    mni_phantom.template_folder()
except DataError as exc:  # nilearn (the imaging extra) or its bundled templates absent
    pytest.skip(str(exc), allow_module_level=True)

from medfed.data.datasets.mni_phantom import load_mni_phantom


@pytest.fixture(scope="module")
def default():
    return load_mni_phantom()


def held_out_auc(fed, seed=0) -> float:
    """scikit-learn logistic regression on flattened pixels, fitted per site, AUC on held-out rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    scores, labels = [], []
    for k, site in enumerate(fed.sites):
        X = site.X.reshape(site.n, -1)
        test = np.random.default_rng(seed + k).permutation(site.n) < site.n // 3
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        model.fit(X[~test], site.y[~test])
        # Rank within each site, so the pooled AUC is about the task and not site calibration.
        p = model.predict_proba(X[test])[:, 1]
        scores.append(np.argsort(np.argsort(p)) / (p.size - 1))
        labels.append(site.y[test])
    return float(roc_auc_score(np.concatenate(labels), np.concatenate(scores)))


def test_default_shapes_labels_and_record(default):
    assert default.name == "mni-phantom" and default.site_names == ["site-1", "site-2", "site-3"]
    assert default.is_image and default.sample_shape == (1, 32, 32) and default.feature_names == ("T1",)
    for site in default.sites:
        assert site.X.shape == (150, 1, 32, 32) and site.X.dtype == np.float32
        assert np.isfinite(site.X).all() and site.X.min() >= 0
        assert int(site.y.sum()) == 75  # balanced by default, both classes at every site
    assert "PHANTOM" in default.description and "MNI" in default.description
    assert "Fonov" in default.attribution and "nilearn" in default.attribution
    assert "phantom" in DATASETS["mni-phantom"][2].lower() and "MNI152" in DATASETS["mni-phantom"][2]
    assert set(default.info["scanners"]) == set(default.site_names)
    assert default.info["phantom"] is True


def test_anatomy_is_the_symmetric_template_upright():
    # Identical scanners and no disease: the average image is the (symmetric) MNI slice, so it
    # mirrors onto itself left-right but not top-bottom (anterior and posterior brain differ).
    fed = load_mni_phantom(site_shift=0.0, effect=0.0, n_sites=1, n_per_site=60, size=32)
    mean = fed.sites[0].X[:, 0].mean(axis=0)
    left_right = np.abs(mean - mean[:, ::-1]).mean()
    front_back = np.abs(mean - mean[::-1, :]).mean()
    assert left_right < 0.4 * front_back
    brain = mean > 0.5 * mean.max()
    assert 0.3 < brain.mean() < 0.75  # the brain fills the field of view, with margin
    assert not brain[0].any() and not brain[-1].any() and not brain[:, 0].any() and not brain[:, -1].any()


def test_same_seed_same_images_other_seed_other_subjects(default):
    again = load_mni_phantom(seed=0)
    other = load_mni_phantom(seed=1)
    for a, b, c in zip(default.sites, again.sites, other.sites):
        np.testing.assert_array_equal(a.X, b.X)
        np.testing.assert_array_equal(a.y, b.y)
        assert not np.allclose(a.X, c.X)
    # The scanners are the hospitals, not the people: the same for every seed.
    assert default.info["scanners"] == other.info["scanners"]


def test_a_site_does_not_depend_on_the_others():
    three = load_mni_phantom(n_sites=3, n_per_site=(20, 30, 40))
    two = load_mni_phantom(n_sites=2, n_per_site=(20, 50))
    np.testing.assert_array_equal(three.sites[0].X, two.sites[0].X)


def test_scanner_effects_exist_and_follow_site_shift():
    def brain_medians(fed):
        out = []
        for site in fed.sites:
            X = site.X[:, 0]
            out.append(float(np.median(X[X > 0.5 * np.percentile(X, 99)])))
        return np.array(out)

    shifted = brain_medians(load_mni_phantom(n_per_site=40, effect=0.0))
    same = brain_medians(load_mni_phantom(n_per_site=40, effect=0.0, site_shift=0.0))
    assert shifted.max() / shifted.min() > 1.3
    assert same.max() / same.min() < 1.05
    # noise differs too: background (outside the head) spread per site
    fed = load_mni_phantom(n_per_site=40, effect=0.0)
    corner = [float(s.X[:, 0, :3, :3].std()) for s in fed.sites]
    assert max(corner) / min(corner) > 1.5


@pytest.mark.parametrize("task", ["atrophy", "lesion"])
def test_task_learnable_from_pixels_and_not_without_effect(task, default):
    fed = default if task == "atrophy" else load_mni_phantom(task=task)
    learned = held_out_auc(fed)
    assert 0.68 < learned < 0.97, learned
    null = held_out_auc(load_mni_phantom(task=task, effect=0.0))
    assert abs(null - 0.5) < 0.1, null


def test_default_builds_fast_from_cold_templates():
    mni_phantom._templates.cache_clear()
    mni_phantom._read_templates.cache_clear()
    start = time.perf_counter()
    load_mni_phantom()
    assert time.perf_counter() - start < 2.0


def test_3d_volumes():
    fed = load_mni_phantom(dim="3d", n_per_site=12, n_sites=2)
    assert fed.sample_shape == (1, 16, 16, 16)
    for site in fed.sites:
        assert site.X.shape == (12, 1, 16, 16, 16) and site.X.dtype == np.float32
        assert 0 < site.y.sum() < 12
    small = load_mni_phantom(dim="3d", size=8, n_per_site=10, n_sites=1, task="lesion")
    assert small.sample_shape == (1, 8, 8, 8)


def test_label_and_quantity_skew_per_site():
    fed = load_mni_phantom(n_per_site=[20, 40, 80], positive_fraction=(0.1, 0.5, 0.9))
    assert [s.n for s in fed.sites] == [20, 40, 80]
    assert [int(s.y.sum()) for s in fed.sites] == [2, 20, 72]


def test_through_the_registry_with_option_check():
    fed = load_dataset("mni-phantom", n_per_site=10, task="lesion", lesion_contrast="mixed")
    assert [s.n for s in fed.sites] == [10, 10, 10]
    # per-site values as the command line gives them (--dataset-option n_per_site=12,10)
    fed = load_dataset("mni-phantom", n_sites=2, n_per_site="12,10", positive_fraction="0.5, 0.3")
    assert [(s.n, int(s.y.sum())) for s in fed.sites] == [(12, 6), (10, 3)]
    with pytest.raises(ConfigError, match="n_per_site"):
        load_dataset("mni-phantom", n_per_site="12,ten,10")
    with pytest.raises(DataError, match="no option 'colour'.*n_per_site"):
        load_dataset("mni-phantom", colour=1)


@pytest.mark.parametrize(
    "options, name",
    [
        ({"dim": "4d"}, "dim"),
        ({"task": "tumour"}, "task"),
        ({"size": 4}, "size"),
        ({"dim": "3d", "size": 128}, "size"),
        ({"n_per_site": (50, 50)}, "n_per_site"),
        ({"n_per_site": 5}, "n_per_site"),
        ({"positive_fraction": 1.5}, "positive_fraction"),
        ({"effect": -1.0}, "effect"),
        ({"site_shift": float("nan")}, "site_shift"),
        ({"n_sites": 0}, "n_sites"),
        ({"seed": -1}, "seed"),
        ({"lesion_contrast": "bright"}, "lesion_contrast"),
        ({"slice_mm": 200.0}, "slice_mm"),
    ],
)
def test_bad_options_name_the_option(options, name):
    with pytest.raises(ConfigError, match=name):
        load_mni_phantom(**options)


def test_without_nilearn_a_clear_error(monkeypatch):
    monkeypatch.setattr(mni_phantom.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"imaging extra"):
        mni_phantom.template_folder()


def test_nilearn_itself_is_not_imported():
    code = (
        "import sys; from medfed.data.datasets import load_dataset;"
        "load_dataset('mni-phantom', n_per_site=10);"
        "bad = [m for m in ('nilearn', 'torch', 'sklearn') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def _fingerprint(fed) -> tuple[str, list[float], list[float]]:
    """The labels exactly (integers: any machine draws the same), the images by their sums and
    sums of squares (floats: another CPU's vectorized exp/log may round the last bits otherwise)."""
    import hashlib

    h = hashlib.sha256()
    for s in fed.sites:
        h.update(s.y.tobytes()); h.update(str(s.y.dtype).encode())
    X = [s.X.astype(np.float64) for s in fed.sites]
    return h.hexdigest()[:16], [float(x.sum()) for x in X], [float((x * x).sum()) for x in X]


@pytest.mark.parametrize("options,sums,squares", [
    ({}, [78226.62141354446, 42976.978026154335, 65519.94892187085],
     [69383.95832092428, 19109.47292711004, 53216.73845422739]),
    ({"task": "lesion"}, [80013.047591482, 43794.303995419294, 67112.83154185247],
     [72560.64486100525, 19876.32922119532, 55553.82028833234]),
])
def test_binary_tasks_images_are_unchanged_by_the_new_tasks(options, sums, squares):
    # recorded on main before task=multiclass/age existed: the binary tasks draw what they drew
    labels, got_sums, got_squares = _fingerprint(load_mni_phantom(**options))
    assert labels == "c442b15163811e79"
    np.testing.assert_allclose(got_sums, sums, rtol=1e-9)
    np.testing.assert_allclose(got_squares, squares, rtol=1e-9)


def test_multiclass_task_healthy_atrophy_lesion():
    fed = load_mni_phantom(task="multiclass", n_per_site=30, positive_fraction="0.5,0.2,0.9")
    assert fed.task == "multiclass" and fed.classes == ("healthy", "atrophy", "lesion")
    assert "task=multiclass" in fed.task_source
    counts = [np.bincount(s.y, minlength=3).tolist() for s in fed.sites]
    assert counts == [[15, 8, 7], [24, 3, 3], [3, 14, 13]]  # diseased share split, odd one to atrophy
    # the lesion class darkens periventricular white matter; atrophy lowers gray matter: the class
    # means differ, and a lesion subject's image is not an atrophy subject's
    site = fed.sites[0]
    means = [site.X[site.y == k].mean(axis=0) for k in range(3)]
    assert np.abs(means[2] - means[0]).max() > 0.05 and np.abs(means[1] - means[0]).max() > 0.02


def test_age_task_is_a_regression_whose_atrophy_grows_with_age():
    fed = load_mni_phantom(task="age", n_per_site=60, site_shift=0.0, variability=0.0)
    assert fed.task == "regression" and fed.sites[0].y.dtype == np.float64
    ages = np.concatenate([s.y for s in fed.sites])
    assert ages.min() >= 50 and ages.max() <= 90 and ages.std() > 8

    def brightness_age_r(f):  # older subjects: larger ventricles, thinner cortex -> darker images
        brightness = np.concatenate([s.X.reshape(s.n, -1).mean(axis=1) for s in f.sites])
        return np.corrcoef(np.concatenate([s.y for s in f.sites]), brightness)[0, 1]

    assert brightness_age_r(fed) < -0.25
    null = load_mni_phantom(task="age", n_per_site=60, site_shift=0.0, variability=0.0, effect=0.0)
    assert abs(brightness_age_r(null)) < 0.2  # with effect=0 the age leaves no trace
    assert fed.info["positive_fraction"] is None
    with pytest.raises(ConfigError, match="'positive_fraction' does not apply to task='age'"):
        load_mni_phantom(task="age", positive_fraction=0.3)
    with pytest.raises(ConfigError, match="task"):
        load_mni_phantom(task="segmentatio")
