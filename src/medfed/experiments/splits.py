"""Train/test splits per site: stratified and seeded, or the data's predefined split."""

from __future__ import annotations

import numpy as np


def stratified_split(y: np.ndarray, test_fraction: float, generator: np.random.Generator) -> np.ndarray:
    """Boolean training mask holding out ``test_fraction`` of each class.

    Each class with at least two rows keeps at least one row on each side, so small
    classes are not lost from either set.
    """
    train = np.ones(y.shape[0], dtype=bool)
    for cls in np.unique(y):
        rows = np.flatnonzero(y == cls)
        n_test = int(round(test_fraction * rows.size))
        if rows.size >= 2:
            n_test = min(max(n_test, 1), rows.size - 1)
        else:
            n_test = 0
        train[generator.permutation(rows)[:n_test]] = False
    return train


def kept_labels(y: np.ndarray, fraction: float, generator: np.random.Generator) -> np.ndarray:
    """Boolean mask keeping the labels of ``round(fraction * size)`` rows of each class (stratum)
    of ``y``, drawn by ``generator``; the others' labels are hidden. Unlike
    :func:`stratified_split` no class is kept on both sides: at 1% labels a small class may lose
    every label, which is what such a study measures."""
    keep = np.zeros(y.shape[0], dtype=bool)
    for cls in np.unique(y):
        rows = np.flatnonzero(y == cls)
        keep[generator.permutation(rows)[:int(round(fraction * rows.size))]] = True
    return keep
