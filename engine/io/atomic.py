"""Atomic file replacement: write beside the target, fsync, rename over it.

Readers (and a rerun after a crash) see the old file or the new one, never a partial one; a failed
write leaves the old file and no temporary behind, and the temporaries of a writer that was killed
mid-write (SIGKILL leaves no chance to clean up) are swept by the next write of the same file. Used for alert packets, the per-CCD-visit ledger
and the Ray writer, so that outputs are idempotent per (visit, CCD).
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def atomic_write(path, write: Callable[[IO[bytes]], None]) -> Path:
    """Create or replace ``path`` with what ``write(fh)`` writes to a binary file handle.

    Parameters
    ----------
    path : str or Path
        Target file; its directory is created if needed.
    write : callable
        Called once with the open temporary file; any exception it raises propagates after the
        temporary is removed (the old ``path`` is untouched).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # a killed writer's leftovers
        try:
            stale.unlink()
        except FileNotFoundError:
            pass
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
