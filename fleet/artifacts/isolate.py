"""Run MNN work in a child process that may die, so the controller survives it.

Why (FIELD-NOTES "MNN can crash natively"): MNN 3.6.1 dies with SIGFPE creating a session
for a legal ONNX MaxPool without ``strides`` and with SIGILL/SIGSEGV on other inputs. In
the controller's own process that ends ``fleet deploy`` with no message and no JSON. So
every MNN load, conversion and run on the controller (``mnninfo.validate_mnn``,
``convert.convert_model``, ``reference.make_golden``) calls :func:`run_isolated`:

- a child killed by a signal becomes ``error(f"{what}: MNN crashed (SIGFPE)")``, the
  caller choosing the class (``InvalidModelError``, exit 9; ``ConversionError``, exit 10);
- a :class:`FleetError` raised in the child is raised again in the parent as the same
  class with the same message and details; any other exception becomes ``error`` with its
  one-line text (``TypeName: message``), never a traceback;
- the child's fd 1 points at fd 2 for its whole life: MNN prints its banner and lines such
  as ``getshape: unable to get variable info`` on C stdout, and the CLI's stdout carries
  ``--json``;
- the child logs at the level the parent's ``fleet.mnn`` logger has (so ``fleet -v``
  shows what MNN printed there too, on stderr, through :mod:`logging`);
- the child writes no core file (``RLIMIT_CORE`` 0): a dump of a process holding a
  model is slow to write (seconds) and leaves the model's plaintext on disk;
- ``timeout_s``: the child is killed after that many seconds and ``error`` says so.

Start method: ``forkserver``. ``fork`` copies a process that may hold threads (the CLI's
fan-out pool, rich's progress refresh, onnxruntime's pools) and can deadlock the child on
a lock some other thread held; ``spawn`` starts a fresh interpreter every time. The fork
server is one clean single-threaded process started on first use; it imports the main
module (so a script calling this must guard its entry point with ``if __name__ ==
"__main__"``, as for any multiprocessing user) and :data:`_PRELOAD` (numpy and the
artifacts modules, not MNN, whose import prints); each call forks from it. Measured on the
controller's x86-64 build machine (Python 3.11, pymnn 3.6.1): the first call ~0.5-0.9 s
(server start), then ~0.015-0.03 s per call; ``import MNN`` in the child adds ~0.02 s;
``spawn`` costs ~0.24 s per call before any import. A function from a module the server
has not imported pays that module's import in every child.
Arguments and results cross by pickle, so ``fn`` must be a module-level function and
results should be plain data (numpy arrays are fine).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import pickle
import resource
import signal
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from fleet.core.errors import FleetError

__all__ = ["run_isolated"]

T = TypeVar("T")
_CTX: Any = None
#: imported once by the fork server (not MNN: its import prints), so a call costs a fork
_PRELOAD = ("numpy", "fleet.artifacts.isolate", "fleet.artifacts.convert",
            "fleet.artifacts.mnninfo")


def _context() -> Any:
    global _CTX
    if _CTX is None:
        methods = mp.get_all_start_methods()
        _CTX = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
        if "forkserver" in methods:
            _CTX.set_forkserver_preload(["__main__", *_PRELOAD])
    return _CTX


def _signal_name(exitcode: int) -> str:
    try:
        return signal.Signals(-exitcode).name
    except ValueError:
        return f"signal {-exitcode}"


def _child(conn: Connection, fn: Callable[..., Any], args: tuple[Any, ...],
           kwargs: dict[str, Any], log_level: int = logging.WARNING) -> None:
    """Child side: no core dump, stdout to stderr, call ``fn``, send the outcome."""
    with contextlib.suppress(ValueError, OSError):  # a crash writes no core file
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    sys.stdout.flush()
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    if log_level < logging.WARNING:  # the parent runs with -v: what MNN says is wanted
        logging.basicConfig(level=log_level, stream=sys.stderr,
                            format="%(levelname)s %(name)s: %(message)s")
    try:
        result: tuple[Any, ...] = ("ok", fn(*args, **kwargs))
    except FleetError as exc:
        result = ("fleet", type(exc), exc.message, exc.details)
        try:
            pickle.dumps(result)
        except Exception:  # details that do not pickle are dropped, the error is not
            result = ("fleet", type(exc), exc.message, {})
    except BaseException as exc:  # the child reports everything; the parent decides
        text = str(exc).strip().splitlines()
        result = ("other", f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": "))
    try:
        conn.send(result)
    except Exception as exc:  # e.g. an unpicklable return value
        conn.send(("other", f"result could not be sent back: {exc}"))
    finally:
        conn.close()
        sys.stderr.flush()


def run_isolated(fn: Callable[..., T], *args: Any, what: str, error: type[FleetError],
                 timeout_s: float | None = None, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a child process; its return value, or an error here.

    ``what``: the subject of any error line (``"validating model.mnn"``). ``error``: the
    class for a crash, a timeout or a non-Fleet exception. Raises a FleetError of the
    child's class, or ``error`` (``"{what}: MNN crashed (SIGFPE)"``, ``"{what}: timed out
    after N s"``, ``"{what}: ValueError: ..."``).
    """
    ctx = _context()
    parent_end, child_end = ctx.Pipe(duplex=False)
    level = logging.getLogger("fleet.mnn").getEffectiveLevel()
    proc = ctx.Process(target=_child, args=(child_end, fn, args, kwargs, level), daemon=True)
    sys.stdout.flush()
    proc.start()
    child_end.close()
    try:
        if not parent_end.poll(timeout_s):
            proc.kill()
            proc.join()
            raise error(f"{what}: timed out after {timeout_s:g} s", timeout_s=timeout_s)
        message = parent_end.recv()
    except EOFError:  # the child died without a word: a signal or os._exit
        proc.join()
        code = proc.exitcode if proc.exitcode is not None else 0
        if code < 0:
            name = _signal_name(code)
            raise error(f"{what}: MNN crashed ({name})", signal=name) from None
        raise error(f"{what}: the worker process exited with status {code}",
                    exit_status=code) from None
    finally:
        parent_end.close()
    proc.join()
    kind = message[0]
    if kind == "ok":
        value: T = message[1]
        return value
    if kind == "fleet":
        cls, text, details = message[1], message[2], message[3]
        raise cls(text, **details)
    raise error(f"{what}: {message[1]}")
