"""Atomic file replacement: write beside the target, fsync, rename over it; and the check that an
output folder can be written before any work starts.

Readers (and a rerun after a crash) see the old file or the new one, never a partial one; a failed
write leaves the old file and no temporary behind, and the temporaries of a writer that was killed
mid-write (SIGKILL leaves no chance to clean up) are swept by the next write of the same file. Used for alert packets, the per-CCD-visit ledger
and the Ray writer, so that outputs are idempotent per (visit, CCD).

Permissions: the finished file gets ``mode`` less the process umask, as :func:`open` would give a
new file (``0o644`` under the usual umask 022, like the FITS products astropy writes), not the
``0o600`` of the temporary :func:`tempfile.mkstemp` makes: an alert broker running as another user
must be able to read the alerts and the ledger.
"""
from __future__ import annotations

import errno
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

from ..errors import ConfigError

__all__ = ["atomic_write", "check_output_dir", "file_sha256"]

_umask_lock = threading.Lock()


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:  # set-and-restore: the only portable way to read it
        old = os.umask(0o022)
        os.umask(old)
    return old


def atomic_write(path, write: Callable[[IO[bytes]], None], *, mode: int = 0o666) -> Path:
    """Create or replace ``path`` with what ``write(fh)`` writes to a binary file handle.

    Parameters
    ----------
    path : str or Path
        Target file; its directory is created if needed.
    write : callable
        Called once with the open temporary file; any exception it raises propagates after the
        temporary is removed (the old ``path`` is untouched).
    mode : int, keyword-only
        Permission bits of the finished file, less the umask (default ``0o666``: ``0o644``
        under umask 022, as a file made by :func:`open`); ``0o600`` keeps a file private.
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
        os.fchmod(fd, mode & ~_umask() & 0o7777)
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


def check_output_dir(path, *, what: str = "output folder") -> Path:
    """Check, before any work, that ``path`` is a folder nightsift can write into, or can create.

    Nothing is left behind: an existing folder is probed with a temporary file, a missing one by
    creating (and removing) a temporary folder in its nearest existing parent; the folder itself
    is created only when the first output is written.

    Raises
    ------
    ConfigError
        ``path`` (or a parent) is a file, or the folder cannot be written or created (permission,
        read-only file system); one line naming the path and the reason.
    """
    p = Path(path)
    fix = f"choose another {what} (--out)"
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{p}: {what} is a file, not a folder; {fix}")
    if p.is_dir():
        probe_in, make = p, False
    else:
        parent = p.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise ConfigError(f"{p}: cannot create the {what}: {parent} is a file, not a folder; {fix}")
        probe_in, make = parent, True
    try:
        if make:
            os.rmdir(tempfile.mkdtemp(prefix=".nightsift-probe-", dir=probe_in))
        else:
            fd, tmp = tempfile.mkstemp(prefix=".nightsift-probe-", dir=probe_in)
            os.close(fd)
            os.unlink(tmp)
    except OSError as e:
        reason = e.strerror or errno.errorcode.get(e.errno or 0, str(e))
        verb = f"cannot create the {what} in {probe_in}" if make else f"cannot write into the {what}"
        raise ConfigError(f"{p}: {verb} ({reason}); {fix}") from None
    return p


def file_sha256(path) -> str:
    """Hex SHA-256 digest of a file's bytes (read in 1 MiB blocks)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
