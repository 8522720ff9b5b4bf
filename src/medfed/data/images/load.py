"""The entry point for image files: a manifest in, a federation of image sites out.

:func:`load_image_manifest` reads the manifest (:mod:`medfed.data.images.manifest`), picks a
reader per row (NIfTI, DICOM series or file, 2-D image), reads every file and checks that
all of them share one shape, which a federation needs. Each bad file (missing, unreadable,
wrong dimensionality, odd shape, mixed DICOM series, not an image) is one
:class:`~medfed.errors.DataError` naming the manifest row and the file; with
``skip_bad=True`` bad files are left out instead and listed in ``info["skipped"]``.

With a mask column the federation's task is ``segmentation``: each row's mask file is read by the
reader its path picks, exactly as an image (NIfTI reoriented to RAS, DICOM series sorted, 2-D files
as stored), and must lie on its image's grid: one channel, the same spatial shape and, where both
files record them, the same voxel size and voxel-to-mm affine (NIfTI; DICOM series, and 2-D DICOM files with
ImageOrientationPatient/ImagePositionPatient: orientation, spacing and origin); otherwise the row is bad (an error naming both files). Mask
values must be whole numbers >= 0; the distinct stored values, 0 (background) first, become the
classes, named by their stored value (``background``, ``1``, ``4`` for masks holding 0/1/4): the
network's K outputs are the values present, not ``max + 1`` (a 0/255 PNG mask is two classes).

The readers import nibabel, pydicom and Pillow when they run, never at import time: the
command line's cold start must not pay for the imaging extra.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfed.data.federation import (
    MIN_SITE_SAMPLES,
    Federation,
    SingleClassSiteWarning,
    Site,
)
from medfed.data.images.manifest import Manifest, read_manifest, read_manifest_paths
from medfed.errors import ConfigError, DataError

KINDS = ("auto", "nifti", "dicom", "image")
# What a manifest row can be, after "auto" or "dicom" has looked at the path.
_FORMAT_NAMES = {
    "nifti": "a NIfTI volume",
    "dicom-series": "a DICOM series folder",
    "dicom-file": "a 2-D DICOM file",
    "image": "a 2-D image",
}
_SHORT_NAMES = {"nifti": "NIfTI volumes", "dicom-series": "DICOM series volumes",
                "dicom-file": "2-D DICOM images", "image": "2-D images"}


class BadImageFile(DataError):
    """One image file (or DICOM folder) that cannot be used, and why.

    Readers raise it; :func:`load_image_manifest` adds the manifest row, or, with
    ``skip_bad``, records ``path`` and ``reason`` and goes on.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")



