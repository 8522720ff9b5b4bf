"""Writing results: JSON, CSV, Markdown (PNG plots, ``models/*.npz``), all or nothing.

Every file is first written under a temporary name next to its final place (in the output
folder, or in its ``models/`` folder) and renamed into place only after all of them were
written, so a failed run leaves no partial result files. The output folder is checked before
any work (:func:`check_output_dir`), and a run owns it: the files of the previous run that
this one did not rewrite are removed (the folder's manifest says which files medfed wrote,
by their paths relative to the folder, e.g. ``models/FedAvg.npz``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import csv
import errno
import io
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from medfed.errors import ConfigError
from medfed.experiments.metrics import metric_label, metric_set
from medfed.experiments.results import (
    communication_lines,
    data_note_lines,
    harmonization_lines,
    server_note_lines,
    table_rows,
    threshold_lines,
)
from medfed.experiments.saved_model import MODEL_FILES, model_lines


def results_csv(doc: dict[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    keys = metric_set(doc.get("task")).keys
    header = ["setting", "evaluation", "model", "train_site", "test_site", "computable", "reason"]
    for m in keys:
        header += [f"{m}_mean", f"{m}_std", f"{m}_n"]
    writer.writerow(header)
    for r in doc["results"]:
        line = [r["setting"], r["evaluation"], r["model"], r["train_site"] or "", r["test_site"], r["computable"],
                r["reason"] or ""]
        for m in keys:
            s = r["metrics"][m]
            line += ["" if s["mean"] is None else repr(s["mean"]), "" if s["std"] is None else repr(s["std"]), s["n"]]
        writer.writerow(line)
    return buf.getvalue()


def results_markdown(doc: dict[str, Any]) -> str:
    lines = [
        f"# Results: {doc['dataset']}",
        "",
        f"{doc['description']}".strip(),
        "",
        f"Split: {doc['split']}, {doc['repeats']} repeat(s), seed {doc['seed']}; scaling: {doc['scaling']}. "
        f"Values are mean ± sample standard deviation over repeats.",
        "",
    ]
    privacy = doc.get("privacy") or {}
    epsilon = privacy.get("epsilon_by_setting") if privacy.get("dp", "none") != "none" else None
    keys = metric_set(doc.get("task")).keys  # every metric: the file has the width the terminal lacks
    columns = ["Test site", "Setting", *(metric_label(m) for m in keys)]
    if epsilon is not None:  # with DP, each row says what its model cost in privacy
        columns.append(f"ε (δ = {privacy['delta']:g})")
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    footnotes = []
    for row in table_rows(doc, keys):
        label = row["label"]
        if row["notes"]:
            footnotes.append(f"{row['test_site']} / {label}: " + "; ".join(row["notes"]))
            label += f" [{len(footnotes)}]"
        cells = list(row["cells"])
        if epsilon is not None:
            eps = epsilon.get(row["setting"])
            cells.append("—" if row["setting"] not in epsilon else "∞" if eps is None or eps == float("inf")
                         else f"{eps:.3g}")
        lines.append(f"| {row['test_site']} | {label} | " + " | ".join(cells) + " |")
    if footnotes:
        lines += ["", *[f"[{i}] {text}" for i, text in enumerate(footnotes, 1)]]
    thresholds = threshold_lines(doc)
    if thresholds:
        lines += ["", *thresholds]
    harmonized = harmonization_lines(doc)
    if harmonized:
        lines += ["", "Harmonization:", *[f"- {line}" for line in harmonized]]
    data_notes = data_note_lines(doc)
    if data_notes:
        lines += ["", "Data:", *[f"- {line.strip()}" for line in data_notes]]
    communication = communication_lines(doc)
    if communication:
        lines += ["", "Communication:", *[f"- {line}" for line in communication]]
    server = server_note_lines(doc)
    if server:
        lines += ["", "Server:", *[f"- {line}" for line in server]]
    models = model_lines(doc)
    if models:
        lines += ["", "Models:", *[f"- {line}" for line in models]]
    if doc["warnings"]:
        lines += ["", "Warnings:", *[f"- {w}" for w in doc["warnings"]]]
    if doc.get("attribution"):
        lines += ["", f"Data: {doc['attribution']}"]
    return "\n".join(lines) + "\n"


# A file being written is ".NAME.tmp-PID" until every file of the set is ready; a process
# killed mid-write (SIGKILL, power loss) leaves these behind, so each write removes the
# strays of dead processes. Only these extensions are medfed's: a user's ".notes.tmp-3" stays.
TEMP_FILE = re.compile(r"^\.(?P<name>.+\.(?:json|csv|tsv|md|png|pdf|svg|parquet|pq|npz|probe))\.tmp-(?P<pid>\d+)$")
MANIFEST = ".medfed-files.json"  # the set of files the last run wrote into its folder
PROBE = "medfed.probe"
MIN_FREE_BYTES = 1 << 20  # a report with plots is a few hundred kB


def temp_path(out_dir: Path, name: str, pid: int | None = None) -> Path:
    """Where file ``name`` (relative to ``out_dir``, e.g. ``models/FedAvg.npz``) is staged: next to
    its final place, so the rename stays in one folder."""
    final = Path(out_dir) / name
    return final.parent / f".{final.name}.tmp-{os.getpid() if pid is None else pid}"


def _relative_name(name: Any) -> str | None:
    """``name`` when it is a file name in the folder or in one subfolder (``models/FedAvg.npz``),
    as the manifest records them; None for anything else (absolute, '..', deeper)."""
    if not isinstance(name, str) or not name or "\\" in name or name.startswith("/"):
        return None
    parts = PurePosixPath(name).parts
    ok = 1 <= len(parts) <= 2 and "/".join(parts) == name and not any(p in (".", "..") for p in parts)
    return name if ok else None


def _subfolders(names) -> list[str]:
    """The subfolders that file names or glob patterns (``models/*.npz``) put files in."""
    return sorted({str(PurePosixPath(n).parent) for n in names if "/" in n})


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    except (OverflowError, ValueError):
        return False  # not a PID this system can have
    return True


def remove_stray_temp_files(out_dir: Path) -> list[Path]:
    """Remove medfed's temporary files in ``out_dir`` whose writing process is gone."""
    removed = []
    try:
        entries = list(os.scandir(out_dir))
    except OSError:
        return removed
    for entry in entries:
        match = TEMP_FILE.match(entry.name)
        if match and entry.is_file(follow_symlinks=False) and not _alive(int(match["pid"])):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def describe_os_error(exc: OSError) -> str:
    """What an OSError means for an output location, in the user's words."""
    reasons = {
        errno.EROFS: "the file system is read-only",
        errno.ENOSPC: "the file system is full (no space left on device)",
        errno.EDQUOT: "the disk quota is exhausted",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
        errno.ENAMETOOLONG: "the name is too long",
        errno.ELOOP: "too many levels of symbolic links",
    }
    return reasons.get(exc.errno, exc.strerror or str(exc))


def _remove_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):  # innermost first
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (or gone): leave it and its parents


# names a run's report may take in its folder (plots: roc_<site>, confusion_<site>, scatter_<site>, overlay_<site>,
# convergence, test_<metric>, site_effect)
REPORT_FILES = ("results.json", "results.csv", "table.md", "roc_*.*", "confusion_*.*", "scatter_*.*", "overlay_*.*",
                "convergence.*", "test_*.*", "site_effect.*")


def foreign_files(out_dir: Path, names: tuple[str, ...]) -> list[str]:
    """Files in ``out_dir`` (or its subfolders that ``names`` name) that a run would write (they
    match ``names``, glob patterns such as ``models/*.npz``) but that the previous medfed run there
    did not write, or that changed since it did: a user's own ``results.csv`` in the folder, or
    one they edited. Returned as paths relative to ``out_dir``."""
    if not names or not out_dir.is_dir():
        return []
    previous = _previous_set(out_dir)
    found = []
    for folder in ["", *_subfolders(names)]:
        where = out_dir / folder
        if not where.is_dir():
            continue
        for p in sorted(where.iterdir()):
            name = f"{folder}/{p.name}" if folder else p.name
            if p.is_file() and any(fnmatch.fnmatchcase(name, n) for n in names) and previous.get(name) != _stat_key(p):
                found.append(name)
    return found


def check_output_dir(
    out_dir: Path | str, label: str = "output folder", *, owns: tuple[str, ...] = (), overwrite: bool = False
) -> list[Path]:
    """Make sure a report can be written to ``out_dir`` before any work is done.

    Creates the folder if needed, then writes, fsyncs, renames and removes a probe file
    there, so a folder that is a file, under a file, a dangling link, not writable, read-only
    or full is refused now (:class:`ConfigError` naming ``label`` and the reason) rather than
    after training. A folder holding files the run would replace (names matching ``owns``)
    that medfed did not write, or that changed since it did, is refused unless ``overwrite``
    (:func:`foreign_files`). Strays of killed runs are removed. Returns the folders it
    created, outermost first, for :func:`output_dir` to remove again if the run fails.
    """
    if not str(out_dir).strip():
        raise ConfigError(f"{label} is empty: give a folder name")
    path = Path(out_dir)
    if path.is_symlink() and not path.exists():
        raise ConfigError(f"{label} {str(path)!r} is a symbolic link to {os.readlink(path)!r}, which does not exist")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{label} {str(path)!r} is a file, not a folder; give a folder name")
    missing = [p for p in (path, *path.parents) if not p.exists()][::-1]
    created: list[Path] = []
    try:
        for folder in missing:
            if folder.is_symlink():
                raise ConfigError(f"{label} {str(path)!r}: {str(folder)!r} is a symbolic link that does not resolve")
            parent = folder.parent
            if parent.exists() and not parent.is_dir():
                raise ConfigError(f"{label} {str(path)!r}: {str(parent)!r} is a file, so no folder can be made in it")
            try:
                folder.mkdir()
            except FileExistsError:
                continue  # made meanwhile by someone else
            except OSError as exc:
                raise ConfigError(f"{label} {str(path)!r} cannot be created: {describe_os_error(exc)}") from None
            created.append(folder)
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{label} {str(path)!r} is not writable (permission denied)")
        for folder in _subfolders(owns):
            sub = path / folder
            if (sub.exists() or sub.is_symlink()) and not sub.is_dir():
                raise ConfigError(f"{label} {str(path)!r} holds a file {folder!r} where this run writes a folder "
                                  "of that name; move it, or choose another folder")
        _probe(path, label)
        foreign = [] if overwrite else foreign_files(path, owns)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise ConfigError(
                f"{label} {str(path)!r} holds {shown}, which this run would replace but medfed did not write "
                "(or they changed since it did): pass --overwrite to replace them, or choose another folder"
            )
    except BaseException:
        _remove_empty(created)
        raise
    for folder in ["", *_subfolders(owns)]:
        remove_stray_temp_files(path / folder)
    return created


def _probe(path: Path, label: str) -> None:
    """Write, fsync, rename and remove a small file: what writing the report will do."""
    probe, renamed = temp_path(path, PROBE), temp_path(path, "renamed." + PROBE)
    try:
        stats = os.statvfs(path) if hasattr(os, "statvfs") else None
        if stats is not None and stats.f_bavail * stats.f_frsize < MIN_FREE_BYTES:
            raise OSError(errno.ENOSPC, "no space left on device")
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, bytes(4096))
            os.fsync(fd)  # delayed allocation reports a full disk here, not at write()
        finally:
            os.close(fd)
        os.replace(probe, renamed)
    except OSError as exc:
        raise ConfigError(f"{label} {str(path)!r} cannot hold the results: {describe_os_error(exc)}") from None
    finally:
        for leftover in (probe, renamed):
            with contextlib.suppress(OSError):
                leftover.unlink()


@contextlib.contextmanager
def output_dir(
    out_dir: Path | str, label: str = "output folder", *, owns: tuple[str, ...] = (), overwrite: bool = False
) -> Iterator[Path]:
    """:func:`check_output_dir` on entry; the folders it created are removed again (if still
    empty) when the block fails, so bad input found later writes nothing."""
    created = check_output_dir(out_dir, label, owns=owns, overwrite=overwrite)
    try:
        yield Path(out_dir)
    except BaseException:
        _remove_empty(created)
        raise


def _stat_key(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _previous_set(out_dir: Path) -> dict[str, dict[str, int]]:
    """The files the previous run recorded in the folder's manifest (plain names only)."""
    try:
        files = json.loads((out_dir / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if not isinstance(files, dict):
        return {}
    return {n: k for n, k in files.items() if _relative_name(n) is not None and isinstance(k, dict)}


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_atomically(out_dir: Path, files: dict[str, Callable[[], bytes]], *, as_set: bool = True) -> list[Path]:
    """Produce every file's bytes, write them under temporary names, then rename them all.

    A name may lie in one subfolder (``models/FedAvg.npz``); the subfolder is made as needed.
    If producing or writing any file fails, every temporary file is removed (and the folders
    made for them) and no result file is touched. With ``as_set`` (a run owns its folder) the
    names written are recorded in the folder's manifest, and the files of the previous set
    that this one did not rewrite (a plot of a site no longer there, PNGs of a run with
    ``--plots``, models of a run with ``--save-model``) are removed, unless they changed since
    that run wrote them: files medfed did not write stay, and so does a subfolder holding them.
    """
    out_dir = Path(out_dir)
    bad = [n for n in files if _relative_name(n) is None]
    if bad:
        raise ValueError(f"not a file name in the output folder or one subfolder of it: {bad[0]!r}")
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = _previous_set(out_dir) if as_set else {}
    for folder in ["", *_subfolders([*files, *previous])]:
        remove_stray_temp_files(out_dir / folder)
    staged: list[tuple[Path, Path]] = []
    made: list[Path] = []  # subfolders this call created, removed again if it fails
    try:
        for name, produce in files.items():
            final = out_dir / name
            if not final.parent.is_dir():
                final.parent.mkdir()
                made.append(final.parent)
            tmp = temp_path(out_dir, name)
            staged.append((tmp, final))
            _write_synced(tmp, produce())
        if as_set:
            # a rename keeps size and mtime, so the staged files' stats are the final ones
            record = {name: _stat_key(tmp) for name, (tmp, _) in zip(files, staged)}
            manifest = json.dumps({"written_by": "medfed", "files": record}, indent=1) + "\n"
            staged.append((temp_path(out_dir, MANIFEST.lstrip(".")), out_dir / MANIFEST))
            _write_synced(staged[-1][0], manifest.encode())
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)  # also a file whose write failed half-way
        _remove_empty(made)
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    for tmp, final in staged:
        os.replace(tmp, final)
    for name, key in previous.items():
        stale = out_dir / name
        if name not in files and stale.is_file() and not stale.is_symlink() and _stat_key(stale) == key:
            stale.unlink()
    for folder in set(_subfolders(previous)) - set(_subfolders(files)):
        _remove_empty([out_dir / folder])  # a run without --save-model leaves no empty models/
    return [final for _, final in staged[: len(files)]]


def report_files(doc: dict[str, Any], run=None, plots: bool = False) -> dict[str, Callable[[], bytes]]:
    """The files of a run's report, as producers of their bytes."""
    files: dict[str, Callable[[], bytes]] = {
        "results.json": lambda: (json.dumps(doc, indent=2, allow_nan=False) + "\n").encode(),
        "results.csv": lambda: results_csv(doc).encode(),
        "table.md": lambda: results_markdown(doc).encode(),
    }
    if plots and run is not None:
        from medfed.experiments import plots as plotting

        files.update(plotting.plot_files(run, doc))
    if run is not None:
        files.update({o.file: o.model.to_bytes for o in run.models if o.model is not None})
    return files


def owned_files(save_model: bool) -> tuple[str, ...]:
    """The names (glob patterns) a run's report may take in its folder."""
    return REPORT_FILES + (MODEL_FILES if save_model else ())
