"""The fan-out executor: many devices at once, one outcome each.

A bounded worker pool, a deadline per device, retries only for retryable transport errors
(capped exponential backoff with jitter), and one failure never hides the others: every
device gets an :class:`Outcome`. Concurrency lives here and nowhere else.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from fleet.core import errors

__all__ = ["Deadline", "FanOut", "Outcome", "TaskContext"]

T = TypeVar("T")
R = TypeVar("R")


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def remaining(self, floor: float = 1.0) -> float:
        return max(floor, self.at - time.monotonic())

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.at


@dataclass
class TaskContext:
    """Handed to each device's task: its deadline, a cancel hook, progress reporting."""

    name: str
    deadline: Deadline
    on_bytes: Callable[[str, int, int], None] | None = None
    on_state: Callable[[str, str], None] | None = None
    attempt: int = 0
    _closers: list[Callable[[], None]] = field(default_factory=list)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def add_closer(self, fn: Callable[[], None]) -> None:
        """Register something (a transport's close) that unblocks the task when cancelled."""
        self._closers.append(fn)

    def cancel(self) -> None:
        self._cancelled.set()
        for fn in list(self._closers):
            # closing a broken connection may itself fail
            with contextlib.suppress(Exception):
                fn()

    def check(self) -> None:
        if self._cancelled.is_set() or self.deadline.expired:
            raise errors.TransportTimeout(f"{self.name}: deadline exceeded", device=self.name)

    def bytes(self, done: int, total: int) -> None:
        if self.on_bytes:
            self.on_bytes(self.name, done, total)

    def state(self, value: str) -> None:
        if self.on_state:
            self.on_state(self.name, value)


@dataclass
class Outcome(Generic[R]):
    name: str
    ok: bool
    result: R | None = None
    error: errors.FleetError | None = None
    attempts: int = 1
    duration_s: float = 0.0


class FanOut:
    def __init__(self, *, workers: int = 8, deadline_s: float = 900.0, retries: int = 2,
                 backoff_base: float = 0.5, backoff_cap: float = 8.0,
                 on_bytes: Callable[[str, int, int], None] | None = None,
                 on_state: Callable[[str, str], None] | None = None,
                 on_done: Callable[[Outcome[Any]], None] | None = None) -> None:
        self.workers = max(1, workers)
        self.deadline_s = deadline_s
        self.retries = max(0, retries)
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.on_bytes = on_bytes
        self.on_state = on_state
        self.on_done = on_done

    def _backoff(self, attempt: int) -> float:
        return float(min(self.backoff_cap, self.backoff_base * 2 ** attempt) *
                     random.uniform(0.5, 1.0))

    def _one(self, name: str, item: T, fn: Callable[[T, TaskContext], R],
             ctx: TaskContext) -> Outcome[R]:
        start = time.monotonic()
        attempt = 0
        while True:
            ctx.attempt = attempt
            try:
                ctx.check()
                result = fn(item, ctx)
                return Outcome(name, True, result=result, attempts=attempt + 1,
                               duration_s=time.monotonic() - start)
            except errors.FleetError as exc:
                err = exc
            except Exception as exc:  # a bug in a task must not take the others down
                err = errors.FleetError(f"{name}: {type(exc).__name__}: {exc}")
                err.__cause__ = exc
            if not err.retryable or attempt >= self.retries or ctx.deadline.expired:
                return Outcome(name, False, error=err, attempts=attempt + 1,
                               duration_s=time.monotonic() - start)
            pause = min(self._backoff(attempt), max(0.0, ctx.deadline.at - time.monotonic()))
            ctx.state(f"retry in {pause:.1f}s ({err.code})")
            time.sleep(pause)
            attempt += 1

    def run(self, items: Mapping[str, T], fn: Callable[[T, TaskContext], R]
            ) -> dict[str, Outcome[R]]:
        """Run ``fn(item, ctx)`` for every item; returns every device's outcome."""
        outcomes: dict[str, Outcome[R]] = {}
        contexts: dict[str, TaskContext] = {}
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="fanout")
        futures: dict[Future[Outcome[R]], str] = {}
        try:
            for name, item in items.items():
                # the deadline starts when the task starts, not while it queues
                ctx = TaskContext(name, Deadline(self.deadline_s), self.on_bytes, self.on_state)
                contexts[name] = ctx

                def task(name: str = name, item: T = item, ctx: TaskContext = ctx
                         ) -> Outcome[R]:
                    ctx.deadline = Deadline(self.deadline_s)
                    return self._one(name, item, fn, ctx)

                futures[pool.submit(task)] = name
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for fut in done:
                    name = futures[fut]
                    outcome = fut.result()
                    outcomes[name] = outcome
                    if self.on_done:
                        self.on_done(outcome)
                for fut in list(pending):
                    name = futures[fut]
                    ctx = contexts[name]
                    # past the deadline plus a grace period: cancel (closes its transport)
                    if fut.running() and time.monotonic() > ctx.deadline.at + 5.0:
                        ctx.cancel()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return {name: outcomes[name] for name in items if name in outcomes}
