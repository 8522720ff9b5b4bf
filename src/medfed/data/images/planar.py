"""2-D images (PNG, JPEG, TIFF, BMP) via Pillow, with their stored intensities.

Values are never rescaled: an 8-bit image gives 0..255, a 16-bit one 0..65535 and a float
TIFF its own values, and the bit depth goes into the metadata, because dividing by a
guessed maximum would hide the difference between sites that export 12-bit data in 16-bit
containers and sites that stretch it. Intensity normalization is a separate, explicit step
(:mod:`medfed.data.preprocess`).

Grayscale images give one channel ("gray"), colour images three ("R", "G", "B"). Formats
that are colour with extras (RGBA, palette, CMYK ...) are converted to RGB and the conversion
is noted; a grayscale image with alpha ("LA") keeps its gray channel. The EXIF orientation
tag of photographs is applied, as every viewer does, so that rows run top to bottom as
seen; that too is noted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medfed.data.extras import import_extra
from medfed.data.images.load import BadImageFile
from medfed.data.tables import one_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
GRAY = ("gray",)
RGB = ("R", "G", "B")

# Pillow mode -> (channel names, bit depth) for the modes read as they are.
_DIRECT = {
    "1": (GRAY, 1),
    "L": (GRAY, 8),
    "I;16": (GRAY, 16),
    "I;16L": (GRAY, 16),
    "I;16B": (GRAY, 16),
    "I;16N": (GRAY, 16),
    "I": (GRAY, 32),
    "F": (GRAY, 32),
    "RGB": (RGB, 8),
}


def read_planar(path: str | Path) -> tuple[np.ndarray, dict]:
    """Read one 2-D image as a float32 ``(C, H, W)`` array plus metadata.

    Metadata: ``channels`` (names), ``mode`` (Pillow's), ``dtype`` (stored sample type),
    ``bit_depth`` (bits per sample), ``voxel_size`` (None: pixel spacing is not stored
    reliably in these formats) and ``notes`` (conversions made). Multi-page files (TIFF
    stacks, animated images) are refused: they are volumes or videos, not one image.
    """
    import_extra("PIL", "reading 2-D image files")
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise BadImageFile(path, "not found")
    if path.is_dir():
        raise BadImageFile(path, f"is a folder; allowed: a 2-D image file ({', '.join(IMAGE_SUFFIXES)})")
    notes = []
    try:
        with Image.open(path) as img:
            frames = int(getattr(img, "n_frames", 1))
            if frames > 1:
                raise BadImageFile(path, f"holds {frames} frames; allowed: a single 2-D image")
            img.load()
            oriented = ImageOps.exif_transpose(img)
            if oriented is not img and img.getexif().get(0x0112, 1) != 1:
                notes.append("EXIF orientation applied")
            img = oriented
            mode = img.mode
            if mode == "LA":
                img = img.getchannel("L")
                notes.append("LA: alpha dropped, gray kept")
            elif mode not in _DIRECT:
                img = img.convert("RGB")
                notes.append(f"{mode} converted to RGB")
            channels, bits = _DIRECT[img.mode]
            stored = np.asarray(img)
    except BadImageFile:
        raise
    except UnidentifiedImageError:
        raise BadImageFile(
            path, "cannot be read as an image (Pillow recognises no image format in it: corrupt or "
            f"not an image); allowed: {', '.join(IMAGE_SUFFIXES)} files"
        ) from None
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt files fail in load() with OSError and kin
        raise BadImageFile(path, f"cannot be read as an image ({one_line(exc)})") from None
    if stored.ndim != (2 if channels == GRAY else 3):
        raise BadImageFile(path, f"decoded to shape {stored.shape}; allowed: a 2-D grayscale or RGB image")
    data = stored.astype(np.float32)
    data = data[None] if data.ndim == 2 else np.moveaxis(data, -1, 0)
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise BadImageFile(path, f"holds {bad} NaN or infinite pixels; allowed: finite values only")
    meta = {
        "channels": channels,
        "mode": mode,
        "dtype": str(stored.dtype),
        "bit_depth": bits,
        "voxel_size": None,
        "notes": notes,
    }
    return np.ascontiguousarray(data), meta
