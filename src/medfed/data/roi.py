"""ROI features: each subject's mean image value in every region of a label atlas.

This is the survey's feature pipeline (Guan & Liu, §6.1): every MRI becomes one number per
atlas region (e.g. the 90 cerebral AAL regions' gray-matter density or volume), and the
resulting table is what ``medfed run --data`` learns from.

Resampling. Each subject image is sampled at the atlas's voxel centres (the atlas grid is
the target, as nilearn's ``NiftiLabelsMasker(resampling_target="labels")`` does), through
both images' affines, so any grid, voxel size or axis order in the same world space works.
Unlike the masker we interpolate *linearly* (``scipy.ndimage.map_coordinates``, order 1)
rather than with cubic splines, because linear interpolation

- never overshoots: a gray-matter probability stays in [0, 1], and a region mean is a
  weighted mean of the subject's own voxel values;
- is exact where it should be: on the atlas grid (or any grid whose voxel centres coincide
  with the atlas's, e.g. a flipped axis order) values are taken as they are; on a grid twice
  as fine whose voxels nest in the atlas's, each atlas voxel gets the mean of the 8 subject
  voxels it contains; and a field that is linear in world space is reproduced exactly.
  (Measured on the test's phantom, boxes of value 3-12 in a background of 100 on a grid twice
  as fine: the masker's cubic resampling is off by 4-12 per region, linear is exact.)

Where the masker fills atlas voxels outside the subject's field of view with 0 (dragging
those regions' means down), we leave them out: a region mean uses the atlas voxels the image
covers (within half a voxel of its outermost voxel centres) that hold finite values. A
region partly covered is recorded in ``df.attrs["partial"]`` and warned about; a region not
covered at all makes the subject a bad file (the image is probably not in atlas space).

Label files (``read_labels``), the formats users meet:

- plain text ``id name`` per line (the name is the rest of the line, spaces allowed);
- tab-separated ``id<TAB>name[<TAB>...]`` (JHU labels in mricron-data);
- ``id name code`` with trailing numeric columns that are ignored: the label files next to
  the atlases in Debian's ``mricron-data`` (``/usr/share/mricron/templates/aal.nii.txt``:
  ``1 Precentral_L 2001``, where the first column is the image value 1..116 and the last the
  original AAL code; ``AICHAmc.nii.txt`` likewise) and FreeSurfer-style ``id name R G B A``;
- the SPM AAL toolbox's ``ROI_MNI_V4.txt``: ``FAG<TAB>Precentral_L<TAB>2001`` (abbreviation,
  name, image value);
- a CSV/TSV table with a header naming an id column (``id``, ``index``, ``value``,
  ``label_id``, ``region_id``) and a name column (``name``, ``region``, ``region_name``,
  ``roi_name``, ``label``), or headerless ``id,name`` rows.

Blank lines and lines starting with ``#`` are ignored, and id 0 (background, e.g. JHU's
``0 Unclassified``) is dropped. Id/image mismatches: an image region the label file does not
name is an error (the label file does not describe this atlas); a labelled id that does not
occur in the image is left out with a warning (AAL3's label file names regions that are empty
in its 1 mm image, and a cropped atlas loses regions).

nibabel and pandas are imported inside the functions: this module is on no start-up path,
but the imaging packages are an optional extra.
"""

from __future__ import annotations

import csv
import os
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfed.data.extras import import_extra
from medfed.data.images.manifest import read_manifest
from medfed.data.tables import one_line, read_frame
from medfed.errors import ConfigError, DataError

STRATEGIES = ("mean", "median", "volume")
RESERVED_COLUMNS = ("site", "label", "split")
ID_HEADERS = ("id", "index", "value", "label_id", "region_id", "roi_id")
NAME_HEADERS = ("name", "region", "region_name", "roi_name", "label", "structure")
_INT = re.compile(r"^[+-]?\d+$")
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_LISTED = 8
# coordinates this close to a whole voxel index are that voxel (affine products carry ~1e-13 noise)
_ON_GRID = 1e-6


