"""Run one piece of MNN work in a child process that may die.

Why (FIELD-NOTES "MNN can crash natively"): MNN 3.6.1 dies with SIGFPE creating a session
for a legal model (a MaxPool without its optional ``strides``). The agent loads new models
by design, so every load, run and benchmark of a candidate happens in a child process: a
crash fails that piece of work, and the agent goes on to the others and still prints its
one JSON document.

How:
- A fresh interpreter (``python -m fleet_agent.contained``), not ``os.fork()``: once MNN
  has run a multi-threaded session in a process, its thread pool is gone in a forked
  child and the child spins forever (checked with pymnn 3.6.1: a 4-thread session in the
  parent, a 2-thread session in the child). A fresh process has no such state.
- The payload stays in memory: the memfd that holds the decrypted model is passed to the
  child with ``pass_fds`` under the same number, so ``/proc/self/fd/N`` names the same
  memfd there. Nothing is written to disk, nothing goes through a pipe.
- The job is a ``"module:function"`` target called as ``fn(spec, arrays)`` with a JSON
  spec and named arrays, and returns ``(data, arrays)``. Both directions travel as
  ``.npz`` files without pickles in memfds: the child ran an untrusted model, its answer
  is data and is parsed as data.
- The child's fds 1 and 2 go to a third memfd: nothing it (or MNN in it) prints reaches
  the agent's stdout; the parent reads the text back as evidence, also after a crash (with
  the Python stack that ``faulthandler`` writes when a signal kills the child).
- Core dumps are off in the child (RLIMIT_CORE 0): a dump would hold the plaintext.
- A deadline: a child that hangs is killed (SIGKILL) and reported as timed out.

With ``isolate=False`` the target runs in-process, uncontained (for debugging).
"""

from __future__ import annotations

import contextlib
import faulthandler
import importlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fleet.core import errors
from fleet.core.protocol import fail

__all__ = ["ChildOutcome", "Target", "run_contained", "signal_name"]

Target = Callable[[dict[str, Any], dict[str, np.ndarray]],
                  tuple[dict[str, Any], dict[str, np.ndarray]]]

_RESULT_KEY = "__result__"
_LOG_LINES = 20
_MAX_RESULT_BYTES = 512 << 20
_FD_PATH = re.compile(r"^/proc/(?:self|\d+)/fd/(\d+)$")


