"""Wisconsin Diagnostic Breast Cancer, split into simulated sites.

One pooled data set, so the sites are made by :mod:`medfed.data.partition`: ``"iid"`` for
the optimistic baseline, ``"dirichlet"`` for label skew controlled by ``alpha`` (up to the data's
limit of 56 sites of 10 rows: where no draw gives every site 10 rows, the fewest rows are moved
to the small sites, and the description and ``info["rows_moved"]`` say how many),
``"quantity"`` for unequal site sizes (Dirichlet(``alpha``) shares) with the class mix kept. The data
ship with medfed (``files/breast-cancer-wisconsin``: scikit-learn's bundled CSV, byte for byte,
with its provenance), read with the standard library and numpy: importing scikit-learn to read
it cost about 70 % of a default ``medfed run --dataset breast-cancer`` and 150 MB.
"""

from __future__ import annotations

from importlib.resources import files

import numpy as np

from medfed.data.datasets.options import check_choice, check_float, check_int
from medfed.data.federation import MIN_SITE_SAMPLES, Federation, Site
from medfed.data.partition import (
    dirichlet_label_split,
    iid_partition,
    quantity_skew_partition,
)
from medfed.errors import ConfigError, DataError

PARTITIONS = ("iid", "dirichlet", "quantity")
POSITIVE_LABEL = "malignant"
ATTRIBUTION = (
    "W. H. Wolberg, W. N. Street and O. L. Mangasarian (1995), Breast Cancer Wisconsin "
    "(Diagnostic), UCI Machine Learning Repository, CC BY 4.0; the copy bundled with scikit-learn."
)
DATA_FILE = "breast_cancer.csv"
_MEASURES = ("radius", "texture", "perimeter", "area", "smoothness", "compactness", "concavity", "concave points",
             "symmetry", "fractal dimension")
# the columns of DATA_FILE, in order (scikit-learn's load_breast_cancer().feature_names)
FEATURES = (*(f"mean {m}" for m in _MEASURES), *(f"{m} error" for m in _MEASURES), *(f"worst {m}" for m in _MEASURES))


def read_breast_cancer() -> tuple[np.ndarray, np.ndarray]:
    """The 569 x 30 features (float64) and the file's target codes (0 malignant, 1 benign), parsed
    as scikit-learn parses the same file (``float`` of each field), so the numbers are its own."""
    text = (files("medfed.data.datasets") / "files" / "breast-cancer-wisconsin" / DATA_FILE).read_text("ascii")
    header, *lines = text.splitlines()
    n_rows, n_features = (int(v) for v in header.split(",")[:2])
    rows = [line.split(",") for line in lines if line]
    if len(rows) != n_rows or any(len(r) != n_features + 1 for r in rows):  # a damaged install, named
        raise DataError(f"{DATA_FILE}: expected {n_rows} rows of {n_features + 1} fields; the packaged file is damaged")
    X = np.array([[float(v) for v in r[:-1]] for r in rows], dtype=np.float64)
    return X, np.array([int(r[-1]) for r in rows])


def load_breast_cancer_federation(
    n_sites: int = 3, partition: str = "dirichlet", alpha: float = 0.5, seed: int = 0
) -> Federation:
    """569 tumours (212 malignant) dealt to ``n_sites`` sites named ``site-1`` .. ``site-K``.

    Malignant is the positive class (the file, like scikit-learn, codes it 0, so y = 1 - target) because a
    missed malignancy is the error that matters and metrics such as sensitivity should be
    about it. ``alpha`` is used by the Dirichlet partition only (``info`` records ``None``
    for ``"iid"``); every site gets at least 10 rows, enough for a train/test split.
    """
    partition = check_choice("partition", partition, PARTITIONS)
    n_sites = check_int("n_sites", n_sites, 1)
    alpha = check_float("alpha", alpha, 0.0, low_open=True)
    seed = check_int("seed", seed, 0)

    X, target = read_breast_cancer()
    y = (1 - target).astype(np.int8)
    if n_sites * MIN_SITE_SAMPLES > y.size:
        raise ConfigError(
            f"option 'n_sites' (--dataset-option n_sites=...): {n_sites} is too many for {y.size} samples; at most "
            f"{y.size // MIN_SITE_SAMPLES} sites keep {MIN_SITE_SAMPLES} rows each (a site needs {MIN_SITE_SAMPLES} rows for "
            "its train/test split)"
        )
    moved = 0
    if partition == "iid":
        parts = iid_partition(y, n_sites, seed)
    elif partition == "quantity":
        parts = quantity_skew_partition(y, n_sites, seed, alpha=alpha, min_size=MIN_SITE_SAMPLES)
    else:
        split = dirichlet_label_split(y, n_sites, alpha, seed, min_size=MIN_SITE_SAMPLES, top_up=True)
        parts, moved = split.parts, split.moved
    sites = tuple(Site(name=f"site-{k + 1}", X=X[idx], y=y[idx]) for k, idx in enumerate(parts))
    how = {"iid": "IID", "dirichlet": f"Dirichlet label skew, alpha={alpha}",
           "quantity": f"quantity skew, Dirichlet alpha={alpha}"}[partition]
    topped = (f"; no Dirichlet draw gave every site {MIN_SITE_SAMPLES} rows, so {moved} rows were moved from the "
              "largest sites to the smallest") if moved else ""
    return Federation(
        name="breast-cancer",
        sites=sites,
        feature_names=FEATURES,
        description=(
            f"Breast Cancer Wisconsin (Diagnostic), {y.size} tumours split into {n_sites} "
            f"simulated sites ({how}, seed {seed}{topped}); positive class: malignant"
        ),
        attribution=ATTRIBUTION,
        positive_label=POSITIVE_LABEL,
        impute=None,
        info={
            "source": "embedded: medfed/data/datasets/files/breast-cancer-wisconsin (scikit-learn's bundled copy)",
            "n_sites": int(n_sites),
            "partition": partition,
            "alpha": float(alpha) if partition != "iid" else None,
            "rows_moved": moved,  # Dirichlet: rows moved to bring every site to the minimum (0: as drawn)
            "seed": seed,
        },
    )
