"""File helpers both sides use: one atomic write, one file digest.

:func:`atomic_write` is temp + fsync + rename + fsync(dir) (the old content stays until
the rename, and the rename is durable once it returns). The temp file is created with
``O_EXCL | O_NOFOLLOW`` beside the target, so a planted symlink is never written
through. ENOSPC/EDQUOT become :class:`~fleet.core.errors.DiskFullError`, any other
``OSError`` a :class:`~fleet.core.errors.StoreError`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fleet.core import errors

__all__ = ["DISK_FULL_ERRNOS", "atomic_write", "atomic_write_json", "fsync_dir", "sha256_file"]

#: errnos that mean "no room", whatever the filesystem says it with
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_CHUNK = 1 << 20


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """fsync a directory so a rename in it survives a power cut (best effort on odd FS)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically and durably; ``mode`` of the new file.

    Raises :class:`DiskFullError` on ENOSPC/EDQUOT (nothing left behind) and
    :class:`StoreError` on other OS errors.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if exc.errno in DISK_FULL_ERRNOS:
            raise errors.DiskFullError(f"no space left writing {target}",
                                       path=str(target)) from exc
        raise errors.StoreError(f"cannot write {target}: {exc.strerror}",
                                path=str(target)) from exc


def atomic_write_json(path: str | os.PathLike[str], doc: Any, *, mode: int = 0o600) -> None:
    """:func:`atomic_write` of ``doc`` as indented, key-sorted UTF-8 JSON."""
    atomic_write(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode(), mode=mode)


def sha256_file(path: str | os.PathLike[str], progress: Callable[[int], None] | None = None
                ) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks; ``progress(n)`` per block."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
            if progress is not None:
                progress(len(block))
    return h.hexdigest()