def signal_name(signum: int) -> str:
    """``8`` -> ``"SIGFPE"`` (``"signal 99"`` for a number Python has no name for)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@dataclass
class ChildOutcome:
    """What became of one job.

    ``ok``: it returned; ``data``/``arrays`` hold its result. Otherwise one of: ``signal``
    (the child died of it, e.g. ``"SIGFPE"``), ``timed_out``, ``error`` (the job raised:
    the agent protocol's error dict ``{"code", "message", "details"}``) or ``exit_code``
    (the child exited without a result).
    """

    ok: bool
    data: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    signal: str | None = None
    signum: int | None = None
    exit_code: int | None = None
    timed_out: bool = False
    error: dict[str, Any] | None = None
    log: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def crashed(self) -> bool:
        """The process died (signal, timeout, exit without a result), not a Python error."""
        return not self.ok and self.error is None

    def describe(self) -> str:
        if self.ok:
            return "completed"
        if self.signal is not None:
            return f"crashed: killed by {self.signal} (signal {self.signum})"
        if self.timed_out:
            return f"timed out after {self.wall_s:.0f} s (killed)"
        if self.error is not None:
            return f"{self.error.get('message')}"
        return f"exited with status {self.exit_code} without a result"

    def raise_error(self) -> None:
        """Re-raise a job's error in the parent as the class the child raised."""
        if self.error is not None:
            raise errors.error_from_code(str(self.error.get("code")),
                                         str(self.error.get("message")),
                                         dict(self.error.get("details") or {}))

    def crash_dict(self) -> dict[str, Any]:
        return {"signal": self.signal, "signum": self.signum, "timed_out": self.timed_out,
                "exit_code": self.exit_code, "log": self.log}


def _memfd(name: str) -> int:
    if hasattr(os, "memfd_create"):
        with contextlib.suppress(OSError):
            return os.memfd_create(name, os.MFD_CLOEXEC)
    import tempfile

    handle, path = tempfile.mkstemp(prefix=f"fleet-{name}-")
    os.unlink(path)
    return handle


def _read_all(fd: int, limit: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks, total = [], 0
    while chunk := os.read(fd, 1 << 20):
        total += len(chunk)
        if total > limit:
            raise errors.DeviceError("a contained job returned too much data", size=total)
        chunks.append(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _encode(data: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    doc = json.dumps(data, sort_keys=True, default=str).encode()
    everything: dict[str, np.ndarray] = {**arrays, _RESULT_KEY: np.frombuffer(doc, np.uint8)}
    buf = io.BytesIO()
    np.savez(buf, **everything)  # type: ignore[arg-type]
    return buf.getvalue()


def _decode(blob: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        data = json.loads(bytes(npz[_RESULT_KEY]).decode())
        arrays = {k: npz[k] for k in npz.files if k != _RESULT_KEY}
    if not isinstance(data, dict):
        raise ValueError("result is not a JSON object")
    return data, arrays


def _resolve(target: str) -> Target:
    module, _, name = target.partition(":")
    fn: Target = getattr(importlib.import_module(module), name)
    return fn


def _in_process(target: str, spec: dict[str, Any], arrays: dict[str, np.ndarray]
                ) -> ChildOutcome:
    start = time.monotonic()
    try:
        data, out = _resolve(target)(spec, arrays)
    except Exception as exc:
        return ChildOutcome(ok=False, error=fail("job", exc)["error"],
                            wall_s=time.monotonic() - start)
    return ChildOutcome(ok=True, data=data, arrays=out, wall_s=time.monotonic() - start)


def _fds_of(paths: Sequence[str]) -> list[int]:
    """Descriptor numbers named by ``/proc/self/fd/N`` paths (memfds to pass on)."""
    fds = []
    for path in paths:
        match = _FD_PATH.match(str(path))
        if match:
            fds.append(int(match.group(1)))
    return fds


def run_contained(target: str, spec: dict[str, Any], arrays: dict[str, np.ndarray]
                  | None = None, *, fd_paths: Sequence[str] = (), timeout_s: float = 600.0,
                  isolate: bool = True) -> ChildOutcome:
    """Call ``target`` (``"module:function"``) as ``fn(spec, arrays)`` in a child process.

    ``fd_paths``: ``/proc/self/fd/N`` paths the job opens (the decrypted model's memfd);
    their descriptors are passed to the child under the same numbers.
    Never raises for what the job does (a crash, a hang, an exception): that is in the
    outcome. ``timeout_s``: wall-clock deadline of the child, in seconds.
    """
    arrays = dict(arrays or {})
    if not isolate:
        return _in_process(target, spec, arrays)
    job_fd, result_fd, log_fd = (_memfd("fleet-job"), _memfd("fleet-job-result"),
                                 _memfd("fleet-job-log"))
    start = time.monotonic()
    try:
        _write_all(job_fd, _encode({"target": target, "spec": spec}, arrays))
        argv = [sys.executable, "-m", "fleet_agent.contained", str(job_fd), str(result_fd)]
        passed = sorted({job_fd, result_fd, *_fds_of(fd_paths)})
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_fd,
                                stderr=log_fd, pass_fds=passed, close_fds=True)
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            proc.wait()
        wall = time.monotonic() - start
        log_text = _read_all(log_fd, 8 << 20).decode("utf-8", "replace")
        lines = [line for line in log_text.splitlines() if line.strip()]
        # the head holds what MNN said, the tail the Python stack faulthandler wrote
        log = lines if len(lines) <= 2 * _LOG_LINES else [
            *lines[:_LOG_LINES], f"... {len(lines) - 2 * _LOG_LINES} line(s) ...",
            *lines[-_LOG_LINES:]]
        out = ChildOutcome(ok=False, log=log, wall_s=wall, timed_out=timed_out)
        if proc.returncode < 0:
            out.signum = -proc.returncode
            out.signal = None if timed_out else signal_name(out.signum)
            return out
        out.exit_code = proc.returncode
        blob = _read_all(result_fd, _MAX_RESULT_BYTES)
        if out.exit_code not in (0, 1) or not blob:
            return out
        try:
            doc, result_arrays = _decode(blob)
        except (ValueError, KeyError, OSError, UnicodeDecodeError) as exc:
            out.error = {"code": errors.DeviceError.code, "details": {},
                         "message": f"a contained job's result is unreadable: {exc}"}
            return out
        if doc.get("ok"):
            out.ok, out.data, out.arrays = True, dict(doc.get("data") or {}), result_arrays
        else:
            out.error = dict(doc.get("error") or {"code": "internal", "message": "?"})
        return out
    finally:
        for fd in (job_fd, result_fd, log_fd):
            os.close(fd)


def _child_main(argv: Sequence[str]) -> int:
    """The child: read the job, run it, write the result; exit 0 (ok) or 1 (error)."""
    job_fd, result_fd = int(argv[0]), int(argv[1])
    with contextlib.suppress(Exception):
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with contextlib.suppress(Exception):  # a crash leaves its Python stack as evidence
        faulthandler.enable(file=sys.stderr, all_threads=False)
    try:
        job, arrays = _decode(_read_all(job_fd, _MAX_RESULT_BYTES))
        data, out = _resolve(str(job["target"]))(dict(job["spec"]), arrays)
        blob, code = _encode({"ok": True, "data": data}, out), 0
    except BaseException as exc:  # the parent gets the error as data
        blob, code = _encode({"ok": False, "error": fail("job", exc)["error"]}, {}), 1
    _write_all(result_fd, blob)
    return code


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
