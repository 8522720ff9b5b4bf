"""Client selection: which sites take part in a round."""

from __future__ import annotations

import math

import numpy as np

from medfed.errors import ConfigError
from medfed.rng import KeyedRng


def cohort_size(n_sites: int, fraction: float, min_sites: int) -> int:
    """How many sites a round selects: ``max(min_sites, ceil(fraction * n_sites))``, at most all."""
    return min(n_sites, max(min_sites, math.ceil(fraction * n_sites - 1e-12)))


def select_sites(n_sites: int, fraction: float, min_sites: int, rng: KeyedRng) -> np.ndarray:
    """Indices (sorted) of the sites chosen uniformly without replacement for one round.

    ``max(min_sites, ceil(fraction * n_sites))`` sites are chosen; with every site chosen no
    random number is drawn, so full participation costs nothing.
    """
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"fraction_fit must be in (0, 1], got {fraction}")
    if not 1 <= min_sites <= n_sites:
        raise ConfigError(f"min_sites must be between 1 and the number of sites ({n_sites}), got {min_sites}")
    k = cohort_size(n_sites, fraction, min_sites)
    if k >= n_sites:
        return np.arange(n_sites)
    return np.sort(rng.generator.choice(n_sites, size=k, replace=False))
