"""Capture what native code writes to file descriptors 1 and 2.

Why: MNN reports a silent backend fallback only as a log line
(``Can't Find type=3 backend, use 0 instead``) written by C++ ``printf``, not through Python's
``sys.stdout``. On the Linux x86-64 wheel (3.6.1) it goes to fd 1, not fd 2 as one would
expect, and ``import MNN`` itself prints a CPU feature line to fd 1. The agent prints exactly
one JSON document on stdout, so every MNN call must run with both descriptors redirected,
and the redirected text is also the evidence of a fallback.

The redirection is process-wide (descriptors are shared by all threads), so one lock
serialises captures. Output goes to an anonymous memory file (``memfd``) or an unlinked
temporary file, never a pipe: a pipe fills at 64 KiB and would block the writer.

What was caught is also logged, one record per line, to the ``fleet.mnn`` logger at INFO
when the outermost capture ends (an inner capture's lines wait for it: logged earlier
they would land in the outer capture's scratch file): the CLI shows them with ``-v`` and
hides them by default (:mod:`fleet.cli._logging`); the agent does not show INFO records
on its stdout.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

__all__ = ["Captured", "capture_fds"]

_LOCK = threading.RLock()
_log = logging.getLogger("fleet.mnn")
#: open captures (under ``_LOCK``) and the lines of finished inner ones, for the outermost
_depth = 0
_pending: list[str] = []
_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL | None:
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        try:
            _LIBC = ctypes.CDLL(name) if name else ctypes.CDLL(None)
        except OSError:
            return None
    return _LIBC


def _flush_all() -> None:
    """Flush Python's and C's buffered streams, so text lands on the right side of a dup2."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(Exception):
            libc.fflush(None)


def _scratch_fd() -> int:
    if hasattr(os, "memfd_create"):
        with contextlib.suppress(OSError):
            return os.memfd_create("fleet-fdcapture", os.MFD_CLOEXEC)
    handle, path = tempfile.mkstemp(prefix="fleet-fdcapture-")
    os.unlink(path)
    return handle


@dataclass
class Captured:
    """Text written to the captured descriptors while the block ran (filled on exit)."""

    fds: tuple[int, ...]
    text: dict[int, str] = field(default_factory=dict)

    @property
    def combined(self) -> str:
        return "".join(self.text.get(fd, "") for fd in self.fds)

    def lines(self) -> list[str]:
        return [line for line in self.combined.splitlines() if line.strip()]


@contextlib.contextmanager
def capture_fds(fds: Sequence[int] = (1, 2)) -> Iterator[Captured]:
    """Redirect ``fds`` to scratch files for the block; the text is in the yielded object.

    Nested captures work (the inner one sees its own output, the outer one gets nothing
    of it), because each level saves and restores what the descriptor pointed at.
    """
    global _depth
    result = Captured(tuple(fds))
    with _LOCK:
        _depth += 1
        _flush_all()
        saved: dict[int, int] = {}
        scratch: dict[int, int] = {}
        try:
            for fd in result.fds:
                saved[fd] = os.dup(fd)
                scratch[fd] = _scratch_fd()
                os.dup2(scratch[fd], fd)
            yield result
        finally:
            try:
                _flush_all()
                for fd, orig in saved.items():
                    os.dup2(orig, fd)
                    os.close(orig)
                for fd, handle in scratch.items():
                    os.lseek(handle, 0, os.SEEK_SET)
                    chunks: list[bytes] = []
                    while True:
                        chunk = os.read(handle, 1 << 16)
                        if not chunk:
                            break
                        chunks.append(chunk)
                    os.close(handle)
                    result.text[fd] = b"".join(chunks).decode("utf-8", "replace")
            finally:
                _depth -= 1
                _pending.extend(line.rstrip() for line in result.lines())
                if _depth == 0:
                    lines = list(_pending)
                    _pending.clear()
                    for line in lines:
                        _log.info("%s", line)
