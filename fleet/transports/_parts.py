"""Which ``.part`` file a push writes: its own, so concurrent pushes never collide.

Two deploys pushing the same package to one device used to share ``<remote>.part`` (and
one renamed it away under the other: ``[Errno 2]``). Each push now holds a *slot*: an
``flock`` on a small lock file on the controller, keyed by the device URI, the remote
path and the slot number. Slot 0 writes ``<remote>.part``, slot n ``<remote>.<n>.part``.
A push takes the lowest free slot, so a lone push (and a resumed one: the lock dies with
the process that held it, even a SIGKILLed one) finds the partial file its predecessor
left and resumes from it; a concurrent push takes the next slot and writes its own file.
Both then rename their complete file onto ``<remote>`` (same bytes, atomic).

Scope: the locks serialise pushes from one controller host (or farm host). Two hosts
pushing the same file to the same device at once are not coordinated here; the agent's
lock and its digest check still keep the store consistent.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fleet.core import errors

__all__ = ["MAX_SLOTS", "part_name", "part_slot"]

#: concurrent pushes of one file to one device before the next is told ``busy``
MAX_SLOTS = 16


def part_name(remote: str, slot: int) -> str:
    """The partial file of ``remote`` for ``slot`` (0: ``<remote>.part``)."""
    return f"{remote}.part" if slot == 0 else f"{remote}.{slot}.part"


def _lock_dir(home: Path | None) -> Path:
    d = home / "pushes" if home is not None else \
        Path(tempfile.gettempdir()) / f"fleet-pushes-{os.getuid()}"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


@contextlib.contextmanager
def part_slot(home: Path | None, uri: str, remote: str) -> Iterator[str]:
    """Hold the lowest free push slot of (``uri``, ``remote``) for the block; yields the
    partial file's remote path. Raises :class:`BusyError` when all :data:`MAX_SLOTS` are
    held (retryable)."""
    key = hashlib.sha256(f"{uri}\0{remote}".encode()).hexdigest()[:32]
    d = _lock_dir(home)
    for slot in range(MAX_SLOTS):
        fd = os.open(d / f"{key}.{slot}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            yield part_name(remote, slot)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        return
    raise errors.BusyError(f"{MAX_SLOTS} pushes of {remote} to {uri} are running",
                           uri=uri, remote=remote)