@dataclass(frozen=True)
class Atlas:
    """A label image and the regions to extract: ``label_ids[k]`` is named ``names[k]``.

    Voxels whose value is not in ``label_ids`` count as background (0, or a region that a
    ``regions`` selection left out).
    """

    img: Any
    label_ids: tuple[int, ...]
    names: tuple[str, ...]
    source: str = ""

    def select(self, regions: str | int | Iterable[int]) -> Atlas:
        """The atlas restricted to ``regions``: ``"1-90"``, ``"1-90,95"``, an id or a list of ids.

        A range keeps the atlas regions inside it; an id listed on its own must be a region.
        """
        ranges, singles = parse_regions(regions)
        present = set(self.label_ids)
        unknown = [i for i in singles if i not in present]
        if unknown:
            raise DataError(
                f"regions: id {_listing(unknown)} is not a region of atlas {self.source or '(in memory)'}; "
                f"its regions are {_id_summary(self.label_ids)}"
            )
        keep = [k for k, i in enumerate(self.label_ids)
                if i in singles or any(lo <= i <= hi for lo, hi in ranges)]
        if not keep:
            raise DataError(
                f"regions {_spec_text(regions)!r} match no region of atlas {self.source or '(in memory)'}; "
                f"its regions are {_id_summary(self.label_ids)}"
            )
        return Atlas(self.img, tuple(self.label_ids[k] for k in keep), tuple(self.names[k] for k in keep),
                     self.source)


# --------------------------------------------------------------------------- label files


