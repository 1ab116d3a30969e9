"""Ctrl-C during a rollout: stop gently first, at once on a second press.

The first SIGINT (or a SIGTERM, which `fleet deployment cancel` sends) sets the fan-out's
cancel event: no new device starts, devices in flight stop at their next safe point
(:mod:`fleet.rollout.deploy`), and the command prints the partial table and exits 130
with the deployment ``interrupted``. A second SIGINT within ``window_s`` (2 s) stops at
once: ``on_hard`` marks the deployment interrupted (best effort, bounded) and the
process exits 130; if even that write cannot happen, the dead pid in the lease makes the
next command mark it. A later SIGINT outside the window counts as a new first one.
Before the deployment exists (packaging) a SIGINT is a plain ``KeyboardInterrupt``.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from enum import StrEnum
from types import FrameType

__all__ = ["CtrlC", "Press"]


class Press(StrEnum):
    EARLY = "early"  #: nothing to stop gently yet: KeyboardInterrupt
    FIRST = "first"  #: stop starting devices; let in-flight ones reach a safe point
    HARD = "hard"  #: stop now


class CtrlC:
    """The decision (:meth:`press`, on an injected clock) and the signal wiring."""

    def __init__(self, *, on_first: Callable[[], None] = lambda: None,
                 on_hard: Callable[[], None] = lambda: None, window_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cancel = threading.Event()
        self.on_first, self.on_hard = on_first, on_hard
        self.window_s, self.clock = window_s, clock
        self.armed = False  #: True once there is a rollout to stop gently
        self.fired = False  #: a gentle stop was asked for
        self.deployment: uuid.UUID | None = None
        self._first_at: float | None = None

    def created(self, deployment_id: uuid.UUID) -> None:
        """The deployment exists: from now on the first SIGINT stops gently."""
        self.deployment = deployment_id
        self.armed = True

    def press(self, *, gentle_only: bool = False) -> Press:
        """One SIGINT (``gentle_only``: a SIGTERM, never a hard stop)."""
        now = self.clock()
        if not self.armed:
            return Press.EARLY
        if (not gentle_only and self._first_at is not None
                and now - self._first_at <= self.window_s):
            self.on_hard()
            return Press.HARD
        self._first_at = now
        self.fired = True
        self.cancel.set()
        self.on_first()
        return Press.FIRST

    def _handler(self, signum: int, _frame: FrameType | None) -> None:
        if self.press(gentle_only=signum == signal.SIGTERM) is Press.EARLY:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator[CtrlC]:
        """SIGINT and SIGTERM go to :meth:`press` inside the block (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)