def load_image_manifest(
    path: str | os.PathLike,
    *,
    path_column: str = "path",
    label_column: str = "label",
    site_column: str = "site",
    split_column: str | None = None,
    positive_label: Any = None,
    kind: str = "auto",
    skip_bad: bool = False,
    name: str | None = None,
    mask_column: str | None = None,
    unlabeled_value: str | None = None,
) -> Federation:
    """Load the images a manifest lists into a federation, one site per site-column value.

    ``kind`` is ``"nifti"`` (3-D volumes), ``"dicom"`` (a folder is a series → volume, a file
    is a 2-D image), ``"image"`` (PNG/JPEG/TIFF/BMP) or ``"auto"``: by path, ``.nii``/``.nii.gz``
    are NIfTI, a folder is a DICOM series, ``.dcm``/``.dicom`` a 2-D DICOM file and
    ``.png``/``.jpg``/``.jpeg``/``.tif``/``.tiff``/``.bmp`` 2-D images; a manifest that mixes
    these is refused (name ``kind="dicom"`` for DICOM files without an extension).

    Samples are float32 ``(n, C, H, W)`` for 2-D images and ``(n, 1, X, Y, Z)`` for volumes,
    whose spatial axes run in RAS order (left→Right, posterior→Anterior,
    inferior→Superior). Sites keep the manifest's order; ``split`` comes from
    ``split_column``. ``info`` summarises each site's voxel sizes, stored dtypes, bit depths
    and conversions, and lists skipped files.

    With ``skip_bad`` unusable files are skipped; files whose shape differs from the
    majority shape (ties: the shape met first) are skipped as bad. Skipping that leaves a
    site with fewer than 10 images, or a predefined split without train or test rows, is
    an error that says so; skipping that leaves a site with one class warns.

    ``mask_column`` names each image's mask file (module docstring): the task is then
    segmentation and the label column is not read; an empty mask cell (or ``unlabeled_value``)
    is an unlabeled image, its mask a placeholder of zeros.
    """
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
    if not isinstance(skip_bad, bool):
        raise ConfigError(f"skip_bad must be true or false, got {skip_bad!r}")
    manifest = read_manifest(
        path,
        path_column=path_column,
        label_column=label_column,
        site_column=site_column,
        split_column=split_column,
        positive_label=positive_label,
        mask_column=mask_column,
        unlabeled_value=unlabeled_value,
    )
    n = len(manifest.paths)
    formats = [_format_of(p, kind) for p in manifest.paths]
    fmt = _one_format(manifest, formats)

    arrays: dict[int, np.ndarray] = {}
    metas: dict[int, dict] = {}
    bad: dict[int, str] = {}

    def reject(row: int, err: BadImageFile) -> None:
        if not skip_bad:
            raise DataError(f"{_where(manifest, row)}: {err}") from None
        bad[row] = str(err) if err.path != manifest.paths[row] else err.reason

    masks: dict[int, np.ndarray] = {}
    for row in range(n):
        try:
            arrays[row], metas[row] = _read(manifest.paths[row], formats[row])
            if manifest.masks is not None and manifest.masks[row] is None:  # an unlabeled image: a placeholder
                masks[row] = np.zeros(arrays[row].shape[1:], dtype=np.int64)
            elif manifest.masks is not None:
                mask = manifest.masks[row]
                masks[row] = _on_grid(mask, *_read(mask, _format_of(mask, kind)), manifest.paths[row], arrays[row],
                                      metas[row])
        except BadImageFile as err:
            arrays.pop(row, None)
            metas.pop(row, None)
            reject(row, err)

    if not arrays:
        raise DataError(
            f"{manifest.source}: none of the {n} files could be used; first: "
            f"{manifest.paths[min(bad)]}: {bad[min(bad)]}"
        )
    shapes = Counter(a.shape for a in arrays.values())
    # the most common shape wins; among equally common ones, the one met first
    first_seen = {}
    for row in sorted(arrays):
        first_seen.setdefault(arrays[row].shape, row)
    majority = max(shapes, key=lambda s: (shapes[s], -first_seen[s]))
    for row in sorted(arrays):
        shape = arrays[row].shape
        if shape != majority:
            err = BadImageFile(
                manifest.paths[row],
                f"has shape {_shape_text(shape, fmt)}, while {shapes[majority]} of the {len(arrays)} "
                f"readable images have {_shape_text(majority, fmt)}; allowed: one shape for all images "
                "of a federation (resample or crop them to a common grid first)",
            )
            reject(row, err)
            del arrays[row], metas[row]
    channels = _channels(fmt, metas)
    if manifest.masks is not None:
        values = np.unique(np.concatenate([[0], *(np.unique(masks[r]) for r in arrays)]))
        classes = ("background", *(str(int(v)) for v in values[1:]))
        targets = {r: np.searchsorted(values, masks[r]) for r in arrays}
    else:
        classes, targets = (), {r: manifest.y[r] for r in arrays}
    sites = _build_sites(manifest, arrays, targets, bad)
    skipped = [
        {"path": str(manifest.paths[r]), "row": r + 1, "site": manifest.sites[r], "reason": bad[r]}
        for r in sorted(bad)
    ]
    info = {
        "source": str(manifest.source),
        "kind": fmt,
        "orientation": "RAS" if fmt in ("nifti", "dicom-series") else "as stored (row 0 at the top)",
        "path_column": path_column,
        "label_column": label_column,
        "site_column": site_column,
        "split_column": split_column,
        **({"mask_column": mask_column, "mask_values": {c: int(v) for c, v in zip(classes, values)}}
           if manifest.masks is not None else {}),
        "sites": {s.name: _site_summary(manifest, s.name, metas) for s in sites},
        "skipped": skipped,
        "n_skipped": len(skipped),
    }
    kept = sum(s.n for s in sites)
    description = (
        f"{_SHORT_NAMES[fmt]} from manifest {manifest.source.name}: {kept} at "
        f"{len(sites)} sites, shape {_shape_text(majority, fmt)}"
    )
    if skipped:
        description += f"; {len(skipped)} bad files skipped"
    return Federation(
        name=name or manifest.source.stem,
        sites=tuple(sites),
        feature_names=channels,
        description=description,
        positive_label=manifest.positive_label,
        info=info,
        task="segmentation" if manifest.masks is not None else "binary",
        classes=classes,
    )


