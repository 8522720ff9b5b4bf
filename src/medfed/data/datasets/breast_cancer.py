"""Wisconsin Diagnostic Breast Cancer, split into simulated sites.

One pooled data set, so the sites are made by :mod:`medfed.data.partition`: ``"iid"`` for
the optimistic baseline, ``"dirichlet"`` for label skew controlled by ``alpha``,
``"quantity"`` for unequal site sizes (Dirichlet(``alpha``) shares) with the class mix kept. The data
come bundled with scikit-learn, so nothing is downloaded; scikit-learn is imported only
when this data set is loaded.
"""

from __future__ import annotations

import numpy as np

from medfed.data.datasets.options import check_choice, check_float, check_int
from medfed.data.federation import MIN_SITE_SAMPLES, Federation, Site
from medfed.data.partition import (
    dirichlet_label_partition,
    iid_partition,
    quantity_skew_partition,
)
from medfed.errors import ConfigError

PARTITIONS = ("iid", "dirichlet", "quantity")
POSITIVE_LABEL = "malignant"
ATTRIBUTION = (
    "W. H. Wolberg, W. N. Street and O. L. Mangasarian (1995), Breast Cancer Wisconsin "
    "(Diagnostic), UCI Machine Learning Repository, CC BY 4.0; loaded via scikit-learn."
)


def load_breast_cancer_federation(
    n_sites: int = 3, partition: str = "dirichlet", alpha: float = 0.5, seed: int = 0
) -> Federation:
    """569 tumours (212 malignant) dealt to ``n_sites`` sites named ``site-1`` .. ``site-K``.

    Malignant is the positive class (scikit-learn codes it 0, so y = 1 - target) because a
    missed malignancy is the error that matters and metrics such as sensitivity should be
    about it. ``alpha`` is used by the Dirichlet partition only (``info`` records ``None``
    for ``"iid"``); every site gets at least 10 rows, enough for a train/test split.
    """
    partition = check_choice("partition", partition, PARTITIONS)
    n_sites = check_int("n_sites", n_sites, 1)
    alpha = check_float("alpha", alpha, 0.0, low_open=True)
    seed = check_int("seed", seed, 0)

    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    X = np.asarray(data.data, dtype=np.float64)
    y = (1 - np.asarray(data.target)).astype(np.int8)
    if n_sites * MIN_SITE_SAMPLES > y.size:
        raise ConfigError(
            f"option 'n_sites' (--dataset-option n_sites=...): {n_sites} is too many for {y.size} samples; at most "
            f"{y.size // MIN_SITE_SAMPLES} sites keep {MIN_SITE_SAMPLES} rows each"
        )
    if partition == "iid":
        parts = iid_partition(y, n_sites, seed)
    elif partition == "quantity":
        parts = quantity_skew_partition(y, n_sites, seed, alpha=alpha, min_size=MIN_SITE_SAMPLES)
    else:
        parts = dirichlet_label_partition(y, n_sites, alpha, seed, min_size=MIN_SITE_SAMPLES)
    sites = tuple(Site(name=f"site-{k + 1}", X=X[idx], y=y[idx]) for k, idx in enumerate(parts))
    how = {"iid": "IID", "dirichlet": f"Dirichlet label skew, alpha={alpha}",
           "quantity": f"quantity skew, Dirichlet alpha={alpha}"}[partition]
    return Federation(
        name="breast-cancer",
        sites=sites,
        feature_names=tuple(str(f) for f in data.feature_names),
        description=(
            f"Breast Cancer Wisconsin (Diagnostic), {y.size} tumours split into {n_sites} "
            f"simulated sites ({how}, seed {seed}); positive class: malignant"
        ),
        attribution=ATTRIBUTION,
        positive_label=POSITIVE_LABEL,
        impute=None,
        info={
            "source": "scikit-learn sklearn.datasets.load_breast_cancer (bundled)",
            "n_sites": int(n_sites),
            "partition": partition,
            "alpha": float(alpha) if partition != "iid" else None,
            "seed": seed,
        },
    )
