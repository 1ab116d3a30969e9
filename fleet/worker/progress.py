"""A farm worker's push progress, reported to the controller through Redis.

The deploy step reports each chunk of a push (``TaskContext.bytes``); a worker forwards
that, at most every ``every_s`` per device and always at the end of a push, into the
fan-out's hash ``fleet:bytes:<token>`` (:func:`fleet.worker.broker.bytes_key`, field:
the device, value ``"DONE TOTAL"``, expiring with the fan-out). The controller's
dispatcher reads the hash once a second and hands it to the same ``on_bytes`` hook an
in-process push calls, so the progress display shows farm pushes byte by byte too.
Progress is best effort: a broker that cannot be written loses a report, never a push.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

from fleet.worker.broker import bytes_key

__all__ = ["BytesReporter", "OnBytes"]

OnBytes = Callable[[str, int, int], None]
#: writes one report: (hash key, device, "DONE TOTAL", seconds to keep the hash)
Write = Callable[[str, str, str, int], None]
_KEEP_S = 2 * 24 * 3600


class BytesReporter:
    """Throttled push-progress reports of one worker process (thread-safe)."""

    def __init__(self, write: Write, *, every_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.write, self.every_s, self.clock = write, every_s, clock
        self._last: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def for_fanout(self, token: str) -> OnBytes | None:
        """The ``on_bytes`` hook for the tasks of fan-out ``token`` (None without one)."""
        if not token:
            return None
        key = bytes_key(token)

        def on_bytes(device: str, done: int, total: int) -> None:
            now = self.clock()
            with self._lock:
                last = self._last.get((token, device))
                if done < total and last is not None and now - last < self.every_s:
                    return
                if done >= total:
                    self._last.pop((token, device), None)
                else:
                    self._last[(token, device)] = now
            with contextlib.suppress(Exception):  # best effort (module docstring)
                self.write(key, device, f"{int(done)} {int(total)}", _KEEP_S)

        return on_bytes


def redis_writer(client: object) -> Write:
    """A :data:`Write` over a redis-py client (``HSET`` and ``EXPIRE`` in one pipeline)."""
    def write(key: str, device: str, value: str, keep_s: int) -> None:
        pipe = client.pipeline()  # type: ignore[attr-defined]
        pipe.hset(key, device, value)
        pipe.expire(key, keep_s)
        pipe.execute()

    return write