# --------------------------------------------------------------------------- formats


def _format_of(path: Path, kind: str) -> str | None:
    """Which reader a row needs; None when ``auto`` cannot tell (not an image path)."""
    from medfed.data.images.dicom import DICOM_SUFFIXES
    from medfed.data.images.nifti import NIFTI_SUFFIXES
    from medfed.data.images.planar import IMAGE_SUFFIXES

    if kind == "nifti":
        return "nifti"
    if kind == "image":
        return "image"
    if kind == "dicom":
        return "dicom-series" if path.is_dir() else "dicom-file"
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if path.is_dir():
        return "dicom-series"
    if name.endswith(DICOM_SUFFIXES):
        return "dicom-file"
    if name.endswith(IMAGE_SUFFIXES):
        return "image"
    return None


def _one_format(manifest: Manifest, formats: list[str | None]) -> str:
    """The manifest's one format; mixing formats is a manifest error, not a bad file."""
    first_row: dict[str, int] = {}
    for row, f in enumerate(formats):
        if f is not None:
            first_row.setdefault(f, row)
    if len(first_row) > 1:
        (a, ra), (b, rb) = list(first_row.items())[:2]
        raise DataError(
            f"{manifest.source}: the manifest mixes image kinds: data row {ra + 1} "
            f"({manifest.paths[ra].name}) is {_FORMAT_NAMES[a]}, data row {rb + 1} "
            f"({manifest.paths[rb].name}) is {_FORMAT_NAMES[b]}; allowed: one kind per manifest"
        )
    if not first_row:
        raise DataError(
            f"{manifest.source}: no row names an image file (first: {manifest.paths[0].name}); "
            f"{_ALLOWED_PATHS}"
        )
    return next(iter(first_row))


_ALLOWED_PATHS = (
    "allowed: .nii/.nii.gz (NIfTI), a folder of DICOM slices, .dcm/.dicom (2-D DICOM), "
    ".png/.jpg/.jpeg/.tif/.tiff/.bmp (2-D images), or name kind='dicom' for DICOM files "
    "without an extension"
)


def _read(path: Path, fmt: str | None) -> tuple[np.ndarray, dict]:
    # readers import this module (for BadImageFile), so they are imported here, not at the top
    if fmt is None:
        if not path.exists():
            raise BadImageFile(path, "not found")
        raise BadImageFile(path, f"is not an image file type; {_ALLOWED_PATHS}")
    if fmt == "nifti":
        from medfed.data.images.nifti import read_nifti

        return read_nifti(path)
    if fmt == "dicom-series":
        from medfed.data.images.dicom import read_dicom_series

        return read_dicom_series(path)
    if fmt == "dicom-file":
        from medfed.data.images.dicom import read_dicom_file

        return read_dicom_file(path)
    from medfed.data.images.planar import read_planar

    return read_planar(path)


def _channels(fmt: str, metas: dict[int, dict]) -> tuple[str, ...]:
    if fmt == "image":
        # shapes agree by now, so channel counts do too; names follow the first image
        return tuple(metas[min(metas)]["channels"])
    return ("gray",) if fmt == "dicom-file" else ("intensity",)


# --------------------------------------------------------------------------- sites