def read_labels(path: str | os.PathLike) -> dict[int, str]:
    """Region names of a label file, ``{id: name}`` in file order, without background (id 0).

    See the module docstring for the formats; the format is recognised from the file's
    content (and a ``.csv``/``.tsv`` extension), never guessed per line.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"label file not found: {path}")
    if not path.is_file():
        raise DataError(f"label file {path} is not a file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # older atlas distributions are Latin-1; every byte decodes
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    if not lines:
        raise DataError(f"label file {path} names no regions (it is empty or only comments)")
    table = _table_layout(path, lines[0][1])
    entries = _table_entries(path, lines, *table) if table else _text_entries(path, lines)
    out: dict[int, str] = {}
    for n, id_text, name in entries:
        if not _INT.match(id_text):
            raise DataError(f"{path}, line {n}: region id {id_text!r} is not a whole number")
        rid = int(id_text)
        if rid < 0:
            raise DataError(f"{path}, line {n}: region id {rid} is negative; ids are whole numbers ≥ 0")
        if not name:
            raise DataError(f"{path}, line {n}: region {rid} has no name")
        if rid in out:
            raise DataError(f"{path}, line {n}: region id {rid} appears more than once")
        out[rid] = name
    out.pop(0, None)  # background
    if not out:
        raise DataError(f"label file {path} names no region besides background (id 0)")
    return out


def _table_layout(path: Path, first: str) -> tuple[str, int, int, bool] | None:
    """(delimiter, id column, name column, has header) when the file is a CSV/TSV table."""
    suffix = path.suffix.lower()
    for delim in ("\t", ",", ";") if suffix != ".csv" else (",", ";", "\t"):
        fields = [f.strip().lower() for f in next(csv.reader([first], delimiter=delim))]
        if len(fields) < 2:
            continue
        ids = [i for i, f in enumerate(fields) if f in ID_HEADERS]
        names = [i for i, f in enumerate(fields) if f in NAME_HEADERS and (not ids or i != ids[0])]
        if ids and names:
            return delim, ids[0], names[0], True
    if suffix in (".csv", ".tsv") or re.match(r"^\d+\s*,", first):
        delim = "\t" if suffix == ".tsv" else ","
        fields = next(csv.reader([first], delimiter=delim))
        if len(fields) >= 2 and _INT.match(fields[0].strip()):
            return delim, 0, 1, False
        raise DataError(
            f"{path}: a label table needs an id and a name column; the header is {first!r}, and "
            f"allowed column names are {', '.join(ID_HEADERS)} (id) and {', '.join(NAME_HEADERS)} (name)"
        )
    return None


def _table_entries(path, lines, delim, id_col, name_col, header):
    rows = csv.reader([line for _, line in lines], delimiter=delim)
    entries = []
    for (n, _), fields in zip(lines, rows):
        if header and n == lines[0][0]:
            continue
        if len(fields) <= max(id_col, name_col):
            raise DataError(f"{path}, line {n}: expected an id and a name, got {delim.join(fields)!r}")
        entries.append((n, fields[id_col].strip(), fields[name_col].strip()))
    return entries


def _text_entries(path, lines):
    rows = [(n, line.split("\t") if "\t" in line else line.split()) for n, line in lines]
    rows = [(n, [f.strip() for f in fields if f.strip()]) for n, fields in rows]
    width = {len(f) for _, f in rows}
    if len(width) == 1 and width.pop() >= 3:
        # every line "id name numbers..." (mricron .nii.txt, FreeSurfer LUT): the numbers are codes/colours
        if all(_INT.match(f[0]) and all(_NUMBER.match(x) for x in f[2:]) for _, f in rows):
            return [(n, f[0], f[1]) for n, f in rows]
        # every line "abbreviation name id" (SPM AAL toolbox ROI_MNI_V4.txt): the image value comes last
        if all(not _INT.match(f[0]) and _INT.match(f[2]) for _, f in rows) and all(len(f) == 3 for _, f in rows):
            return [(n, f[2], f[1]) for n, f in rows]
    entries = []
    for n, line in lines:
        if "\t" in line:
            fields = [f.strip() for f in line.split("\t")]
            entries.append((n, fields[0], fields[1] if len(fields) > 1 else ""))
        else:
            parts = line.split(None, 1)
            entries.append((n, parts[0], parts[1].strip() if len(parts) > 1 else ""))
    return entries


# --------------------------------------------------------------------------- atlas


def read_atlas(path: str | os.PathLike, labels: str | os.PathLike | None = None) -> Atlas:
    """Read a 3-D integer label image (0 = background) and, optionally, its label file.

    Without a label file the regions are named ``region_<id>``. Raises :class:`DataError`
    for a missing or unreadable file, a non-3-D image, non-integer or negative values, an
    image without regions, and image regions the label file does not name; labelled ids
    absent from the image are dropped with a warning.
    """
    path = Path(path)
    img = _load_image(path, "atlas")
    data = _volume_data(img, path, "atlas")
    finite = np.isfinite(data)
    if not finite.all():
        raise DataError(f"atlas {path} holds {int((~finite).sum())} NaN or infinite voxels; a label image "
                        "holds whole-number region ids")
    fractional = data != np.round(data)
    if fractional.any():
        example = float(data[fractional][0])
        raise DataError(
            f"atlas {path} holds non-integer values (e.g. {example:g} in {int(fractional.sum())} voxels); a "
            "label image holds whole-number region ids (probabilistic or interpolated atlases are not label images)"
        )
    if data.min() < 0:
        raise DataError(f"atlas {path} holds negative values (e.g. {data.min():g}); region ids are ≥ 0, 0 = background")
    ids = [int(i) for i in np.unique(data) if i != 0]
    if not ids:
        raise DataError(f"atlas {path} holds no region: every voxel is 0 (background)")
    if labels is None:
        return Atlas(img, tuple(ids), tuple(f"region_{i}" for i in ids), str(path))
    names = read_labels(labels)
    unnamed = [i for i in ids if i not in names]
    if unnamed:
        raise DataError(
            f"label file {labels} names no region for {len(unnamed)} of the {len(ids)} region ids in atlas {path} "
            f"({_listing(unnamed)}); is it this atlas's label file?"
        )
    absent = [i for i in names if i not in set(ids)]
    if absent:
        warnings.warn(
            f"label file {labels} names {len(absent)} region(s) that do not occur in atlas {path}; "
            f"they are left out: {_listing([f'{i} {names[i]}' for i in absent])}",
            UserWarning,
            stacklevel=2,
        )
    kept = [i for i in names if i in set(ids)]  # label-file order, which is the atlas's documented order
    named = [names[i] for i in kept]
    dup = sorted({n for n in named if named.count(n) > 1})
    if dup:
        raise DataError(f"label file {labels}: region name {_listing(dup)} is used for more than one id; "
                        "column names must be unique")
    return Atlas(img, tuple(kept), tuple(named), str(path))


def parse_regions(spec: str | int | Iterable[int]) -> tuple[list[tuple[int, int]], set[int]]:
    """``"1-90,95"`` → ([(1, 90)], {95}); an int or a list of ints → ([], ids)."""
    if isinstance(spec, (bool, np.bool_)):
        raise ConfigError(f"regions takes ids and ranges like '1-90,95', got {spec!r}")
    if isinstance(spec, (int, np.integer)):
        return [], {int(spec)}
    if isinstance(spec, str):
        ranges, singles = [], set()
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        if not parts:
            raise ConfigError("regions is empty; give ids and ranges like '1-90,95'")
        for part in parts:
            m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
            if m:
                lo, hi = int(m.group(1)), int(m.group(2))
                if lo > hi:
                    raise ConfigError(f"regions: range {part!r} runs backwards; write it low-high")
                ranges.append((lo, hi))
            elif _INT.match(part) and int(part) >= 0:
                singles.add(int(part))
            else:
                raise ConfigError(f"regions takes ids and ranges like '1-90,95', got {part!r} in {spec!r}")
        return ranges, singles
    try:
        items = list(spec)
    except TypeError:
        raise ConfigError(f"regions takes ids and ranges like '1-90,95' or a list of ids, got {spec!r}") from None
    bad = [i for i in items if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer))]
    if bad or not items:
        raise ConfigError(f"regions must be whole-number ids, got {bad[0]!r}" if bad else "regions is an empty list")
    return [], {int(i) for i in items}


# --------------------------------------------------------------------------- images


def _load_image(path: Path, role: str):
    nib = import_extra("nibabel", "reading images for ROI features")

    if not path.exists():
        raise DataError(f"{role} {path}: not found")
    if path.is_dir():
        raise DataError(f"{role} {path}: is a folder (a DICOM series?); ROI features need one NIfTI volume "
                        "per file (convert DICOM series to NIfTI first, e.g. with dcm2niix)")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # noqa: BLE001 - nibabel, gzip and zlib raise many types for one cause: unreadable
        raise DataError(f"{role} {path}: cannot be read as a NIfTI/Analyze/MGH image ({one_line(exc)})") from None
    if not isinstance(img, nib.spatialimages.SpatialImage):
        raise DataError(f"{role} {path}: is a {type(img).__name__}, not a volume image")
    return img


def _volume_data(img, path: Path, role: str) -> np.ndarray:
    """The image's values as a float64 3-D array (header scaling applied)."""
    shape = tuple(int(s) for s in img.shape)
    spatial = shape[:3]
    if len(shape) < 3 or any(s != 1 for s in shape[3:]):
        extra = f" ({shape[3]} volumes)" if len(shape) >= 4 else ""
        raise DataError(f"{role} {path}: is a {len(shape)}-D image of shape {shape}{extra}; allowed: one 3-D volume "
                        "(a 4-D file holding one volume is accepted)")
    try:
        data = np.asarray(img.get_fdata(dtype=np.float64)).reshape(spatial)
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt data fails here, in many ways
        raise DataError(f"{role} {path}: voxel data cannot be read ({one_line(exc)})") from None
    affine = img.affine
    if affine is None or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(f"{role} {path}: has no usable voxel-to-world affine, so its voxels cannot be placed "
                        "in the atlas's space")
    return data


