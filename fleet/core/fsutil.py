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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet.core import errors

__all__ = [
    "DISK_FULL_ERRNOS",
    "ROOM_HEADROOM",
    "DiskSpace",
    "atomic_write",
    "atomic_write_json",
    "disk_space",
    "fsync_dir",
    "os_error",
    "room_needed",
    "sha256_file",
]

#: errnos that mean "no room", whatever the filesystem says it with
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_CHUNK = 1 << 20

#: Bytes a deploy needs on the device beyond the package itself: state.json and slot
#: rewrites (temp + rename: briefly two copies), the per-version runtime config, the health
#: report, backend caches, filesystem block rounding. Generous on purpose: a refusal costs
#: nothing, a disk filled to the last block wedges the device.
ROOM_HEADROOM = 8 << 20


def room_needed(package_size: int) -> int:
    """Free bytes a device must have before a package of ``package_size`` bytes (the
    encrypted ``.fpkg``) is pushed to it: the pushed file plus :data:`ROOM_HEADROOM`.

    Pure. One copy is enough: the agent's ``stage`` renames the pushed file from
    ``incoming/`` into ``store/`` (same filesystem) after verifying it, and the plaintext
    only ever exists in memory (memfd), so staging never needs a second package-sized copy.
    A resumed push needs less (the bytes already on the device count), so this is an upper
    bound. Raises :class:`ValueError` for a negative size."""
    if package_size < 0:
        raise ValueError(f"package size must be >= 0, got {package_size}")
    return package_size + ROOM_HEADROOM


@dataclass(frozen=True)
class DiskSpace:
    """A filesystem's room, in bytes: ``free`` is what an unprivileged writer may still use
    (``f_bavail``), ``total`` the filesystem's size."""

    path: str
    free: int
    total: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "free": self.free, "total": self.total}


def disk_space(path: str | os.PathLike[str]) -> DiskSpace:
    """Free and total bytes of the filesystem holding ``path`` (or its nearest existing
    parent, so a root not yet created still answers). Raises :class:`StoreError` when
    not even ``/`` can be asked."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
    except OSError as exc:
        raise errors.StoreError(f"cannot measure free space at {probe}: {exc.strerror}",
                                path=str(probe)) from exc
    return DiskSpace(str(path), st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize)


def os_error(exc: OSError, path: str | os.PathLike[str], what: str = "write"
             ) -> errors.FleetError:
    """The fleet error for an ``OSError`` met while doing ``what`` to ``path`` (not raised):
    :class:`DiskFullError` for ENOSPC/EDQUOT, :class:`StoreError` for anything else."""
    if exc.errno in DISK_FULL_ERRNOS:
        return errors.DiskFullError(f"no space left on the device to {what} {path}",
                                    path=str(path))
    return errors.StoreError(f"cannot {what} {path}: {exc.strerror or exc}", path=str(path))


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
