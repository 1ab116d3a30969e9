"""Per-device rate limits: a token bucket per key (device id, or client address before
authentication), in each worker process. Each uvicorn worker limits on its own, so the
effective bound is ``workers`` times the configured one; a device keeps one connection,
so in practice it meets one worker. Memory: one small entry per key seen in the last
idle period; idle entries are dropped as the table is swept."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from fleet.core import errors

__all__ = ["RateLimiter"]


class RateLimiter:
    def __init__(self, per_min: float, burst: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = per_min / 60.0
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()
        self._swept = clock()

    def take(self, key: str) -> None:
        """One request for ``key``; RateLimitedError (HTTP 429) when its bucket is empty."""
        now = self.clock()
        with self._lock:
            tokens, at = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            if tokens < 1.0:
                wait = (1.0 - tokens) / self.rate
                self._buckets[key] = (tokens, now)
                raise errors.RateLimitedError("too many requests from this device",
                                              status=429, retry_after_s=round(wait, 1))
            self._buckets[key] = (tokens - 1.0, now)
            if now - self._swept > 60.0:
                full = self.burst / self.rate
                self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < full}
                self._swept = now