def _on_grid(path: Path, mask: np.ndarray, meta: dict, image_path: Path, image: np.ndarray,
             image_meta: dict) -> np.ndarray:
    """The mask read from ``path`` as integer labels on its image's grid, or why it is not."""
    against = f"its image {image_path}"
    if mask.shape[0] != 1:
        raise BadImageFile(path, f"is a mask with {mask.shape[0]} channels; "
                                 f"allowed: one channel of labels, on the grid of {against}")
    if mask.shape[1:] != image.shape[1:]:
        raise BadImageFile(path, f"is a mask of spatial shape {'×'.join(map(str, mask.shape[1:]))} while {against} "
                                 f"has {'×'.join(map(str, image.shape[1:]))}; allowed: a mask on its image's grid "
                                 "(resample it with nearest-neighbour interpolation)")
    size, image_size = meta.get("voxel_size"), image_meta.get("voxel_size")
    if size is not None and image_size is not None and not np.allclose(size, image_size, rtol=1e-3, atol=0):
        raise BadImageFile(path, f"is a mask with voxel size {tuple(size)} mm while {against} has "
                                 f"{tuple(image_size)} mm; allowed: a mask on its image's grid")
    affine, image_affine = meta.get("affine"), image_meta.get("affine")
    if affine is not None and image_affine is not None and not np.allclose(affine, image_affine, rtol=0, atol=1e-3):
        raise BadImageFile(path, f"is a mask whose voxel-to-mm affine {np.round(affine, 3).tolist()} differs from "
                                 f"{against}'s {np.round(image_affine, 3).tolist()}; allowed: a mask on its image's grid")
    labels = mask[0]
    if not (labels == np.round(labels)).all() or labels.min() < 0:
        odd = labels[(labels != np.round(labels)) | (labels < 0)]
        raise BadImageFile(path, f"is a mask holding {odd.size} values that are not class labels (first: "
                                 f"{float(odd[0])}); allowed: whole numbers >= 0 (an interpolated mask? resample "
                                 "masks with nearest-neighbour interpolation)")
    return labels.astype(np.int64)


def _build_sites(manifest: Manifest, arrays: dict[int, np.ndarray], targets: dict[int, np.ndarray],
                 bad: dict[int, str]) -> list[Site]:
    """One site per site name; ``targets`` holds each kept row's label, or its mask's class indices."""
    segmentation = manifest.masks is not None
    sites = []
    y_kept = []
    for site in manifest.site_names:
        rows = manifest.rows_of(site)
        keep = [int(r) for r in rows if int(r) in arrays]
        dropped = [int(r) for r in rows if int(r) in bad]
        because = ""
        if dropped:
            first = dropped[0]
            because = (
                f" after skipping {len(dropped)} of its {len(rows)} files as bad "
                f"(first: {manifest.paths[first].name}: {bad[first]})"
            )
        if len(keep) < MIN_SITE_SAMPLES:
            raise DataError(
                f"{manifest.source}: site {site!r} has {len(keep)} usable images{because}; every site "
                f"needs at least {MIN_SITE_SAMPLES} for a train/test split (fix the files, or merge or "
                "drop the site)"
            )
        y = np.stack([targets[r] for r in keep]) if segmentation else manifest.y[keep]
        split = None if manifest.split is None else manifest.split[keep]
        if split is not None and (split.all() or not split.any()):
            raise DataError(
                f"{manifest.source}: site {site!r} has no {'test' if split.all() else 'train'} rows "
                f"left{because}; every site needs both train and test rows"
            )
        if not segmentation and dropped and len(np.unique(y)) == 1 and len(np.unique(manifest.y[rows])) == 2:
            warnings.warn(
                f"site {site!r} holds one class only{because}",
                SingleClassSiteWarning,
                stacklevel=3,
            )
        X = np.stack([arrays[r] for r in keep])
        unlabeled = None if manifest.unlabeled is None else manifest.unlabeled[keep]
        try:
            sites.append(Site(site, X, y, split, task="segmentation" if segmentation else "binary", unlabeled=unlabeled))
        except DataError as exc:  # too few labeled images left after skipping bad files
            raise DataError(f"{manifest.source}: {exc}{because}") from None
        y_kept.append(y.ravel() if unlabeled is None else y[~unlabeled])
    y_all = np.concatenate(y_kept)
    if segmentation:
        if not y_all.any():
            raise DataError(f"{manifest.source}: every {'kept ' if bad else ''}mask is background (0) only; "
                            "a segmentation task needs some labelled pixels")
    elif y_all.all() or not y_all.any():
        raise DataError(
            f"{manifest.source}: after skipping {len(bad)} bad files every remaining image is "
            f"{'positive' if y_all.all() else 'negative'}; both classes are needed"
        )
    return sites


