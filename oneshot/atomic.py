"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of either."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, IO


def write_atomic(path: str | Path, data: bytes | Callable[[IO[bytes]], None]) -> None:
    """Write `data` (bytes, or a function writing to a binary handle) to a temporary name, fsync, rename."""
    path = Path(path)
    # Folders this write creates, deepest first: an interrupted write removes them again, so a signal
    # between creating the folder and the rename leaves nothing behind.
    created = []
    for folder in (path.parent, *path.parent.parents):
        if folder.exists():
            break
        created.append(folder)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            data(handle) if callable(data) else handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        for folder in created:
            try:
                folder.rmdir()
            except OSError:  # not empty (or already gone): someone else's files are there now
                break
        raise
