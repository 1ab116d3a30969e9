"""The CLI's logging: quiet by default, ``-v``/``-vv`` to see what the libraries say.

One handler on the root logger writes to the *current* ``sys.stderr`` (so a test runner
that swaps it sees the lines), one line per record: ``LEVEL name: message``.

=========  =================  ===============================  ==========================
``-v``     fleet's loggers    MNN's native output              paramiko
=========  =================  ===============================  ==========================
(none)     WARNING, no        hidden (``fleet.mnn``, INFO)     off: its errors come back
           tracebacks                                          as the command's own one
                                                               ``error:`` line
``-v``     INFO               shown                            WARNING and up, with the
                                                               tracebacks it logs
``-vv``    DEBUG              shown                            DEBUG (every packet)
=========  =================  ===============================  ==========================

MNN writes from C++ straight to file descriptors 1 and 2; the controller runs every MNN
call inside :func:`fleet.core.mnn.fdcapture.capture_fds`, which hands what it caught to
the ``fleet.mnn`` logger at INFO, so it reaches the operator only here, with ``-v``.
Python warnings go through logging too (``py.warnings``, shown with ``-v``).
"""

from __future__ import annotations

import logging
import sys

__all__ = ["configure"]

#: libraries whose own logging is noise at the default level: their failures reach the
#: operator as the FleetError the transport maps them to
_NOISY = ("paramiko", "tidevice", "adbutils", "urllib3", "celery", "kombu")
_OFF = logging.CRITICAL + 10


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg,unused-ignore]
    """A handler bound to whatever ``sys.stderr`` is when a record is written."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override,unused-ignore]
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:  # StreamHandler.__init__ assigns it
        pass


class _OneLine(logging.Formatter):
    """``LEVEL name: message`` on one line; tracebacks only when ``detail``."""

    def __init__(self, detail: bool) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")
        self.detail = detail

    def format(self, record: logging.LogRecord) -> str:
        if self.detail:
            return super().format(record)
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return " | ".join(super().format(record).splitlines())
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


_handler: _StderrHandler | None = None


def configure(verbosity: int = 0) -> None:
    """Set the levels for one command line (``verbosity``: how many ``-v``); idempotent."""
    global _handler
    root = logging.getLogger()
    if _handler is None:
        _handler = _StderrHandler()
        root.addHandler(_handler)
        logging.captureWarnings(True)
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 \
        else logging.DEBUG
    _handler.setLevel(level)
    _handler.setFormatter(_OneLine(detail=verbosity > 0))
    root.setLevel(level)
    logging.getLogger("fleet").setLevel(level)
    logging.getLogger("py.warnings").setLevel(logging.INFO if verbosity else logging.ERROR)
    for name in _NOISY:
        logging.getLogger(name).setLevel(
            _OFF if verbosity <= 0 else logging.WARNING if verbosity == 1 else logging.DEBUG)
