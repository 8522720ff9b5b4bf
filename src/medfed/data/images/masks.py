"""Predicted masks as files a viewer opens on top of their image.

A mask read from a NIfTI file is in RAS order (:mod:`medfed.data.images.nifti`); it is written back
in the image file's own axis order with the image file's own affine, so it overlays the image in
any viewer exactly as the image's stored voxels lie. A DICOM series' mask is a NIfTI volume in RAS
order with the series' voxel-to-mm affine (as read); a 2-D DICOM file's a 2-D NIfTI with its plane
affine where the file records one; a 2-D image's (PNG, JPEG, TIFF, BMP) a lossless PNG of the same
size, 8-bit (16-bit where a class value exceeds 255). Voxels hold the stored class values (those the
training masks held: 0 background, then e.g. 1, 4), not class indices. Bytes are reproducible: the
gzip stream carries no time stamp.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np

from medfed.data.extras import import_extra
from medfed.data.images.dicom import DICOM_SUFFIXES
from medfed.data.images.nifti import NIFTI_SUFFIXES
from medfed.data.images.planar import IMAGE_SUFFIXES


def mask_suffix(kind: str) -> str:
    """The file ending of a mask predicted for an image of ``kind`` (``ImageRows.kind``)."""
    return ".png" if kind == "image" else ".nii.gz"


def image_stem(path: Path) -> str:
    """An image's file name without its image ending (``sub-01_T1w.nii.gz`` -> ``sub-01_T1w``; a
    DICOM series folder: its name)."""
    name = path.name
    for suffix in (*NIFTI_SUFFIXES, *DICOM_SUFFIXES, *IMAGE_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return name


def mask_bytes(values: np.ndarray, kind: str, image: Path, meta: dict) -> bytes:
    """The file (:func:`mask_suffix`) of mask ``values`` (stored class values on the grid an image of
    ``kind`` was read on) predicted for ``image``, whose reader gave ``meta``."""
    values = np.asarray(values)
    dtype = np.uint8 if values.max(initial=0) <= 255 else np.uint16
    if kind == "image":
        import_extra("PIL", "writing PNG masks")
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(values.astype(dtype)).save(buf, format="PNG")
        return buf.getvalue()
    nib = import_extra("nibabel", "writing NIfTI masks")
    if kind == "nifti":
        stored = nib.load(str(image))  # the header only: voxel data is not read again
        affine = stored.affine
        # undo nibabel.as_closest_canonical: from RAS back to the file's own axis order
        back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                               nib.orientations.io_orientation(affine))
        values = nib.orientations.apply_orientation(values, back)
    else:
        affine = np.array(meta["affine"], dtype=np.float64) if meta.get("affine") is not None else np.eye(4)
    img = nib.Nifti1Image(values.astype(dtype), affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    return gzip.compress(img.to_bytes(), mtime=0)
