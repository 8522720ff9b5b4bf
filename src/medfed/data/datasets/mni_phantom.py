"""``mni-phantom``: a seeded multi-site image federation built on REAL anatomy, offline.

WHAT IS REAL AND WHAT IS NOT. The anatomy is real: every image is resampled from the MNI
ICBM152 2009a nonlinear symmetric templates (an average of 152 healthy adult brains; T1
intensities and gray/white-matter probability maps) that nilearn ships inside its package
(``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``), read
with nibabel; nothing is downloaded and nilearn itself is not imported. Everything else is a
PHANTOM: the subjects (pose, shape), the disease (atrophy or a lesion), the scanners and
therefore the labels are simulated. No image here was acquired from a person.

Attribution: V. S. Fonov, A. C. Evans, R. C. McKinstry, C. R. Almli and D. L. Collins (2009),
"Unbiased nonlinear average age-appropriate brain templates from birth to adulthood",
NeuroImage 47 S102; V. S. Fonov et al. (2011), "Unbiased average age-appropriate atlases for
pediatric studies", NeuroImage 54(1) 313-327; D. L. Collins et al. (1999). Copyright (C)
1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute,
McGill University. nilearn's description of the template (``icbm152_2009.rst``) gives its
licence as "unknown"; the MNI distribution carries a permissive notice (use, copy, modify
and distribute with the copyright notice kept, no warranty). Files as bundled by nilearn.

Generative model
----------------
Site ``k`` (named ``site-{k+1}``) and subject ``i``. Two kinds of randomness are kept apart:
a site's **scanner** is drawn from ``SeedSequence(SCANNER_SEED, spawn_key=(k,))`` and is the
same for every ``seed`` and every ``n_sites`` (site 2 is always the same hospital); the
**subjects** are drawn from ``SeedSequence(seed, spawn_key=(k,))``, so ``seed`` changes the
people, not the hospitals, and one site's subjects do not depend on another site's size.

1. *Field of view*: a square (2D) or cube (3D) of ``FOV_MM`` = 200 mm around the brain,
   sampled on a ``size`` grid from templates low-passed for that spacing (against aliasing).
   2D images are axial slices at MNI height ``slice_mm`` (default +15 mm: the lateral
   ventricles, basal ganglia, insula and temporal cortex); 3D images cover the whole brain.
2. *Subject*: a random slice within ``± band_mm`` of that height (2D), head size
   ``exp(N(0, 0.04²))``, rotation (in-plane ``U(±8°)``, tilts ``U(±3°)``), shift ``U(±4 mm)``
   (in-plane; in 3D also vertical)
   and a smooth random deformation (4 random Fourier waves of ~90 mm wavelength, ~2 mm
   amplitude); all pose terms scale with ``variability``. Per-subject global intensity
   ``exp(N(0, 0.05²))``.
3. *Task* (label 1 = present; exactly ``round(n * positive_fraction)`` positives per site;
   ``multiclass`` draws atrophy for class 1 and lesions for class 2, ``age`` draws atrophy from
   the age, ``multitask`` gives each site its own binary disease, ``site_tasks``, see the
   difficulty table below):

   * ``atrophy``: severity ``σ ~ U(0.35, 1)`` for positives, ``U(0, 0.45)`` for negatives
     (normal ageing; the ranges overlap). The lateral ventricles enlarge by a local radial
     magnification around their centroid (sampling radius shrunk by ``0.22 · effect · σ``
     at the centre, Gaussian fall-off, 22 mm) and cortical gray matter thins in a
     temporo-parietal pattern (three 25 mm Gaussian regions at MNI (±48, -28, 12) and
     (0, -55, 25)): T1 is lowered by ``0.55 · effect · σ · p_GM`` of the GM-CSF contrast.
   * ``lesion``: 1-3 Gaussian blobs (radius ``lesion_mm · U(0.6, 1)``) centred on white
     matter (p_WM > 0.7) within 40 mm of the ventricles (periventricular, as in multiple
     sclerosis), changing T1 by ``0.65 · effect · U(0.6, 1) · p_WM`` of its value: darker
     (``hypo``, a T1 "black hole"), brighter (``hyper``) or either at random (``mixed``,
     which a linear model cannot exploit).
4. *Scanner* of site ``k`` (every term scales with ``site_shift``; 0 = identical scanners):
   gamma ``exp(U(±0.25))``, gain ``exp(U(±0.35))``, a smooth multiplicative bias field
   ``exp(b · pattern)`` (second-order polynomial in scanner coordinates, ``b ~ U(0.15, 0.4)``,
   slightly jittered per subject), Gaussian blur ``U(0.5, 6)`` mm, an acquisition matrix of
   ``1 - U(0, 0.4)`` times ``size`` (interpolated back to ``size``: lower resolution),
   Rician noise of ``0.015 + U(0, 0.05)`` (white matter ≈ 0.86 before gain) and a
   positioning protocol that places slices (or the 3D field of view) ``U(±5)`` mm higher
   or lower. The parameters are recorded in ``Federation.info["scanners"]``.

Images are float32 ``(n, 1, size, size)`` (2D) or ``(n, 1, size, size, size)`` (3D), channel
``"T1"``, not standardized (the model layer standardizes intensities).

Measured difficulty
-------------------
scikit-learn ``LogisticRegression(C=0.1)`` on standardized flattened pixels, 3 sites × 150
images (2D 32×32 unless said), balanced; ROC AUC, mean over seeds 0-4 (min-max over seeds).
*Within site*: 5-fold stratified cross-validation inside each site, averaged over sites.
*Cross site*: fitted on one whole site, scored on each other site (the survey's "Cross";
it fits on 150 rows where a within-site fold fits on 120, so it can come out higher when
scanners agree). *Pooled*: 5-fold cross-validation on all sites together, one AUC over
every held-out row (the survey's "Mix", where scanner gains become confounders).

==========================================  ================  ================  ================
options (defaults otherwise)                within site       cross site        pooled
==========================================  ================  ================  ================
``task="atrophy"`` (the default)            0.79 (0.75-0.84)  0.76 (0.74-0.78)  0.78 (0.76-0.81)
``task="lesion"`` (hypointense)             0.76 (0.74-0.79)  0.73 (0.69-0.77)  0.74 (0.69-0.79)
``task="lesion", lesion_contrast="mixed"``  0.48 (0.46-0.51)  0.48 (0.45-0.51)  0.46 (0.42-0.51)
``site_shift=0`` (identical scanners)       0.85 (0.83-0.88)  0.87 (0.84-0.89)  0.91 (0.88-0.92)
``task="lesion", site_shift=0``             0.77 (0.74-0.78)  0.82 (0.78-0.84)  0.89 (0.88-0.90)
``site_shift=2``                            0.72 (0.67-0.75)  0.62 (0.58-0.64)  0.66 (0.62-0.71)
``effect=0`` (null: labels carry nothing)   0.48 (0.43-0.53)  0.49 (0.48-0.50)  0.48 (0.47-0.51)
``dim="3d"`` (16³)                          0.75 (0.71-0.78)  0.73 (0.67-0.78)  0.73 (0.71-0.77)
==========================================  ================  ================  ================

Three classes and a regression target, same protocol and seeds (within site / pooled):

* ``task="multiclass"`` (healthy / atrophy / lesion; diseased share 0.5, atrophy 1 and lesion 2
  per 4 subjects; a healthy or lesion subject ages normally, severity ``U(0, 0.45)``),
  multinomial ``LogisticRegression(C=0.1)``: macro one-vs-rest AUC 0.74 (0.73-0.75) / 0.72
  (0.69-0.77), accuracy 0.61 (0.58-0.62) / 0.58 (0.56-0.64); chance accuracy 0.50 (all healthy).
  ``medfed run --model torch_logistic`` with default training (20 rounds, lr 0.01, 3 repeats):
  macro-AUC Single 0.66-0.75, Mix 0.66-0.71 per test site; FedAvg's loss rose at lr 0.01.
* ``task="age"`` (ages ``U(50, 90)`` years; severity ``clip((age - 50) / 40 + N(0, 0.1²), 0, 1) ·
  effect``, the same atrophy model; target std 11.5 years), ``Ridge(alpha=1000)``: R² 0.42
  (0.38-0.46) / 0.31 (0.27-0.32), MAE 7.3 / 8.1 years (predicting the mean: about 10).

Through ``medfed run`` (settings and federated methods; seed 0, 2 repeats, mean per test site
site-1 / site-2 / site-3; the spread over the 2 repeats is often 0.1, so read
the rows as a first look, not a ranking). Small budgets, so models are under-trained:

* ``task="segmentation"``, ``unet2d`` (defaults: channels 8, 16, 32, BatchNorm, Adam), Dice of
  the lesion on test images that hold one; ``medfed run --dataset mni-phantom --dataset-option
  task=segmentation --dataset-option size=S [--dataset-option lesion_mm=15] --dataset-option
  n_per_site=60 --model unet2d --methods single,mix,fedavg,fedbn,fedprox --repeats 2 --rounds 40
  --local-steps 10 --batch-size 16 --lr 0.01`` (wall time on the shared 2-core CPU: 330 s at
  S = 64, 149 s at S = 32 with 15 mm lesions):

  =================  ==================  ==================
  setting            Dice, S = 64        Dice, S = 32,
                                         lesion_mm = 15
  =================  ==================  ==================
  Single             0.19 / 0.06 / 0.22  0.40 / 0.52 / 0.59
  Mix                0.39 / 0.20 / 0.37  0.56 / 0.48 / 0.54
  FedAvg             0.31 / 0.14 / 0.37  0.25 / 0.09 / 0.41
  FedBN (personal)   0.45 / 0.23 / 0.43  0.51 / 0.58 / 0.47
  FedProx            0.20 / 0.02 / 0.32  0.30 / 0.04 / 0.49
  =================  ==================  ==================

  The default lesions (radius 8 mm · U(0.6, 1), masked at half their peak contrast) span 1-3
  pixels at 64 x 64 and are low-contrast after each scanner's blur and noise: a centralized
  U-Net levels off near Dice 0.4 (120 rounds of Mix gave 0.45 / 0.27 / 0.34, no better than 40);
  15 mm lesions at 32 x 32 reach 0.5-0.6. Site 2's scanner is the hardest. FedBN, which keeps
  each site's BatchNorm, is the best federated method and beats Mix at 64 x 64; FedAvg and
  FedProx (default ``mu``) fall below Mix, site 2 most. At ``--lr 0.1`` (Adam) every setting
  stayed below 0.3.
* ``task="age"``, MAE (years) and R²; ``medfed run --dataset mni-phantom --dataset-option task=age
  --dataset-option size=32 --dataset-option n_per_site=150 --model M --methods
  single,mix,fedavg,fedbn,fedprox --repeats 2 --rounds 40 --local-steps 10 --batch-size 32 --lr LR``
  (targets standardized by the training sites' pooled mean and std, predictions mapped back):

  =================  ==================  ==================  ==================  ==================
  setting            cnn2d (Adam, lr     cnn2d R²            torch_logistic      torch_logistic R²
                     0.01) MAE                               (SGD, lr 0.001) MAE
  =================  ==================  ==================  ==================  ==================
  Single             5.9 / 6.8 / 5.3     0.60 / 0.34 / 0.70  7.6 / 7.9 / 8.1     0.37 / 0.17 / 0.40
  Mix                5.9 / 6.8 / 6.4     0.58 / 0.42 / 0.57  7.9 / 8.4 / 8.6     0.34 / 0.16 / 0.28
  FedAvg             10.5 / 9.6 / 6.4    -0.17 / -0.18 / 0.60  8.7 / 8.9 / 8.2   0.02 / 0.00 / 0.38
  FedBN (personal)   4.9 / 7.1 / 5.0     0.69 / 0.34 / 0.73  no private layers   no private layers
  FedProx            9.3 / 11.7 / 5.9    0.00 / -0.80 / 0.66  8.9 / 8.8 / 8.3    -0.04 / 0.02 / 0.38
  =================  ==================  ==================  ==================  ==================

  A finding, not a bug to hide: FedAvg and FedProx fall below Single on age. With Adam the
  site's optimizer restarts every round, and its first full-size steps overshoot a regression
  target: torch_logistic with Adam (lr 0.005) gave FedAvg MAE 27 / 16 / 10 with its training loss
  rising in both repeats (the run says so), while Mix, which keeps one optimizer, reached R²
  0.40-0.63; with SGD, lr 0.001 is stable (0.003 diverges). FedBN's loss rose above 2x in both
  repeats and it still scored best: scanner effects sit in the BatchNorm statistics it keeps.
* ``task="multiclass"``, macro one-vs-rest AUC and accuracy; ``medfed run --dataset mni-phantom
  --dataset-option task=multiclass --dataset-option size=32 --dataset-option n_per_site=150
  --model M --methods single,mix,fedavg,fedbn,fedprox --repeats 2 --rounds 40 --local-steps 10
  --batch-size 32 --lr LR`` (chance accuracy 0.50, all healthy):

  =================  ==================  ==================  ==================  ==================
  setting            cnn2d (lr 0.01)     cnn2d accuracy      torch_logistic      torch_logistic
                     macro-AUC                               (lr 0.005) m-AUC    accuracy
  =================  ==================  ==================  ==================  ==================
  Single             0.69 / 0.54 / 0.87  0.57 / 0.38 / 0.75  0.80 / 0.69 / 0.77  0.67 / 0.57 / 0.65
  Mix                0.74 / 0.51 / 0.68  0.55 / 0.50 / 0.55  0.79 / 0.76 / 0.75  0.62 / 0.45 / 0.55
  FedAvg             0.70 / 0.65 / 0.83  0.37 / 0.33 / 0.60  0.72 / 0.75 / 0.70  0.48 / 0.32 / 0.53
  FedBN (personal)   0.87 / 0.75 / 0.88  0.75 / 0.53 / 0.72  no private layers   no private layers
  FedProx            0.70 / 0.50 / 0.82  0.52 / 0.27 / 0.67  0.71 / 0.74 / 0.70  0.53 / 0.42 / 0.63
  =================  ==================  ==================  ==================  ==================

  cnn2d at lr 0.1 (and 0.05 with 100 steps) did not learn: its loss stayed near ln 3 and Mix,
  FedBN and FedProx predicted one class. FedBN's loss rose above 2x its start in 1 of 2
  repeats at lr 0.01 and still scored best: scanner effects sit in the BatchNorm statistics it
  keeps per site. torch_logistic has no layer FedBN keeps private (``--methods`` without fedbn).

* ``task="multitask"`` (default ``site_tasks``: site-1 atrophy, site-2 lesion, site-3 atrophy;
  each site's images and labels are those of ``task=atrophy`` or ``task=lesion`` at that site, so
  the table above gives each site's difficulty). Per-site AUC, mean ± std over seeds 0, 1, 2
  (``--dataset-option seed=S --seed S``, one repeat each), ``medfed run --dataset mni-phantom
  --dataset-option task=multitask --dataset-option size=32 --dataset-option n_per_site=120 --model
  cnn2d --methods single,mix,fedavg,fedper,multitask --rounds 30 --local-steps 5 --batch-size 32
  --lr 0.01`` (40-150 s per seed on the shared 2-core CPU):

  =================  ===========  ============  ===========
  setting            site-1       site-2        site-3
                     (atrophy)    (lesion)      (atrophy)
  =================  ===========  ============  ===========
  Single             0.92 ± 0.03  0.64 ± 0.11   0.95 ± 0.03
  Mix                0.91 ± 0.06  0.51 ± 0.07   0.86 ± 0.13
  FedAvg             0.93 ± 0.02  0.44 ± 0.08   0.96 ± 0.03
  FedPer (personal)  0.89 ± 0.07  0.65 ± 0.08   0.98 ± 0.02
  MultiTask (pers.)  0.88 ± 0.05  0.63 ± 0.06   0.96 ± 0.04
  =================  ===========  ============  ===========

  One model for all (Mix, FedAvg) learns the atrophy majority and is at or below chance on the
  lesion site; a private head per site recovers it (MultiTask, FedPer), but no better than the
  lesion site training alone (Single). MultiTask is FedPer's computation; its numbers differ from
  FedPer's only by the training draws, which the harness keys by method name.

Scanner differences cost most when sites are pooled or crossed (compare ``site_shift`` 0,
1, 2). A mixed-sign lesion defeats any linear model by design: a task for CNNs.
Building the default federation takes about 1.1 s in a fresh process on this 2-core CPU
(imports and reading the templates included; the templates then stay in memory, nothing
is cached on disk) and 0.3 s after that; 3D at 16³ about 1.3 s.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medfed.data.datasets.options import check_choice, check_float, check_int, names_list
from medfed.data.extras import import_extra, missing_extra
from medfed.data.federation import MIN_SITE_SAMPLES, Federation, Site
from medfed.errors import ConfigError, DataError

TASKS = ("atrophy", "lesion", "multiclass", "age", "segmentation", "multitask")
# task="multitask": each site's own binary disease (option site_tasks, cycled over the sites)
SITE_TASKS = ("atrophy", "lesion")
DEFAULT_SITE_TASKS = ("atrophy", "lesion", "atrophy")
# task="multiclass": class k of a subject is MULTICLASS_CLASSES[k]; atrophy keeps index 1 and the
# lesion class is the last, so the binary tasks' "y == 1" rules read the same
MULTICLASS_CLASSES = ("healthy", "atrophy", "lesion")
# task="age": simulated ages (years), uniform per subject; atrophy grows linearly over this span
AGE_RANGE = (50.0, 90.0)
# spread of a subject's atrophy about the one its age predicts (brain-age "gap"), in severity units
AGE_SEVERITY_SD = 0.1
# task=segmentation: a pixel is lesion where the blob's share of the T1 change, blob x p_WM,
# is at least half its peak (the lesion's half-maximum extent)
LESION_MASK_LEVEL = 0.5
DIMS = ("2d", "3d")
# the medfed task (medfed.data.tasks) of each phantom task; the others are binary
FEDERATION_TASK = {"multiclass": "multiclass", "age": "regression", "segmentation": "segmentation"}
SEGMENTATION_CLASSES = ("background", "lesion")
LESION_CONTRASTS = ("hypo", "hyper", "mixed")
TEMPLATE_FILE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
ATTRIBUTION = (
    "Anatomy: MNI ICBM152 2009a nonlinear symmetric templates (T1, GM, WM), V. S. Fonov et al. "
    "(2009) NeuroImage 47 S102 and (2011) NeuroImage 54 313-327, D. L. Collins et al. (1999); "
    "Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, MNI, McGill "
    "University; files as bundled with nilearn. Subjects, disease and scanners are simulated."
)

SCANNER_SEED = 20240904
FOV_MM = 200.0
# Centre of the field of view (MNI mm): the middle of the brain's bounding box in x and y;
# for 3D also in z (the template's brain spans z = -71 .. +82 mm).
FOV_CENTRE_XY = (0.0, -17.0)
FOV_CENTRE_Z_3D = 5.0
# Centroid of the lateral ventricles in this template (MNI mm), measured once as the two
# large connected components of "inside the brain, p_GM + p_WM < 0.25".
VENTRICLE_CENTRE = np.array([0.0, -16.0, 15.0])
VENTRICLE_RADIUS_MM = 22.0
ATROPHY_REGIONS = np.array([[48.0, -28.0, 12.0], [-48.0, -28.0, 12.0], [0.0, -55.0, 25.0]])
ATROPHY_REGION_MM = 25.0
# Mean template T1 (divided by 255) where p_GM > 0.8, and in the ventricles: thinning
# replaces gray matter by CSF, so it lowers T1 by a share of this contrast.
GM_CSF_CONTRAST = (166.0 - 75.0) / 255.0
LESION_ZONE_MM = 40.0


def load_mni_phantom(
    seed: int = 0,
    n_sites: int = 3,
    n_per_site: int | Sequence[int] = 150,
    dim: str = "2d",
    size: int | None = None,
    task: str = "atrophy",
    positive_fraction: float | Sequence[float] | None = None,
    site_shift: float = 1.0,
    effect: float = 1.0,
    variability: float = 1.0,
    lesion_mm: float = 8.0,
    lesion_contrast: str = "hypo",
    slice_mm: float = 15.0,
    band_mm: float = 8.0,
    site_tasks: str | Sequence[str] | None = None,
) -> Federation:
    """A phantom federation of T1 images on MNI152 anatomy: a binary ``task`` (``atrophy``,
    ``lesion``), three classes (``multiclass``: healthy / atrophy / lesion) or a regression
    target (``age``: the subject's simulated age in years, which drives atrophy).

    ``n_per_site`` and ``positive_fraction`` take one value for every site or one per site
    (quantity and label skew); ``positive_fraction`` (default 0.5) is the share of diseased
    subjects, for ``multiclass`` split evenly between atrophy and lesion (the odd one to
    atrophy), and does not apply to ``age``. ``size`` defaults to 32 (2D, ``size × size`` slices) or 16
    (3D cubes). ``site_shift`` scales the scanner differences (0: identical scanners),
    ``effect`` the disease signal (0: labels carry no image information), ``variability``
    the subjects' pose and shape. ``lesion_mm`` and ``lesion_contrast`` apply to
    ``task="lesion"``; ``slice_mm`` (MNI z of the slice band) and ``band_mm`` to 2D.
    ``task="multitask"``: each site's labels are its own disease, ``site_tasks`` (``atrophy`` or
    ``lesion`` per site, cycled over the sites; default atrophy, lesion, atrophy), recorded in
    ``info["site_targets"]``; site ``k`` then draws exactly what ``task=site_tasks[k]`` draws there.
    See the module docstring for the generative model and measured difficulty.
    """
    seed = check_int("seed", seed, 0)
    n_sites = check_int("n_sites", n_sites, 1)
    dim = check_choice("dim", dim, DIMS)
    task = check_choice("task", task, TASKS)
    lesion_contrast = check_choice("lesion_contrast", lesion_contrast, LESION_CONTRASTS)
    diseases = _site_diseases(site_tasks, task, n_sites)
    if size is None:
        size = 32 if dim == "2d" else 16
    hi = 256 if dim == "2d" else 64
    size = check_int("size", size, 8, hi)
    sizes = _per_site_ints("n_per_site", n_per_site, n_sites, MIN_SITE_SAMPLES)
    if task == "age" and positive_fraction is not None:
        raise ConfigError("option 'positive_fraction' does not apply to task='age' (a regression target: the "
                          f"subjects' ages are uniform over {AGE_RANGE[0]:g}-{AGE_RANGE[1]:g} years)")
    fractions = _per_site_floats("positive_fraction", 0.5 if positive_fraction is None else positive_fraction,
                                 n_sites, 0.0, 1.0)
    site_shift = check_float("site_shift", site_shift, 0.0, 3.0)
    effect = check_float("effect", effect, 0.0, 3.0)
    variability = check_float("variability", variability, 0.0, 3.0)
    lesion_mm = check_float("lesion_mm", lesion_mm, 1.0, 30.0)
    slice_mm = check_float("slice_mm", slice_mm, -40.0, 70.0)
    band_mm = check_float("band_mm", band_mm, 0.0, 30.0)

    ndim = 2 if dim == "2d" else 3
    spacing = FOV_MM / size
    vols, to_voxel = _templates(round(spacing, 3))
    q = _grid(size, spacing, ndim)
    centre = np.array([*FOV_CENTRE_XY, slice_mm if ndim == 2 else FOV_CENTRE_Z_3D])
    bias_terms = _bias_terms(q / (FOV_MM / 2))

    sites, scanners = [], []
    for k in range(n_sites):
        scanner = _scanner(k, site_shift)
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(k,)))
        n = sizes[k]
        site_task = diseases[k]
        # task=segmentation draws task=lesion's subjects and images, and keeps the lesion as the target
        y = _site_targets(rng, "lesion" if site_task == "segmentation" else site_task, n, fractions[k])
        X, lesion = _site_images(
            rng, y, q, centre, vols, to_voxel, bias_terms, scanner,
            task=site_task, effect=effect, variability=variability, band_mm=band_mm if ndim == 2 else 0.0,
            lesion_mm=lesion_mm, lesion_contrast=lesion_contrast, size=size, ndim=ndim,
        )
        if task == "segmentation":  # the lesion drawn, as a mask on the image grid
            y = (lesion >= LESION_MASK_LEVEL).astype(np.int64)
        sites.append(Site(name=f"site-{k + 1}", X=X[:, None], y=y, task=FEDERATION_TASK.get(task, "binary")))
        scanners.append({key: (v.tolist() if isinstance(v, np.ndarray) else v) for key, v in scanner.items()})

    shape = "×".join([str(size)] * ndim)
    lesion_name = {
        "hypo": "hypointense white-matter lesion",
        "hyper": "hyperintense white-matter lesion",
        "mixed": "hypo- or hyperintense white-matter lesion",
    }[lesion_contrast]
    what = {
        "atrophy": "regional atrophy present (1) vs absent (0)",
        "lesion": f"{lesion_name} present (1) vs absent (0)",
        "multiclass": f"healthy vs regional atrophy vs {lesion_name}",
        "segmentation": f"{lesion_name} mask (lesion 1, background 0)",
        "age": f"age in years ({AGE_RANGE[0]:g}-{AGE_RANGE[1]:g}; atrophy grows with it)",
        "multitask": "each site's own disease present (1) vs absent (0): "
                     + ", ".join(f"site-{k + 1} {d}" for k, d in enumerate(diseases)),
    }[task]
    return Federation(
        name="mni-phantom",
        sites=tuple(sites),
        feature_names=("T1",),
        description=(
            f"PHANTOM on real anatomy: {sum(sizes)} simulated {dim.upper()} T1 images ({shape}) resampled from "
            f"the MNI ICBM152 2009a templates at {n_sites} simulated scanners (site_shift={site_shift}); "
            f"task: {what}, effect={effect}, seed {seed}"
        ),
        attribution=ATTRIBUTION,
        positive_label="disease" if task == "multitask" else task,
        task=FEDERATION_TASK.get(task, "binary"),
        classes=MULTICLASS_CLASSES if task == "multiclass" else SEGMENTATION_CLASSES if task == "segmentation" else (),
        task_source=f"given (--dataset-option task={task})" if task in FEDERATION_TASK else "given",
        info={
            "source": "nilearn package data: " + TEMPLATE_FILE.format("{t1,gm,wm}"),
            "phantom": True,
            "seed": seed,
            "n_sites": n_sites,
            "n_per_site": sizes,
            "positive_fraction": None if task == "age" else fractions,
            "dim": dim,
            "size": size,
            "task": task,
            "site_shift": site_shift,
            "effect": effect,
            "variability": variability,
            "lesion_mm": lesion_mm,
            "lesion_contrast": lesion_contrast,
            "slice_mm": slice_mm if ndim == 2 else None,
            "band_mm": band_mm if ndim == 2 else None,
            # 3D volumes are (z, y, x), superior first: axial slices run across spatial axis 0 (the plots' overlay)
            "axial_axis": 0 if ndim == 3 else None,
            "scanners": dict(zip([s.name for s in sites], scanners)),
            **({"site_targets": {s.name: d for s, d in zip(sites, diseases)}} if task == "multitask" else {}),
        },
    )


# --------------------------------------------------------------------------- templates


def template_folder() -> Path:
    """nilearn's bundled data folder, found without importing nilearn (a 2 s import)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the mni-phantom data set reads the MNI152 templates bundled with nilearn: "
            + missing_extra("nilearn", "it")
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    missing = [TEMPLATE_FILE.format(t) for t in ("t1", "gm", "wm") if not (folder / TEMPLATE_FILE.format(t)).is_file()]
    if missing:
        raise DataError(
            f"nilearn's data folder {folder} lacks {', '.join(missing)}; reinstall nilearn (imaging extra)"
        )
    return folder