def _site_summary(manifest: Manifest, site: str, metas: dict[int, dict]) -> dict:
    """Distinct voxel sizes, dtypes, bit depths and orientations at a site, with counts."""
    rows = [int(r) for r in manifest.rows_of(site) if int(r) in metas]
    summary: dict[str, Any] = {"n": len(rows)}
    for key, label in (("voxel_size", "voxel_sizes"), ("dtype", "dtypes"), ("bit_depth", "bit_depths"),
                       ("original_orientation", "original_orientations"), ("photometric", "photometric")):
        values = Counter(_jsonable(metas[r].get(key)) for r in rows if metas[r].get(key) is not None)
        if values:
            summary[label] = [{"value": list(v) if isinstance(v, tuple) else v, "count": c}
                              for v, c in values.most_common()]
    notes = Counter(note for r in rows for note in metas[r].get("notes", ()))
    if notes:
        summary["notes"] = dict(notes)
    return summary


def _jsonable(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _where(manifest: Manifest, row: int) -> str:
    return f"{manifest.source}, data row {row + 1} (site {manifest.sites[row]!r})"


def _shape_text(shape: tuple[int, ...], fmt: str) -> str:
    axes = "C, X, Y, Z" if len(shape) == 4 else "C, H, W"
    return f"{'×'.join(map(str, shape))} ({axes})"


# --------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class ImageRows:
    """The images a scoring manifest lists, read as :func:`load_image_manifest` reads a run's
    (:func:`read_image_rows`): one format, every file on the model's sample shape."""

    source: Path
    paths: tuple[Path, ...]
    kind: str  # nifti, dicom-series, dicom-file or image (the reader each row went through)
    X: np.ndarray  # (n, C, *spatial) float32, as a site holds its images
    metas: tuple[dict, ...]  # each image's reader metadata (affine, voxel size, ...)
    masks: np.ndarray | None  # (n, *spatial) stored mask values (with a mask column), on their images' grids


def read_image_rows(
    path: str | os.PathLike,
    *,
    sample_shape: tuple[int, ...],
    path_column: str = "path",
    mask_column: str | None = None,
    kind: str = "auto",
    model: str = "the model",
) -> ImageRows:
    """Read the images (and masks) a manifest lists for scoring: the same readers, orientation
    and mask-on-grid checks as a run's manifest; no site, label or split column is read. Every
    image must have ``sample_shape`` (``model`` names the model file in that error); a bad file
    is one :class:`DataError` naming the manifest row and the file (no skipping: every listed
    image gets its prediction or the command fails)."""
    if kind not in KINDS:
        raise ConfigError(f"--kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
    source, paths, mask_paths = read_manifest_paths(path, path_column=path_column, mask_column=mask_column)
    manifest = Manifest(source, paths, None, (), None, "1", mask_paths)
    formats = [_format_of(p, kind) for p in paths]
    fmt = _one_format(manifest, formats)
    arrays, metas, masks = [], [], []
    for row, image_path in enumerate(paths):
        try:
            array, meta = _read(image_path, formats[row])
            if array.shape != tuple(sample_shape):
                raise BadImageFile(image_path, f"has shape {_shape_text(array.shape, fmt)}, while {model} takes "
                                               f"{_shape_text(tuple(sample_shape), fmt)}; allowed: images on the grid "
                                               "the model was trained on (resample or crop them first)")
            if mask_paths is not None:
                mask = mask_paths[row]
                masks.append(_on_grid(mask, *_read(mask, _format_of(mask, kind)), image_path, array, meta))
        except BadImageFile as err:
            raise DataError(f"{source}, data row {row + 1}: {err}") from None
        arrays.append(array)
        metas.append(meta)
    return ImageRows(source, paths, fmt, np.stack(arrays).astype(np.float32, copy=False), tuple(metas),
                     np.stack(masks) if mask_paths is not None else None)
