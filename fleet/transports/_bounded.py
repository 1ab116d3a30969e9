"""What the controller keeps of a device command's output: at most a cap per stream.

A broken or hostile agent can print without end (``cases/unbounded-agent-output``: 256 MiB
of output cost the controller ~850 MiB). Every transport's ``run`` collects stdout and
stderr through :class:`CappedBuffer`; past the cap
(:func:`fleet.core.limits.agent_output_limit`, 16 MiB by default) the command is stopped
and :class:`~fleet.core.errors.OutputLimitError` raised, so the controller's memory does
not grow with what a device prints.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import subprocess
import time
from collections.abc import Mapping, Sequence

from fleet.core import errors
from fleet.core.limits import agent_output_limit

__all__ = ["CappedBuffer", "run_capped"]

_READ = 1 << 16


class CappedBuffer:
    """A bytearray that refuses to grow past ``limit`` (``OutputLimitError``)."""

    def __init__(self, stream: str, *, limit: int | None = None, uri: str = "") -> None:
        self.stream = stream
        self.limit = agent_output_limit() if limit is None else limit
        self.uri = uri
        self.data = bytearray()

    def add(self, chunk: bytes) -> None:
        if len(self.data) + len(chunk) > self.limit:
            raise errors.OutputLimitError(
                f"the device printed more than {self.limit} bytes on {self.stream}; the "
                "controller stopped reading (a broken or hostile agent?)",
                uri=self.uri, stream=self.stream, limit=self.limit)
        self.data += chunk

    def __bytes__(self) -> bytes:
        return bytes(self.data)


def run_capped(argv: Sequence[str], *, stdin: bytes | None, timeout: float,
               env: Mapping[str, str] | None = None, uri: str = "",
               limit: int | None = None) -> tuple[int, bytes, bytes]:
    """``subprocess.run(..., capture_output=True)`` with each stream capped: the process
    is killed and :class:`OutputLimitError` raised past the cap; ``TimeoutExpired`` as
    ``subprocess.run`` raises it."""
    proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(env) if env is not None else None)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    deadline = time.monotonic() + timeout
    out = CappedBuffer("stdout", limit=limit, uri=uri)
    err = CappedBuffer("stderr", limit=limit, uri=uri)
    bufs = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    pending = memoryview(stdin or b"")
    in_fd = proc.stdin.fileno()
    sel = selectors.DefaultSelector()
    try:
        for fd in bufs:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        if pending:
            os.set_blocking(in_fd, False)
            sel.register(in_fd, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        open_reads = len(bufs)
        while open_reads:
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(list(argv), timeout)
            for key, _ in sel.select(min(left, 1.0)):
                fd = int(key.fd)
                if fd == in_fd and fd not in bufs:
                    try:
                        n = os.write(fd, pending[:_READ])
                    except BrokenPipeError:
                        n = len(pending)
                    pending = pending[n:]
                    if not pending:
                        sel.unregister(fd)
                        proc.stdin.close()
                    continue
                chunk = os.read(fd, _READ)
                if not chunk:
                    sel.unregister(fd)
                    open_reads -= 1
                    continue
                bufs[fd].add(chunk)
        code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    except BaseException:
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(Exception):
            proc.wait(timeout=5)
        raise
    finally:
        sel.close()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            with contextlib.suppress(OSError):
                f.close()
    return code, bytes(out), bytes(err)
