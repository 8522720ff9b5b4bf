"""The manifest: the table that names every image file, its label, its site and its split.

Every image loader (NIfTI, DICOM, 2D images, npz) and the ROI feature extractor read one.
It is a CSV or Parquet file with a row per subject; relative paths are relative to the
manifest's folder, so a data folder can move as a whole. The checks reuse the table
loader's (:mod:`medfed.data.tables`), so a manifest fails the way a feature table fails:
one line naming the file, the column and what is allowed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfed.data.tables import binary_labels, read_frame, site_values, split_values
from medfed.errors import DataError


@dataclass(frozen=True)
class Manifest:
    """The parsed manifest: absolute paths, 0/1 labels, site names, optional train mask."""

    source: Path
    paths: tuple[Path, ...]
    y: np.ndarray
    sites: tuple[str, ...]
    split: np.ndarray | None
    positive_label: str

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
) -> Manifest:
    """Read and check a manifest. Paths may point to files or (DICOM series) folders.

    Missing paths are not checked here: the loaders report them with the other bad files,
    so ``--skip-bad`` can count them too.
    """
    source = Path(path)
    frame = read_frame(source)
    for role, column in (("path", path_column), ("label", label_column), ("site", site_column),
                         ("split", split_column)):
        if column is not None and column not in frame.columns:
            raise DataError(
                f"{source}: no {role} column {column!r}; columns are {', '.join(map(str, frame.columns))}"
            )
    if len(frame) == 0:
        raise DataError(f"{source}: the manifest has no rows")
    raw_paths = frame[path_column].tolist()
    empty = [i for i, p in enumerate(raw_paths) if p is None or (isinstance(p, float) and np.isnan(p)) or not str(p).strip()]
    if empty:
        raise DataError(f"{source}: path column {path_column!r} is empty in {len(empty)} row(s), first at data row {empty[0] + 1}")
    base = source.parent
    paths = tuple(p if p.is_absolute() else (base / p) for p in (Path(str(v).strip()) for v in raw_paths))
    sites = site_values(frame[site_column], site_column, source)
    y, positive = binary_labels(frame[label_column], label_column, positive_label, source, np.array(sites))
    split = split_values(frame[split_column], split_column, source) if split_column else None
    return Manifest(source, paths, y, tuple(sites), split, positive)