@functools.lru_cache(maxsize=1)
def _read_templates() -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """T1, GM, WM volumes (uint8, 1 mm) and their voxel → MNI mm affine."""
    folder = template_folder()
    nibabel = import_extra("nibabel", "the mni-phantom data set")
    images = [nibabel.load(folder / TEMPLATE_FILE.format(tissue)) for tissue in ("t1", "gm", "wm")]
    return tuple(np.asarray(img.dataobj) for img in images), np.asarray(images[0].affine, dtype=np.float64)


@functools.lru_cache(maxsize=4)
def _templates(spacing: float) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """T1, GM, WM in [0, 1], low-passed for sampling at ``spacing`` mm; MNI mm → voxel affine.

    Block-averaged to about half the spacing, then Gaussian-smoothed, so that sampling the
    working grid does not alias the cortex ribbon. Kept in memory for the process (reading
    the three files costs ~0.1 s), never on disk.
    """
    from scipy import ndimage

    raw, affine = _read_templates()
    pool = max(1, int(spacing // 2))
    vols = []
    for data in raw:
        data = data.astype(np.float32) / np.float32(255.0)
        if pool > 1:
            data = np.pad(data, [(0, (-s) % pool) for s in data.shape])
            a, b, c = (s // pool for s in data.shape)
            data = data.reshape(a, pool, b, pool, c, pool).mean(axis=(1, 3, 5))
        sigma = 0.4 * spacing / pool
        vols.append(np.ascontiguousarray(ndimage.gaussian_filter(data, sigma, mode="constant")))
    to_voxel = np.linalg.inv(affine)
    # Block b covers original voxels b*pool .. b*pool + pool - 1, centred at b*pool + (pool-1)/2.
    to_voxel = np.diag([1 / pool] * 3 + [1.0]) @ np.array(
        [[1, 0, 0, -(pool - 1) / 2], [0, 1, 0, -(pool - 1) / 2], [0, 0, 1, -(pool - 1) / 2], [0, 0, 0, 1]]
    ) @ to_voxel
    return tuple(vols), to_voxel


# --------------------------------------------------------------------------- subjects


def _grid(grid_n: int, spacing: float, ndim: int) -> np.ndarray:
    """Working-grid points (P, 3) in mm around the field-of-view centre; z = 0 in 2D."""
    axis = (np.arange(grid_n) - (grid_n - 1) / 2) * spacing
    if ndim == 2:
        # Image rows run anterior → posterior and columns left → right (radiological
        # orientation is irrelevant to a model; this makes a displayed slice look upright).
        yy, xx = np.meshgrid(axis[::-1], axis, indexing="ij")
        return np.stack([xx.ravel(), yy.ravel(), np.zeros(xx.size)], axis=1)
    zz, yy, xx = np.meshgrid(axis[::-1], axis[::-1], axis, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel(), zz.ravel()], axis=1)


def _rotations(angles: np.ndarray) -> np.ndarray:
    """Rotation matrices (n, 3, 3) from (n, 3) angles (radians) about x, y, z."""
    cx, cy, cz = np.cos(angles).T
    sx, sy, sz = np.sin(angles).T
    one, zero = np.ones_like(cx), np.zeros_like(cx)
    rx = np.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], 1).reshape(-1, 3, 3)
    ry = np.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], 1).reshape(-1, 3, 3)
    rz = np.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], 1).reshape(-1, 3, 3)
    return rz @ ry @ rx


