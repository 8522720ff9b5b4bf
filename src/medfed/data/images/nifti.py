"""NIfTI volumes via nibabel, reoriented to RAS so every site's voxels mean the same thing.

Scanners and converters store volumes in many axis orders (LPS, LAS, sagittal-first ...).
A model that sees one site's brains upside down relative to another's learns the storage
convention, not the anatomy, so every volume is turned to the closest canonical (RAS)
orientation with :func:`nibabel.as_closest_canonical`: array axis 0 runs left→Right, axis 1
posterior→Anterior, axis 2 inferior→Superior. This is a permutation/flip of axes, never an
interpolation, so voxel values are untouched. Voxel sizes are reported in the new axis order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medfed.data.extras import import_extra
from medfed.data.images.load import BadImageFile
from medfed.data.tables import one_line

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ALLOWED = "a 3-D volume (a 4-D file holding one volume is accepted)"


def read_nifti(path: str | Path) -> tuple[np.ndarray, dict]:
    """Read one NIfTI file as a float32 ``(1, X, Y, Z)`` array in RAS order, plus metadata.

    The metadata holds ``voxel_size`` (mm, in RAS axis order), ``dtype`` (the stored data
    type), ``orientation`` ("RAS"), ``original_orientation`` (e.g. "LPS"), ``affine`` (voxel to
    mm of the returned array) and ``notes``.
    Scaling in the header (``scl_slope``/``scl_inter``) is applied, as nibabel does for any
    reader of the file. Raises :class:`BadImageFile` for anything that is not a 3-D volume.
    """
    nib = import_extra("nibabel", "reading NIfTI files")

    path = Path(path)
    _check_exists(path)
    try:
        img = nib.load(str(path))
    except Exception as exc:  # noqa: BLE001 - nibabel, gzip and zlib raise many types for one cause: unreadable
        raise BadImageFile(path, f"cannot be read as NIfTI ({one_line(exc)})") from None
    if not isinstance(img, nib.spatialimages.SpatialImage):
        raise BadImageFile(path, f"is a {type(img).__name__}, not a NIfTI image; allowed: {ALLOWED}")
    notes = []
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        # a single-volume time series is a volume; squeezing keeps the affine's meaning
        img = img.slicer[..., 0]
        notes.append("4-D file with one volume read as 3-D")
    elif len(shape) != 3:
        what = f"{len(shape)}-D image of shape {shape}"
        if len(shape) == 4:
            what += f" ({shape[3]} volumes)"
        elif len(shape) == 2:
            what += " (a single slice)"
        raise BadImageFile(path, f"is a {what}; allowed: {ALLOWED}")
    spatial = tuple(int(s) for s in img.shape)
    if min(spatial) == 1:
        raise BadImageFile(path, f"is a single slice of shape {spatial}; allowed: {ALLOWED}")
    original = "".join(nib.aff2axcodes(img.affine))
    try:
        img = nib.as_closest_canonical(img)
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as exc:  # noqa: BLE001 - a reader library fails in many ways; the user needs one line
        raise BadImageFile(path, f"voxel data cannot be read ({one_line(exc)})") from None
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise BadImageFile(path, f"holds {bad} NaN or infinite voxels; allowed: finite values only")
    zooms = tuple(round(float(z), 4) for z in img.header.get_zooms()[:3])
    meta = {
        "voxel_size": zooms,
        "dtype": str(img.get_data_dtype()),
        "orientation": "RAS",
        "original_orientation": original,
        # voxel -> mm of the RAS array: what a mask must share to lie on this volume's grid
        "affine": tuple(tuple(round(float(v), 4) for v in row) for row in img.affine),
        "notes": notes,
    }
    return data[None], meta


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise BadImageFile(path, "not found")
    if path.is_dir():
        raise BadImageFile(path, "is a folder; allowed: a .nii or .nii.gz file")
