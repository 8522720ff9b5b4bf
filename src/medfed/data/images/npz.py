"""MedMNIST-format ``.npz`` files, one per site, given by path (never downloaded).

MedMNIST (Yang et al., 2023) ships each data set as one ``.npz`` with ``train_images``,
``train_labels``, ``val_images``, ``val_labels``, ``test_images`` and ``test_labels``;
images are ``(n, H, W)`` (grayscale) or ``(n, H, W, 3)`` (RGB) uint8, labels ``(n, 1)``
integer classes. Here each file is one site: its train rows become the site's training rows
and its test rows the test rows (the split is predefined). Every class is kept (a multiclass
task) unless the user names the positive classes, which makes the task binary. Class names
come from an optional ``classes`` member (one name per class number, as text) where a file
has one, else they are the class numbers. Pixel values stay 0..255 (float32), as in the
other image loaders: scaling is an explicit preprocessing step.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from medfed.data.federation import Federation, Site
from medfed.errors import ConfigError, DataError

USE_VAL_CHOICES = ("train", "test", "drop")
_PARTS = ("train", "val", "test")
CLASS_NAMES_KEY = "classes"  # optional member: the name of class number k at position k


def load_medmnist_npz(
    sites: Mapping[str, str | os.PathLike],
    *,
    positive_classes: Sequence[int] | None = None,
    use_val: str = "train",
    name: str | None = None,
) -> Federation:
    """One site per MedMNIST ``.npz`` file: a multiclass task over every class the files hold
    (in class-number order; a site may lack some), or, given ``positive_classes``, a binary
    one with labels 1 for those classes and 0 for the rest.

    ``use_val`` says where each file's validation rows go: ``"train"`` (added to the training
    rows), ``"test"`` (added to the test rows) or ``"drop"``. Every file must hold images of
    one shape, and files that name their classes must agree on the names. An error about
    ``positive_classes`` lists the classes the files hold.
    """
    if not isinstance(sites, Mapping) or not sites:
        raise ConfigError(f"sites must map site names to .npz paths, got {sites!r}")
    if use_val not in USE_VAL_CHOICES:
        raise ConfigError(f"use_val must be one of {', '.join(map(repr, USE_VAL_CHOICES))}, got {use_val!r}")
    parts = ("train", "test") if use_val == "drop" else _PARTS
    loaded = {str(site): _read(Path(path), parts) for site, path in sites.items()}

    classes = sorted({int(c) for data in loaded.values() for _, y in data.values() for c in np.unique(y)})
    if positive_classes is None:
        positive = None
        if len(classes) < 2:
            raise ConfigError(f"the files hold class {classes} only; a multiclass task needs at least two")
        names = _class_names({site: Path(path) for site, path in sites.items()}, classes)
    else:
        positive = _positive(positive_classes, classes)

    first_site, first = next(iter(loaded.items()))
    shape = first["train"][0].shape[1:]
    built = []
    for site, data in loaded.items():
        path = Path(sites[site])
        for part, (images, _) in data.items():
            if images.shape[1:] != shape:
                raise DataError(
                    f"{path}: {part}_images are {_shape_text(images.shape[1:])}, while "
                    f"{Path(sites[first_site])} ({first_site!r}) holds {_shape_text(shape)}; "
                    "allowed: one image size and channel count across all sites"
                )
        train_parts = ["train"] + (["val"] if use_val == "train" else [])
        order = train_parts + [p for p in ("val", "test") if p in data and p not in train_parts]
        X = np.concatenate([data[p][0] for p in order])
        labels = np.concatenate([data[p][1] for p in order])
        split = np.concatenate([np.full(len(data[p][1]), p in train_parts) for p in order])
        X = X.astype(np.float32)
        X = X[:, None] if X.ndim == 3 else np.moveaxis(X, -1, 1)
        if positive is None:  # class number -> index into the federation's classes
            built.append(Site(site, X, np.searchsorted(classes, labels), split, task="multiclass"))
        else:
            built.append(Site(site, X, np.isin(labels, positive).astype(np.int8), split))

    y_all = np.concatenate([s.y for s in built])
    if positive is not None and (y_all.all() or not y_all.any()):
        raise ConfigError(
            f"positive_classes {list(positive)} make every sample "
            f"{'positive' if y_all.all() else 'negative'}; the files hold classes {classes}"
        )
    channels = ("gray",) if len(shape) == 2 else ("R", "G", "B")
    counts = {site: {p: len(y) for p, (_, y) in data.items()} for site, data in loaded.items()}
    return Federation(
        name=name or Path(next(iter(sites.values()))).stem,
        sites=tuple(built),
        feature_names=channels,
        description=(
            f"MedMNIST-format files at {len(built)} sites, {_shape_text(shape)} images, "
            + (f"classes {list(positive)} positive of {classes}" if positive is not None
               else f"{len(classes)} classes: {', '.join(names)}")
        ),
        attribution="MedMNIST: Yang et al., Scientific Data 10, 41 (2023); cite the source data set too",
        positive_label=",".join(map(str, positive)) if positive is not None else "1",
        task="binary" if positive is not None else "multiclass",
        classes=() if positive is not None else names,
        task_source="given (positive_classes)" if positive is not None else "every class of the files kept",
        info={
            "source": {site: str(Path(p)) for site, p in sites.items()},
            "kind": "medmnist-npz",
            "classes": classes,
            "positive_classes": list(positive) if positive is not None else None,
            "use_val": use_val,
            "counts": counts,
            "dtype": str(first["train"][0].dtype),
            "skipped": [],
        },
    )


def _read(path: Path, parts: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The wanted parts of one file as (images, integer labels (n,)), checked."""
    if not path.exists():
        raise DataError(f"{path}: not found")
    if path.is_dir():
        raise DataError(f"{path}: is a folder; allowed: a MedMNIST .npz file")
    try:
        archive = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot be read as a .npz archive ({exc})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: holds a single array, not a MedMNIST .npz archive")
    with archive:
        keys = set(archive.files)
        wanted = [f"{p}_{what}" for p in parts for what in ("images", "labels")]
        missing = [k for k in wanted if k not in keys]
        if missing:
            raise DataError(
                f"{path}: no {', '.join(missing)}; it holds {', '.join(sorted(keys)) or 'nothing'}; "
                f"a MedMNIST file holds {', '.join(f'{p}_images, {p}_labels' for p in _PARTS)}"
            )
        try:
            out = {p: (archive[f"{p}_images"], archive[f"{p}_labels"]) for p in parts}
        except Exception as exc:  # noqa: BLE001 - a damaged member fails only when read
            raise DataError(f"{path}: cannot be read ({exc})") from None
    for part, (images, labels) in out.items():
        if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
            raise DataError(
                f"{path}: {part}_images has shape {images.shape}; allowed: (n, H, W) grayscale "
                "or (n, H, W, 3) RGB"
            )
        if not np.issubdtype(images.dtype, np.number):
            raise DataError(f"{path}: {part}_images has dtype {images.dtype}; allowed: numbers")
        if labels.ndim == 2 and labels.shape[1] > 1:
            raise DataError(
                f"{path}: {part}_labels has {labels.shape[1]} columns (a multi-label task such as "
                "ChestMNIST); allowed: one class label per image, shape (n, 1)"
            )
        labels = labels.reshape(-1) if labels.ndim <= 2 else labels
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataError(
                f"{path}: {part}_labels has shape {out[part][1].shape} for {len(images)} images; "
                "allowed: (n, 1) or (n,)"
            )
        if not np.issubdtype(labels.dtype, np.number) or not np.all(np.mod(labels, 1) == 0):
            raise DataError(f"{path}: {part}_labels must be integer classes, got dtype {labels.dtype}")
        out[part] = (images, labels.astype(np.int64))
    return out


