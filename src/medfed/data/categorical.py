"""One-hot encoding of string columns, with the levels a repeat may use taken from training rows.

:func:`medfed.data.tables.load_table` (``--categorical a,b``) writes one indicator column per
level found in the file, named ``column=level``, so a run keeps one feature space whatever its
splits. The levels a model may *use* are decided per repeat, after the split
(:func:`medfed.experiments.harness.prepare_repeat` calls :func:`training_levels` and
:func:`keep_training_levels`): a column's levels are the union over the federation's sites of
the levels their **training** rows hold. In a deployment that union is a setup exchange of
level *names* (never of rows). Every other level's indicator is 0 in that repeat's training
and test rows, so a test row whose level no site trained on is encoded as all-zero indicators
("none of the known levels"), the same as if the column had never existed, and is counted per
site and column (:func:`unseen_level_notes`) so the report says how often that happened.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CategoricalColumn:
    """A one-hot encoded column: its indicators are ``X[:, start:start + len(levels)]``."""

    name: str
    levels: tuple[str, ...]  # every level in the file, sorted, so row order does not matter
    start: int

    @property
    def indicators(self) -> slice:
        return slice(self.start, self.start + len(self.levels))

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f"{self.name}={level}" for level in self.levels)


def one_hot(values: Sequence[str], levels: Sequence[str]) -> np.ndarray:
    """``(n, len(levels))`` 0/1 indicators of ``values``; every value must be one of ``levels``."""
    index = {level: j for j, level in enumerate(levels)}
    out = np.zeros((len(values), len(levels)))
    out[np.arange(len(values)), [index[v] for v in values]] = 1.0
    return out


def training_levels(columns: Sequence[CategoricalColumn], trains: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Per column, which levels (a boolean mask over ``levels``) occur in any site's training rows.

    ``trains`` are the sites' training feature matrices; only this union of level names would
    cross the network.
    """
    return {
        c.name: np.logical_or.reduce([X[:, c.indicators].any(axis=0) for X in trains])
        for c in columns
    }


def keep_training_levels(
    X_test: np.ndarray, columns: Sequence[CategoricalColumn], known: dict[str, np.ndarray]
) -> tuple[np.ndarray, dict[str, dict[str, int]]]:
    """A site's test rows with the indicators of levels outside ``known`` set to 0.

    Training rows need nothing: ``known`` includes the levels of every site's training rows.
    Returns the test matrix (a copy when something changed) and, per column, the test rows
    whose level was unseen in training (``{column: {level: rows}}``, only columns with such rows).
    """
    unseen: dict[str, dict[str, int]] = {}
    out = X_test
    for c in columns:
        unknown = np.flatnonzero(~known[c.name])
        counts = X_test[:, c.start + unknown].sum(axis=0).astype(int)
        if not counts.any():
            continue
        unseen[c.name] = {c.levels[j]: int(n) for j, n in zip(unknown, counts) if n}
        if out is X_test:
            out = X_test.copy()
        out[:, c.start + unknown] = 0.0
    return out, unseen


def unseen_level_notes(per_repeat: Sequence[dict[str, dict[str, dict[str, int]]]], repeats: int) -> list[str]:
    """One note per column: per site, how many test rows had a level no training row held.

    ``per_repeat[r]`` maps site -> column -> level -> rows (what :func:`keep_training_levels`
    reported for each site in repeat ``r``).
    """
    # column -> site -> [rows, repeats affected, levels]
    table: dict[str, dict[str, list]] = {}
    for by_site in per_repeat:
        for site, by_column in by_site.items():
            for column, levels in by_column.items():
                entry = table.setdefault(column, {}).setdefault(site, [0, 0, {}])
                entry[0] += sum(levels.values())
                entry[1] += 1
                for level in levels:
                    entry[2][level] = None
    notes = []
    for column, by_site in table.items():
        parts = [
            f"site {site!r}: {rows} row(s) in {n} of {repeats} repeat(s) "
            f"({', '.join(repr(level) for level in levels)})"
            for site, (rows, n, levels) in by_site.items()
        ]
        notes.append(
            f"categorical column {column!r}: test rows with a level that no site's training rows held "
            f"were encoded as all-zero indicators: {'; '.join(parts)}"
        )
    return notes
