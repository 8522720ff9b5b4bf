"""The manifest: the table that names every image file, its label, its site and its split.

Every image loader (NIfTI, DICOM, 2D images, npz) and the ROI feature extractor read one.
It is a CSV or Parquet file with a row per subject; relative paths are relative to the
manifest's folder, so a data folder can move as a whole. The checks reuse the table
loader's (:mod:`medfed.data.tables`), so a manifest fails the way a feature table fails:
one line naming the file, the column and what is allowed.

A segmentation manifest names each image's mask in a mask column (``mask_column``); it needs
no label column: the masks are the targets (:mod:`medfed.data.images.load` reads them). An
empty mask cell (or one holding ``unlabeled_value``) makes its image an unlabeled one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfed.data.tables import binary_labels, read_frame, site_values, sites_without_labels, split_values, unlabeled_rows
from medfed.errors import DataError


@dataclass(frozen=True)
class Manifest:
    """The parsed manifest: absolute paths, 0/1 labels (None when masks are the targets), site
    names, optional train mask, and each image's mask file for a segmentation manifest."""

    source: Path
    paths: tuple[Path, ...]
    y: np.ndarray | None
    sites: tuple[str, ...]
    split: np.ndarray | None
    positive_label: str
    masks: tuple[Path | None, ...] | None = None  # None for an unlabeled image's empty mask cell
    unlabeled: np.ndarray | None = None  # True for a row whose label (mask) cell is empty or the unlabeled value

    @property
    def site_names(self) -> list[str]:
        """Sites in order of first appearance."""
        return list(dict.fromkeys(self.sites))

    def rows_of(self, site: str) -> np.ndarray:
        return np.flatnonzero(np.array(self.sites) == site)


def read_manifest(
    path: str | os.PathLike,
    *,
    path_column: str = "path",
    label_column: str = "label",
    site_column: str = "site",
    split_column: str | None = None,
    positive_label: Any = None,
    mask_column: str | None = None,
    unlabeled_value: str | None = None,
) -> Manifest:
    """Read and check a manifest. Paths may point to files or (DICOM series) folders.

    With ``mask_column`` each row also names its image's mask file and the label column is
    not read (a segmentation manifest need not have one). A row whose label cell (mask cell, for
    a segmentation manifest) is empty or holds ``unlabeled_value`` is an unlabeled image
    (``Site.unlabeled``), as in :func:`medfed.data.tables.load_table`; its label is a placeholder 0
    (its mask path None).

    Missing paths are not checked here: the loaders report them with the other bad files,
    so ``--skip-bad`` can count them too.
    """
    source = Path(path)
    frame = read_frame(source)
    for role, column in (("path", path_column), ("label", None if mask_column else label_column),
                         ("site", site_column), ("split", split_column), ("mask", mask_column)):
        if column is not None and column not in frame.columns:
            raise DataError(
                f"{source}: no {role} column {column!r}; columns are {', '.join(map(str, frame.columns))}"
            )
    if len(frame) == 0:
        raise DataError(f"{source}: the manifest has no rows")
    paths = _paths(frame[path_column].tolist(), "path", path_column, source)
    sites = site_values(frame[site_column], site_column, source)
    site_arr = np.array(sites, dtype=object)
    target_column = mask_column or label_column
    unlabeled = unlabeled_rows(frame[target_column], unlabeled_value)
    lacking = sites_without_labels(unlabeled, site_arr, list(dict.fromkeys(sites)), target_column, unlabeled_value)
    if lacking:
        raise DataError(f"{source}: {lacking}")
    masks = None
    if mask_column:
        given = iter(_paths(frame[mask_column][~unlabeled].tolist(), "mask", mask_column, source))
        masks = tuple(None if u else next(given) for u in unlabeled)
        y, positive = None, "1"
    else:
        known, positive = binary_labels(frame[label_column][~unlabeled].reset_index(drop=True), label_column,
                                        positive_label, source, site_arr[~unlabeled])
        y = np.zeros(len(frame), dtype=known.dtype)
        y[~unlabeled] = known
    split = split_values(frame[split_column], split_column, source) if split_column else None
    return Manifest(source, paths, y, tuple(sites), split, positive, masks,
                    unlabeled if unlabeled.any() else None)


def read_manifest_paths(path: str | os.PathLike, *, path_column: str = "path",
                        mask_column: str | None = None) -> tuple[Path, tuple[Path, ...], tuple[Path, ...] | None]:
    """A scoring manifest's file paths and, with ``mask_column``, its mask paths, checked and
    resolved as :func:`read_manifest` does; the other columns are not read."""
    source = Path(path)
    frame = read_frame(source)
    for role, column in (("path", path_column), ("mask", mask_column)):
        if column is not None and column not in frame.columns:
            raise DataError(f"{source}: no {role} column {column!r}; columns are {', '.join(map(str, frame.columns))}")
    if len(frame) == 0:
        raise DataError(f"{source}: the manifest has no rows")
    paths = _paths(frame[path_column].tolist(), "path", path_column, source)
    return source, paths, _paths(frame[mask_column].tolist(), "mask", mask_column, source) if mask_column else None


def _paths(raw: list, role: str, column: str, source: Path) -> tuple[Path, ...]:
    """A column of file paths, relative ones resolved against the manifest's folder."""
    empty = [i for i, p in enumerate(raw) if p is None or (isinstance(p, float) and np.isnan(p)) or not str(p).strip()]
    if empty:
        raise DataError(f"{source}: {role} column {column!r} is empty in {len(empty)} row(s), first at data row {empty[0] + 1}")
    base = source.parent
    return tuple(p if p.is_absolute() else (base / p) for p in (Path(str(v).strip()) for v in raw))
