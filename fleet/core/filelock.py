"""One exclusive, cross-process file lock (``flock``) for every place that needs one:
the device store, the fleet's known_hosts, the lab's address allocation, the wheelhouse."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from fleet.core import errors

__all__ = ["exclusive"]

_POLL_S = 0.05


@contextlib.contextmanager
def exclusive(lock_file: Path, *, timeout: float | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` (created 0600 if missing) for the block.

    ``timeout`` None waits as long as it takes; otherwise at most ``timeout`` seconds,
    then :class:`~fleet.core.errors.BusyError` (retryable; nothing was done). The lock
    dies with its process, so a killed holder never wedges the next caller."""
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if timeout is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            _acquire(fd, lock_file, timeout)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _acquire(fd: int, lock_file: Path, timeout: float) -> None:
    deadline = time.monotonic() + max(0.0, timeout)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise errors.BusyError(
                    f"{lock_file} is held by another operation; gave up after {timeout:g} s",
                    lock=str(lock_file), waited_s=timeout) from None
            time.sleep(_POLL_S)