class _AtlasGrid:
    """What every subject shares: the atlas voxels of the selected regions in world space."""

    def __init__(self, atlas: Atlas):
        labels = np.asarray(atlas.img.get_fdata(dtype=np.float64)).reshape(atlas.img.shape[:3]).astype(np.int64)
        # region index k of each voxel, in the atlas's (label-file) order; -1 = background or not selected
        lookup = np.full(int(labels.max()) + 1, -1, dtype=np.intp)
        lookup[list(atlas.label_ids)] = np.arange(len(atlas.label_ids))
        index = lookup[labels]
        ijk = np.nonzero(index >= 0)  # three index arrays, (3, N) in effect
        self.region = index[ijk]
        self.n_regions = len(atlas.label_ids)
        self.voxels = np.bincount(self.region, minlength=self.n_regions)
        affine = np.asarray(atlas.img.affine, dtype=np.float64)
        # (3, N) voxel centres in mm; axis-first so the per-subject products run over long rows
        self.world = affine[:3, :3] @ np.array(ijk, dtype=np.float64) + affine[:3, 3:]
        self.voxel_volume = abs(float(np.linalg.det(affine[:3, :3])))  # mm³

    def extract(self, data: np.ndarray, affine: np.ndarray, strategy: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-region value and covered fraction of the region's atlas voxels."""
        from scipy import ndimage

        inverse = np.linalg.inv(np.asarray(affine, dtype=np.float64))
        coords = inverse[:3, :3] @ self.world + inverse[:3, 3:]  # (3, N) subject voxel coordinates
        shape = np.array(data.shape)[:, None]
        inside = ((coords >= -0.5 - _ON_GRID) & (coords <= shape - 0.5 + _ON_GRID)).all(axis=0)
        finite = np.isfinite(data)
        rounded = np.rint(coords)
        if np.abs(coords - rounded).max(initial=0.0) < _ON_GRID:
            # voxel centres coincide (same grid, flipped or shifted axes): take the values as they are
            idx = np.clip(rounded.astype(np.intp), 0, shape - 1)
            values = data[tuple(idx)]
            valid = inside & np.isfinite(values)
        elif finite.all():
            values = ndimage.map_coordinates(data, coords, order=1, mode="nearest")
            valid = inside
        else:
            # NaN-masked images: interpolate the finite voxels only; a sample touching a NaN voxel
            # with non-zero weight is not covered (a zero-weight NaN neighbour must not spoil it)
            values = ndimage.map_coordinates(np.where(finite, data, 0.0), coords, order=1, mode="nearest")
            weight = ndimage.map_coordinates(finite.astype(np.float64), coords, order=1, mode="nearest")
            valid = inside & (weight > 1.0 - 1e-9)
        region = self.region[valid]
        values = values[valid]
        covered = np.bincount(region, minlength=self.n_regions)
        with np.errstate(invalid="ignore", divide="ignore"):
            if strategy == "median":
                out = np.full(self.n_regions, np.nan)
                hit = np.flatnonzero(covered)
                if hit.size:
                    out[hit] = ndimage.median(values, labels=region + 1, index=hit + 1)
            else:
                sums = np.bincount(region, weights=values, minlength=self.n_regions)
                out = sums * self.voxel_volume if strategy == "volume" else sums / covered
        return out, covered / self.voxels


# --------------------------------------------------------------------------- the table


def extract_roi_features(
    manifest_path: str | os.PathLike,
    atlas_path: str | os.PathLike | Atlas,
    *,
    labels: str | os.PathLike | None = None,
    regions: str | int | Sequence[int] | None = None,
    path_column: str = "path",
    label_column: str = "label",
    site_column: str = "site",
    split_column: str | None = None,
    positive_label: Any = None,
    strategy: str = "mean",
    skip_bad: bool = False,
    progress: Callable[[str], None] | None = None,
):
    """One row per manifest subject: ``site``, ``label`` (the manifest's values), ``split``
    (``train``/``test``, if ``split_column``), then one column per atlas region.

    ``strategy``: ``"mean"`` (mean value over the region's covered atlas voxels), ``"median"``,
    or ``"volume"`` (sum over covered voxels × atlas voxel volume in mm³: a gray-matter
    probability map gives gray-matter volume). Each row's index is the image path
    (``df.index.name == "path"``), so it travels in Parquet without becoming a feature column.

    A bad subject image (missing, unreadable, not 3-D, not covering some region) raises one
    :class:`DataError` naming the file (all missing files at once), or with ``skip_bad`` is
    left out and listed in ``df.attrs["skipped"]`` (``path``, ``row``, ``site``, ``reason``).
    ``df.attrs["partial"]`` maps each image that covers a region only partly to
    ``{region name: covered fraction}``. ``progress(label)`` is called as each subject starts.
    """
    import pandas as pd

    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if not isinstance(skip_bad, bool):
        raise ConfigError(f"skip_bad must be true or false, got {skip_bad!r}")
    manifest = read_manifest(manifest_path, path_column=path_column, label_column=label_column,
                             site_column=site_column, split_column=split_column, positive_label=positive_label)
    raw_labels = _original_labels(read_frame(manifest.source)[label_column])
    if isinstance(atlas_path, Atlas):
        if labels is not None:
            raise ConfigError("labels names a label file for an atlas path; an Atlas already has its names")
        atlas = atlas_path
    else:
        atlas = read_atlas(atlas_path, labels)
    if regions is not None:
        atlas = atlas.select(regions)
    clash = [n for n in atlas.names if n in RESERVED_COLUMNS]
    if clash:
        raise DataError(f"atlas region name {_listing(clash)} collides with the table's "
                        f"{'/'.join(RESERVED_COLUMNS)} columns; rename it in the label file")
    grid = _AtlasGrid(atlas)

    missing = [i for i, p in enumerate(manifest.paths) if not p.exists()]
    if missing and not skip_bad:
        first = manifest.paths[missing[0]]
        raise DataError(
            f"{manifest.source}: {len(missing)} subject image(s) not found: {_listing([str(manifest.paths[i]) for i in missing], 3)} "
            f"(first at data row {missing[0] + 1}: {first}); fix the paths or pass --skip-bad (skip_bad=True) to leave them out"
        )

    kept, rows, skipped, partial = [], [], [], {}
    for i, path in enumerate(manifest.paths):
        if progress is not None:
            progress(path.name)
        try:
            img = _load_image(path, "subject image")
            data = _volume_data(img, path, "subject image")
            values, coverage = grid.extract(data, img.affine, strategy)
            empty = np.flatnonzero(coverage == 0)
            if empty.size:
                raise DataError(
                    f"subject image {path}: covers none of region {_listing([atlas.names[k] for k in empty], 3)} "
                    f"({empty.size} of {grid.n_regions} regions); is the image registered to the atlas's space?"
                )
        except DataError as exc:
            if not skip_bad:
                raise DataError(f"{exc} (manifest {manifest.source}, data row {i + 1})") from None
            skipped.append({"path": str(path), "row": i + 1, "site": manifest.sites[i], "reason": str(exc)})
            continue
        short = coverage < 1.0
        if short.any():
            partial[str(path)] = {atlas.names[k]: round(float(coverage[k]), 4) for k in np.flatnonzero(short)}
        kept.append(i)
        rows.append(values)
    if not kept:
        raise DataError(f"{manifest.source}: every subject image was bad ({len(skipped)} skipped); "
                        f"first: {skipped[0]['reason']}")
    if partial:
        warnings.warn(
            f"{len(partial)} subject image(s) do not cover every region fully (e.g. {next(iter(partial))}); their "
            "region values use the covered voxels only (see df.attrs['partial'])",
            UserWarning,
            stacklevel=2,
        )
    take = np.array(kept)
    columns: dict[str, Any] = {
        "site": [manifest.sites[i] for i in kept],
        "label": raw_labels[take],
    }
    if manifest.split is not None:
        columns["split"] = np.where(manifest.split[take], "train", "test")
    features = np.vstack(rows)
    for k, name in enumerate(atlas.names):
        columns[name] = features[:, k]
    df = pd.DataFrame(columns, index=pd.Index([str(manifest.paths[i]) for i in kept], name="path"))
    df.attrs = {
        "manifest": str(manifest.source),
        "atlas": atlas.source,
        "labels": None if labels is None else str(labels),
        "strategy": strategy,
        "region_ids": [int(i) for i in atlas.label_ids],
        "positive_label": manifest.positive_label,
        "skipped": skipped,
        "partial": partial,
    }
    return df


def _original_labels(col) -> np.ndarray:
    """The label column as the manifest holds it: numbers as numbers (CSV text "1" → 1), text trimmed."""
    import pandas as pd

    if pd.api.types.is_numeric_dtype(col.dtype) or pd.api.types.is_bool_dtype(col.dtype):
        return col.to_numpy()
    text = col.astype(str).str.strip()
    try:
        numbers = pd.to_numeric(text)
    except (ValueError, TypeError):
        return text.to_numpy(dtype=object)
    values = numbers.to_numpy()
    if np.all(np.isfinite(values)) and np.all(values == np.round(values)):
        return values.astype(np.int64)
    return values


# --------------------------------------------------------------------------- messages


def _listing(items: Sequence[Any], limit: int = _LISTED) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _id_summary(ids: Sequence[int]) -> str:
    return f"{len(ids)} ids from {min(ids)} to {max(ids)}" if len(ids) > _LISTED else ", ".join(map(str, ids))


def _spec_text(spec: Any) -> str:
    return spec if isinstance(spec, str) else str(list(spec) if not isinstance(spec, (int, np.integer)) else spec)




__all__ = ["STRATEGIES", "Atlas", "extract_roi_features", "parse_regions", "read_atlas", "read_labels"]
