"""Embedded data sets, each loadable by name (``--dataset NAME``) without any download.

Modules are imported only when their data set is asked for, so that a run on one data set
does not pay for the libraries of another (nibabel for ``mni-phantom``).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from medfed.data.federation import Federation
from medfed.errors import ConfigError, DataError

# name -> (module, loader function, one-line description)
DATASETS: dict[str, tuple[str, str, str]] = {
    "adni-like": (
        "medfed.data.datasets.adni_like",
        "load_adni_like",
        "SYNTHETIC two-site AD vs NC cohort shaped like the survey's ADNI-1/ADNI-2 (90 AAL ROI features)",
    ),
    "heart-disease": (
        "medfed.data.datasets.heart_disease",
        "load_heart_disease",
        "real UCI Heart Disease data from four hospitals (Cleveland, Hungary, Switzerland, VA)",
    ),
    "breast-cancer": (
        "medfed.data.datasets.breast_cancer",
        "load_breast_cancer_federation",
        "real Wisconsin diagnostic breast-cancer data split into sites (IID, Dirichlet label or quantity skew)",
    ),
    "synthetic": (
        "medfed.data.datasets.synthetic",
        "load_synthetic",
        "SYNTHETIC many-site federation for scale studies (n_sites up to 1,000,000; covariate, concept, label shift)",
    ),
    "mni-phantom": (
        "medfed.data.datasets.mni_phantom",
        "load_mni_phantom",
        "PHANTOM T1 images on real MNI152 anatomy (nilearn's templates): simulated scanners, atrophy or lesion",
    ),
}


def load_dataset(name: str, **options: Any) -> Federation:
    """Load an embedded data set by name; ``options`` go to its loader (e.g. ``alpha``).

    Each loader checks its options' types and ranges before any work
    (:mod:`medfed.data.datasets.options`); a bad value is one ConfigError naming the data set,
    the option and what it takes.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    module, func, _ = DATASETS[name]
    loader = getattr(importlib.import_module(module), func)
    allowed = [p for p in inspect.signature(loader).parameters]
    unknown = [k for k in options if k not in allowed]
    if unknown:
        raise DataError(
            f"dataset {name!r} has no option {', '.join(map(repr, unknown))} (--dataset-option KEY=VALUE); "
            f"its options: {', '.join(allowed) or 'none'}"
        )
    try:
        return loader(**options)
    except ConfigError as exc:  # the loader named the option and what it takes; add which data set
        raise ConfigError(f"dataset {name!r}: {exc}") from None