def _class_names(paths: Mapping[str, Path], classes: list[int]) -> tuple[str, ...]:
    """The names of ``classes`` from the files' ``classes`` members (they must agree where
    given, and name every class number that occurs), else the class numbers as text."""
    named: dict[str, tuple[str, ...]] = {}
    for site, path in paths.items():
        with np.load(path, allow_pickle=False) as archive:
            if CLASS_NAMES_KEY not in archive.files:
                continue
            try:
                raw = archive[CLASS_NAMES_KEY]
            except Exception as exc:  # noqa: BLE001 - a damaged member fails only when read
                raise DataError(f"{path}: {CLASS_NAMES_KEY} cannot be read ({exc})") from None
        if raw.ndim != 1 or raw.dtype.kind not in "US":
            raise DataError(f"{path}: {CLASS_NAMES_KEY} has shape {raw.shape} and dtype {raw.dtype}; allowed: "
                            "one name (text) per class number, in class-number order")
        names = tuple(str(v.decode() if isinstance(v, bytes) else v) for v in raw)
        if len(names) <= classes[-1]:
            raise DataError(f"{path}: {CLASS_NAMES_KEY} names {len(names)} classes but the files hold class "
                            f"{classes[-1]}; allowed: one name per class number 0..{classes[-1]} at least")
        if len(set(names)) != len(names):
            raise DataError(f"{path}: {CLASS_NAMES_KEY} repeats a name: {list(names)}")
        for other, theirs in named.items():
            if theirs != names:
                raise DataError(f"{path}: {CLASS_NAMES_KEY} {list(names)} differ from {paths[other]} "
                                f"({other!r}): {list(theirs)}; allowed: the same names in every file")
        named[site] = names
    if not named:
        return tuple(str(c) for c in classes)
    names = next(iter(named.values()))
    return tuple(names[c] for c in classes)


def _positive(positive_classes, classes: list[int]) -> tuple[int, ...]:
    hint = f"the files hold classes {classes}"
    if positive_classes is None or isinstance(positive_classes, (str, bytes)) or not isinstance(
        positive_classes, Sequence
    ) or not len(positive_classes):
        raise ConfigError(f"positive_classes must list the class numbers to call positive; {hint}")
    bad = [c for c in positive_classes
           if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, np.integer))]
    if bad:
        raise ConfigError(f"positive_classes must be integers, got {bad[0]!r}; {hint}")
    absent = sorted({int(c) for c in positive_classes} - set(classes))
    if absent:
        raise ConfigError(f"positive_classes {absent} do not occur; {hint}")
    return tuple(sorted({int(c) for c in positive_classes}))


def _shape_text(shape: tuple[int, ...]) -> str:
    return f"{shape[0]}×{shape[1]} grayscale" if len(shape) == 2 else f"{shape[0]}×{shape[1]} RGB"
