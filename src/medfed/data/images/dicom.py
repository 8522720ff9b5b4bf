"""DICOM via pydicom: a folder holding one series is a volume, a single file is a 2-D image.

Slice order comes from geometry, never from file names or InstanceNumber (both are
unreliable across vendors and anonymizers): each slice's ImagePositionPatient is projected
on the slice normal, the cross product of the two ImageOrientationPatient direction
cosines, and slices are sorted along it. The volume is then given the affine that DICOM's
patient coordinates (LPS) imply and turned to RAS with nibabel, exactly as NIfTI volumes
are (:mod:`medfed.data.images.nifti`), so DICOM and NIfTI sites line up voxel for voxel.

Stored values become physical ones through the modality LUT (RescaleSlope and
RescaleIntercept, per slice: vendors may vary them between slices), e.g. Hounsfield units
for CT. Grayscale only (SamplesPerPixel 1); MONOCHROME1 images are not inverted (the
photometric interpretation is recorded so a mixed federation is visible).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from medfed.data.extras import import_extra
from medfed.data.images.load import BadImageFile
from medfed.data.tables import one_line

DICOM_SUFFIXES = (".dcm", ".dicom")
# Files a DICOM export puts next to the slices that are not slices.
_NOT_SLICES = {"dicomdir", "thumbs.db", "desktop.ini"}
# Slices of one series share their orientation up to rounding in the header text.
_ORIENTATION_TOL = 1e-4
# Relative tolerance on the distance between neighbouring slices before we call it a gap.
_SPACING_TOL = 0.01


def read_dicom_series(folder: str | Path) -> tuple[np.ndarray, dict]:
    """Read a folder holding one DICOM series as a float32 ``(1, X, Y, Z)`` volume in RAS order.

    Every file in the folder (hidden files and DICOMDIR excepted) must be a slice of the same
    series (one SeriesInstanceUID) with the same Rows, Columns and ImageOrientationPatient;
    slices must be evenly spaced (an uneven step means a missing slice). The metadata holds
    ``voxel_size`` (mm, RAS order), ``dtype`` (stored integer type), ``bit_depth`` (BitsStored),
    ``photometric``, ``orientation`` ("RAS"), ``affine`` (voxel to RAS mm), ``n_slices`` and ``notes``.
    """
    folder = Path(folder)
    if not folder.exists():
        raise BadImageFile(folder, "not found")
    if not folder.is_dir():
        raise BadImageFile(folder, "is a file; allowed: a folder holding the slices of one DICOM series")
    files = sorted(f for f in folder.iterdir()
                   if f.is_file() and not f.name.startswith(".") and f.name.lower() not in _NOT_SLICES)
    if not files:
        raise BadImageFile(folder, "holds no files; allowed: a folder holding the slices of one DICOM series")
    slices = [_read(f, series_file=True) for f in files]

    series = Counter(str(ds.get("SeriesInstanceUID", "(none)")) for ds in slices)
    if len(series) > 1:
        examples = []
        for uid, count in series.most_common():
            first = next(f.name for f, ds in zip(files, slices) if str(ds.get("SeriesInstanceUID", "(none)")) == uid)
            examples.append(f"{uid} ({count} files, e.g. {first})")
        raise BadImageFile(
            folder,
            f"mixes {len(series)} DICOM series: {'; '.join(examples)}; allowed: one series per "
            "subject folder (move each series to its own folder)",
        )
    if len(slices) < 2:
        raise BadImageFile(
            folder,
            "holds a single slice; a series folder needs at least 2 (list a 2-D DICOM file itself "
            "in the manifest to use it as a 2-D image)",
        )

    first = slices[0]
    for f, ds in zip(files, slices):
        _check_grayscale(folder, f"slice {f.name} ", ds)
        if (ds.Rows, ds.Columns) != (first.Rows, first.Columns):
            raise BadImageFile(
                folder,
                f"slice {f.name} has {ds.Rows}×{ds.Columns} pixels, slice {files[0].name} has "
                f"{first.Rows}×{first.Columns}; allowed: one size for every slice of a series",
            )
    orientation = _orientation(files[0], first)
    for f, ds in zip(files[1:], slices[1:]):
        if np.abs(_orientation(f, ds) - orientation).max() > _ORIENTATION_TOL:
            raise BadImageFile(
                folder,
                f"slice {f.name} has another ImageOrientationPatient than slice {files[0].name}; "
                "allowed: one orientation for every slice of a series",
            )
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    positions = np.array([_position(f, ds) for f, ds in zip(files, slices)])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    files = [files[i] for i in order]
    slices = [slices[i] for i in order]
    steps = np.diff(along)
    if (steps < 1e-6).any():
        i = int(np.argmax(steps < 1e-6))
        raise BadImageFile(
            folder,
            f"slices {files[i].name} and {files[i + 1].name} lie at the same position; allowed: "
            "one slice per position (a folder with repeated acquisitions holds several volumes)",
        )
    step = float(np.median(steps))
    if steps.max() - steps.min() > _SPACING_TOL * step:
        raise BadImageFile(
            folder,
            f"slice spacing is uneven ({steps.min():.4g} to {steps.max():.4g} mm along the slice "
            "normal), so a slice is probably missing; allowed: evenly spaced slices",
        )

    decoded = [_pixels(folder, f"slice {f.name}: ", ds) for f, ds in zip(files, slices)]
    pixels = np.stack([values for values, _ in decoded])  # (slice, row, col)
    spacing = _pixel_spacing(files[0], first)
    # DICOM: pixel (r, c) of a slice at position P lies at P + c*dc*row_dir + r*dr*col_dir (LPS)
    affine = np.eye(4)
    affine[:3, 0] = row_dir * spacing[1]
    affine[:3, 1] = col_dir * spacing[0]
    affine[:3, 2] = (positions[-1] - positions[0]) / (len(slices) - 1)
    affine[:3, 3] = positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # LPS -> RAS world coordinates

    nib = import_extra("nibabel", "assembling a DICOM series into a volume")
    img = nib.as_closest_canonical(nib.Nifti1Image(pixels.transpose(2, 1, 0), affine))
    data = np.asarray(img.dataobj, dtype=np.float32)
    meta = {
        "voxel_size": tuple(round(float(v), 4) for v in nib.affines.voxel_sizes(img.affine)),
        # voxel -> mm of the RAS array (orientation, spacing, origin): what a mask must share, as for NIfTI
        "affine": _rounded(img.affine),
        "dtype": decoded[0][1],
        "bit_depth": int(first.get("BitsStored", first.get("BitsAllocated", 0))),
        "photometric": str(first.get("PhotometricInterpretation", "")),
        "orientation": "RAS",
        "original_orientation": "".join(nib.aff2axcodes(affine)),
        "n_slices": len(slices),
        "notes": [],
    }
    return data[None], meta


def read_dicom_file(path: str | Path) -> tuple[np.ndarray, dict]:
    """Read one single-frame grayscale DICOM file as a float32 ``(1, H, W)`` 2-D image.

    Pixels stay in stored row/column order (row 0 at the top, as displayed); the modality
    LUT (slope/intercept) is applied. Metadata: ``voxel_size`` (PixelSpacing, mm, or None),
    ``affine`` (pixel to RAS mm from the patient geometry, or None without it),
    ``dtype``, ``bit_depth``, ``photometric``, ``notes``.
    """
    path = Path(path)
    if not path.exists():
        raise BadImageFile(path, "not found")
    if path.is_dir():
        raise BadImageFile(path, "is a folder; with kind='dicom' a folder is read as a series, a file as a 2-D image")
    ds = _read(path, series_file=False)
    _check_grayscale(path, "", ds)
    values, stored = _pixels(path, "", ds)
    data = values[None].astype(np.float32)
    spacing = ds.get("PixelSpacing")
    meta = {
        "voxel_size": None if spacing is None else tuple(round(float(v), 4) for v in spacing),
        "affine": _plane_affine(ds),
        "dtype": stored,
        "bit_depth": int(ds.get("BitsStored", ds.get("BitsAllocated", 0))),
        "photometric": str(ds.get("PhotometricInterpretation", "")),
        "notes": [],
    }
    return data, meta


def _rounded(affine: np.ndarray) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(round(float(v), 4) for v in row) for row in affine)


def _plane_affine(ds) -> tuple[tuple[float, ...], ...] | None:
    """Pixel (row, column) -> RAS mm of a 2-D file kept in stored order, or None when its header
    lacks the geometry (a secondary capture): then only shape and spacing can be compared."""
    orientation, position, spacing = (ds.get(k) for k in ("ImageOrientationPatient", "ImagePositionPatient",
                                                          "PixelSpacing"))
    if orientation is None or position is None or spacing is None or len(orientation) != 6:
        return None
    row_dir, col_dir = np.array([float(v) for v in orientation[:3]]), np.array([float(v) for v in orientation[3:]])
    affine = np.eye(4)
    affine[:3, 0] = col_dir * float(spacing[0])  # down a column: the next row
    affine[:3, 1] = row_dir * float(spacing[1])
    affine[:3, 2] = np.cross(row_dir, col_dir)
    affine[:3, 3] = [float(v) for v in position]
    return _rounded(np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine)  # LPS -> RAS, as a series


def _read(path: Path, *, series_file: bool):
    import_extra("pydicom", "reading DICOM files")
    import pydicom

    where = f"slice {path.name}: " if series_file else ""
    target = path.parent if series_file else path
    try:
        ds = pydicom.dcmread(str(path))
    except pydicom.errors.InvalidDicomError:
        raise BadImageFile(target, f"{where}not a DICOM file; allowed: DICOM slices of one series"
                           if series_file else "not a DICOM file") from None
    except Exception as exc:  # noqa: BLE001 - a reader library fails in many ways; the user needs one line
        raise BadImageFile(target, f"{where}cannot be read as DICOM ({one_line(exc)})") from None
    if "PixelData" not in ds:
        raise BadImageFile(target, f"{where}DICOM file without pixel data (a report or structured document?)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise BadImageFile(
            target,
            f"{where}multi-frame DICOM ({frames} frames); allowed: single-frame files (one file per "
            "slice in a series folder, or convert the volume to NIfTI)",
        )
    return ds


def _check_grayscale(target: Path, where: str, ds) -> None:
    samples = int(ds.get("SamplesPerPixel", 1))
    if samples != 1:
        raise BadImageFile(
            target,
            f"{where}has {samples} samples per pixel ({ds.get('PhotometricInterpretation', '?')}); "
            "allowed: grayscale DICOM (SamplesPerPixel 1)",
        )


def _pixels(target: Path, where: str, ds) -> tuple[np.ndarray, str]:
    """Physical values of one frame (stored pixels through the modality LUT), and the stored dtype."""
    from pydicom.pixels import apply_modality_lut

    try:
        stored = ds.pixel_array
        values = apply_modality_lut(stored, ds)
    except Exception as exc:  # noqa: BLE001 - compressed syntaxes need optional decoders; truncated data fails here
        raise BadImageFile(target, f"{where}pixel data cannot be decoded ({one_line(exc)})") from None
    if values.shape != (ds.Rows, ds.Columns):
        raise BadImageFile(
            target, f"{where}pixel data has shape {values.shape}, the header says {ds.Rows}×{ds.Columns}"
        )
    return np.asarray(values, dtype=np.float64), str(stored.dtype)


def _orientation(path: Path, ds) -> np.ndarray:
    value = ds.get("ImageOrientationPatient")
    if value is None or len(value) != 6:
        raise BadImageFile(path.parent, f"slice {path.name} has no ImageOrientationPatient; slices cannot be ordered")
    return np.array([float(v) for v in value])


def _position(path: Path, ds) -> np.ndarray:
    value = ds.get("ImagePositionPatient")
    if value is None or len(value) != 3:
        raise BadImageFile(path.parent, f"slice {path.name} has no ImagePositionPatient; slices cannot be ordered")
    return np.array([float(v) for v in value])


def _pixel_spacing(path: Path, ds) -> tuple[float, float]:
    value = ds.get("PixelSpacing")
    if value is None or len(value) != 2:
        raise BadImageFile(path.parent, f"slice {path.name} has no PixelSpacing; the volume's geometry is unknown")
    return float(value[0]), float(value[1])