def _site_targets(rng: np.random.Generator, task: str, n: int, fraction: float) -> np.ndarray:
    """One site's targets: exactly ``round(n * fraction)`` diseased subjects in random order
    (binary 1; multiclass atrophy 1 and lesion 2, half each), or ages for ``task="age"``."""
    if task == "age":
        return rng.uniform(*AGE_RANGE, n)
    n_pos = round(n * fraction)
    if task == "multiclass":
        n_lesion = n_pos // 2
        return rng.permutation(np.r_[np.ones(n_pos - n_lesion, np.int64), np.full(n_lesion, 2, np.int64),
                                     np.zeros(n - n_pos, np.int64)])
    return rng.permutation(np.r_[np.ones(n_pos, np.int8), np.zeros(n - n_pos, np.int8)])


def _site_images(
    rng: np.random.Generator,
    y: np.ndarray,
    q: np.ndarray,
    centre: np.ndarray,
    vols: tuple[np.ndarray, ...],
    to_voxel: np.ndarray,
    bias_terms: np.ndarray,
    scanner: dict,
    *,
    task: str,
    effect: float,
    variability: float,
    band_mm: float,
    lesion_mm: float,
    lesion_contrast: str,
    size: int,
    ndim: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The images ``(n, *grid)`` and each pixel's lesion share ``blob x p_WM`` (0 without a lesion)."""
    from scipy import ndimage

    n = y.size
    v = variability
    # Subject space: the working grid, moved to this subject's slice (2D).
    qs = np.broadcast_to(q, (n, *q.shape)).copy()
    qs[:, :, 2] += rng.uniform(-band_mm, band_mm, n)[:, None]
    angles = np.deg2rad(rng.uniform(-1, 1, (n, 3)) * np.array([3.0, 3.0, 8.0]) * v)
    scale = np.exp(rng.normal(0, 0.04 * v, n))
    shift = rng.uniform(-4, 4, (n, 3)) * v
    shift[:, 2] *= ndim == 3  # in 2D the band already moves the slice
    # The site's positioning protocol: its slices (2D) or field of view (3D) sit higher or lower.
    shift[:, 2] += scanner["offset_mm"]
    rot = _rotations(angles) * scale[:, None, None]
    p = qs @ rot.transpose(0, 2, 1) + (centre + shift)[:, None, :]
    # Smooth deformation: a few random Fourier waves (~90 mm wavelength, ~2 mm amplitude).
    waves = 4
    freq = rng.normal(0, 2 * np.pi / 90.0, (n, 3, waves))
    phase = rng.uniform(0, 2 * np.pi, (n, 1, waves))
    amp = rng.normal(0, 2.0 * v / math.sqrt(waves), (n, waves, 3))
    p += np.cos(qs @ freq + phase) @ amp

    atrophy = task in ("atrophy", "multiclass", "age")
    if task == "age":
        span = (y - AGE_RANGE[0]) / (AGE_RANGE[1] - AGE_RANGE[0])
        severity = np.clip(span + rng.normal(0, AGE_SEVERITY_SD, n), 0.0, 1.0) * effect
    elif atrophy:  # class 1 is atrophy; everyone else ages normally
        lo_hi = np.where(y[:, None] == 1, [0.35, 1.0], [0.0, 0.45])
        severity = rng.uniform(lo_hi[:, 0], lo_hi[:, 1]) * effect
    if atrophy:
        # Ventricles enlarge: near their centroid the sampling radius shrinks (magnification).
        d = p - VENTRICLE_CENTRE
        r2 = (d**2).sum(-1, keepdims=True)
        p = VENTRICLE_CENTRE + d * (1 - 0.22 * severity[:, None, None] * np.exp(-r2 / (2 * VENTRICLE_RADIUS_MM**2)))

    coords = np.einsum("ij,npj->inp", to_voxel[:3, :3], p) + to_voxel[:3, 3, None, None]
    coords = coords.reshape(3, -1)
    t1, gm, wm = (
        ndimage.map_coordinates(vol, coords, order=1, mode="constant", cval=0.0, prefilter=False).reshape(n, -1)
        for vol in vols
    )

    lesion = np.zeros_like(wm)
    if atrophy:
        region = np.zeros(p.shape[:2])
        for c in ATROPHY_REGIONS:
            region += np.exp(-((p - c) ** 2).sum(-1) / (2 * ATROPHY_REGION_MM**2))
        t1 = t1 - 0.55 * severity[:, None] * np.minimum(region, 1.0) * gm * GM_CSF_CONTRAST
    lesioned = {"lesion": 1, "segmentation": 1, "multiclass": 2}.get(task)
    if lesioned is not None:
        zone = ((p - VENTRICLE_CENTRE) ** 2).sum(-1) < LESION_ZONE_MM**2
        for i in np.flatnonzero(y == lesioned):
            candidates = np.flatnonzero(zone[i] & (wm[i] > 0.7))
            if candidates.size == 0:  # an extreme pose: fall back to any white matter
                candidates = np.flatnonzero(wm[i] > 0.5)
            if candidates.size == 0:
                candidates = np.arange(wm.shape[1])
            blob = np.zeros(wm.shape[1])
            for _ in range(int(rng.integers(1, 4))):
                at = qs[i, rng.choice(candidates)]
                radius = lesion_mm * rng.uniform(0.6, 1.0)
                blob = np.maximum(blob, np.exp(-((qs[i] - at) ** 2).sum(-1) / (2 * radius**2)))
            if lesion_contrast == "mixed":
                sign = rng.choice([-1.0, 1.0])
            else:
                sign = -1.0 if lesion_contrast == "hypo" else 1.0
            lesion[i] = blob * wm[i]
            t1[i] *= 1 + sign * 0.65 * effect * rng.uniform(0.6, 1.0) * lesion[i]

    x = np.clip(t1, 0, None) * np.exp(rng.normal(0, 0.05, (n, 1)))
    # Scanner: contrast (gamma), smooth coil bias (per-subject jitter: positioning), gain.
    x = x ** scanner["gamma"]
    bias = scanner["bias_amplitude"] * (
        bias_terms @ (scanner["bias_pattern"] + rng.normal(0, 0.15, (n, bias_terms.shape[1]))).T
    ).T
    x = (x * np.exp(bias) * scanner["gain"]).reshape((n,) + (size,) * ndim)
    # Point-spread (blur) and a coarser acquisition matrix (resolution): blur, with an
    # anti-aliasing share for the matrix, sample the matrix, add noise there, reconstruct.
    matrix = max(4, round(size * scanner["resolution"]))
    sigma = math.hypot(scanner["blur_mm"] / (FOV_MM / size), 0.4 * size / matrix if matrix < size else 0.0)
    x = ndimage.gaussian_filter(x, (0,) + (sigma,) * ndim, mode="constant")
    if matrix != size:
        x = ndimage.zoom(x, (1,) + (matrix / size,) * ndim, order=1, grid_mode=True, mode="grid-constant")
    noise = scanner["noise"]
    x = np.sqrt((x + rng.normal(0, noise, x.shape)) ** 2 + rng.normal(0, noise, x.shape) ** 2)
    if matrix != size:
        x = ndimage.zoom(x, (1,) + (size / matrix,) * ndim, order=1, grid_mode=True, mode="nearest")
    return x.astype(np.float32), lesion.reshape((n,) + (size,) * ndim)


# --------------------------------------------------------------------------- scanners


def _bias_terms(qn: np.ndarray) -> np.ndarray:
    """Second-order polynomial terms (P, 9) of normalized scanner coordinates in [-1, 1]."""
    x, y, z = qn.T
    return np.stack([x, y, z, x * x - 1 / 3, y * y - 1 / 3, z * z - 1 / 3, x * y, x * z, y * z], 1)


def _scanner(k: int, site_shift: float) -> dict:
    """Site ``k``'s scanner, the same for every seed; ``site_shift`` scales every difference."""
    rng = np.random.default_rng(np.random.SeedSequence(SCANNER_SEED, spawn_key=(k,)))
    pattern = rng.normal(0, 1, 9)
    # Scale so the pattern spans [-1, 1] at most over the field of view.
    corners = np.stack(np.meshgrid(*[np.linspace(-1, 1, 5)] * 3, indexing="ij"), -1).reshape(-1, 3)
    pattern /= np.abs(_bias_terms(corners) @ pattern).max()
    s = site_shift
    return {
        "gamma": float(np.exp(s * rng.uniform(-0.25, 0.25))),
        "gain": float(np.exp(s * rng.uniform(-0.35, 0.35))),
        "bias_amplitude": float(s * rng.uniform(0.15, 0.4)),
        "bias_pattern": pattern,
        "blur_mm": float(s * rng.uniform(0.5, 6.0)),
        "resolution": float(max(0.3, 1.0 - s * rng.uniform(0.0, 0.4))),
        "noise": float(0.015 + s * rng.uniform(0.0, 0.05)),
        "offset_mm": float(s * rng.uniform(-5.0, 5.0)),
    }


# --------------------------------------------------------------------------- options


def _site_diseases(site_tasks: Any, task: str, n_sites: int) -> list[str]:
    """Each site's own phantom task: ``task``, or under ``task="multitask"`` the ``site_tasks``
    (one disease per site, a shorter list cycled over the sites)."""
    if task != "multitask":
        if site_tasks is not None:
            raise ConfigError(f"option 'site_tasks' (--dataset-option site_tasks=...) applies to task='multitask', "
                              f"not task={task!r}")
        return [task] * n_sites
    names = list(DEFAULT_SITE_TASKS if site_tasks is None else names_list(site_tasks))
    if not names or len(names) > n_sites:
        raise ConfigError(f"option 'site_tasks' (--dataset-option site_tasks=...) takes 1 to n_sites={n_sites} "
                          f"comma-separated tasks of {', '.join(SITE_TASKS)}, got {site_tasks!r}")
    names = [check_choice("site_tasks", v, SITE_TASKS) for v in names]
    return [names[k % len(names)] for k in range(n_sites)]


def _per_site(name: str, value: Any, n_sites: int) -> list[Any]:
    """One value per site from one value, a sequence, or "a,b,c" (a command-line option)."""
    if isinstance(value, str):
        value = [_number(part.strip()) for part in value.split(",")]
    if not isinstance(value, Sequence | np.ndarray):
        return [value] * n_sites
    values = list(value)
    if len(values) == 1:
        return values * n_sites
    if len(values) != n_sites:
        raise ConfigError(f"option {name!r} has {len(values)} values for n_sites={n_sites}; give one value or one per site")
    return values


def _number(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _per_site_ints(name: str, value: Any, n_sites: int, low: int) -> list[int]:
    return [check_int(name, v, low) for v in _per_site(name, value, n_sites)]


def _per_site_floats(name: str, value: Any, n_sites: int, low: float, high: float) -> list[float]:
    return [check_float(name, v, low, high) for v in _per_site(name, value, n_sites)]
