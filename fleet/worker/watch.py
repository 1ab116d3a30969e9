"""A worker's watch over the tasks it runs: a controller's cancel, a lost lease.

One thread per worker process reads every running task's cancel key in one ``MGET``
every ``interval_s`` (the controller sets ``fleet:cancel:<token>`` on Ctrl-C or a lost
lease) and, every ``check_every_s``, runs each task's checks (a deployment task checks
that the deployment is still running under the controller that sent it). Either sets the
task's cancel event, which the fan-out and the deploy steps already honour: queued
retries stop, a device in flight stops at its next safe point.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from fleet.worker.broker import cancel_key

__all__ = ["CancelWatch"]

Check = Callable[[], bool]  #: False: stop the task
Mget = Callable[[Sequence[str]], Sequence[object]]


@dataclass
class _Watched:
    token: str
    event: threading.Event
    checks: list[Check] = field(default_factory=list)


class CancelWatch:
    def __init__(self, mget: Mget, *, interval_s: float = 0.5,
                 check_every_s: float = 5.0) -> None:
        self.mget, self.interval_s, self.check_every_s = mget, interval_s, check_every_s
        self._watched: dict[int, _Watched] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> CancelWatch:
        self._thread = threading.Thread(target=self._run, name="cancel-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    @contextlib.contextmanager
    def watching(self, token: str, event: threading.Event, checks: list[Check]
                 ) -> Iterator[None]:
        """Watch one task while the block runs; the token is read once at once, so a
        task sent before a cancel but started after it never begins."""
        self.poll_once([_Watched(token, event, checks)], run_checks=False)
        key = next(self._ids)
        with self._lock:
            self._watched[key] = _Watched(token, event, checks)
        try:
            yield
        finally:
            with self._lock:
                self._watched.pop(key, None)

    def poll_once(self, watched: list[_Watched], *, run_checks: bool) -> None:
        if not watched:
            return
        try:
            values = self.mget([cancel_key(w.token) for w in watched])
        except Exception:  # the broker blinked: the next round reads again
            values = [None] * len(watched)
        for w, value in zip(watched, values, strict=True):
            if value is not None:
                w.event.set()
            elif run_checks:
                for check in w.checks:
                    try:
                        ok = check()
                    except Exception:  # a registry hiccup is not a verdict
                        ok = True
                    if not ok:
                        w.event.set()

    def _run(self) -> None:
        rounds = max(1, round(self.check_every_s / self.interval_s))
        for n in itertools.count(1):
            if self._stop.wait(self.interval_s):
                return
            with self._lock:
                watched = [w for w in self._watched.values() if not w.event.is_set()]
            self.poll_once(watched, run_checks=n % rounds == 0)
