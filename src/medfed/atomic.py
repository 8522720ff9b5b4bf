"""One file written atomically: a temporary file in the same folder, synced, then renamed.

Below every layer (like :mod:`medfed.errors`), so checkpoints in the engine and site state
in deployment write the same way; a set of report files goes through
:func:`medfed.experiments.report.write_atomically` instead.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_bytes_atomically(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` by ``data`` in one rename: a reader sees the old file or the new one.

    ``durable`` also syncs the file to disk before the rename, so it survives a power cut, not
    only a killed process; simulation checkpoints, rewritten every round, skip that cost."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
