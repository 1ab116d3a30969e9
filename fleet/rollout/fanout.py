"""The one fan-out: :func:`call_each` runs a task on many devices, one outcome each.

Every command that touches many devices (deploy, waves, rollback, audit, lora, bootstrap)
goes through here, so concurrency, deadlines, retries and failure counting live in one
place (fabric's ``GroupResult``, with a bounded pool and a deadline per device):

- a bounded worker pool (``workers``);
- a deadline per device that starts when its task starts, not while it queues; past it
  plus ``grace_s`` the device's registered closers run (its transport is closed), which
  unblocks a call stuck on a dead peer;
- retries only of errors marked ``retryable`` (transport faults), at most ``retries``,
  with capped exponential backoff and jitter, never past the deadline;
- a cancel event: once set no new device starts (they end ``CANCELLED``) and no new retry
  starts; calls in flight finish;
- one result type, :class:`FleetResult` of :class:`DeviceOutcome` with a
  :class:`DeviceStatus`; :meth:`FleetResult.raise_for_failures` is the one place that
  turns failures into an error (and so the exit code).

Where the devices run is the one seam here: in this process (the thread pool above), or,
given a :class:`Remote` description of the task and a :class:`Dispatcher` (with a broker
configured, :func:`fleet.worker.dispatch.dispatcher_for`), each device whose record names
a farm host (``via``) as a Celery task on that host's worker, which runs the same task
through this same function for one device; the outcomes come back as one
:class:`FleetResult` either way.

Time comes from ``clock``/``sleep`` so tests run on a fake clock.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Generic, Protocol, TypeVar

from fleet.core import errors

__all__ = [
    "Backoff",
    "Deadline",
    "DeviceOutcome",
    "DeviceStatus",
    "DispatchOptions",
    "Dispatcher",
    "FleetResult",
    "Remote",
    "TaskContext",
    "call_each",
    "status_for",
]

_log = logging.getLogger("fleet.fanout")
T = TypeVar("T")
R = TypeVar("R")
Clock = Callable[[], float]


class DeviceStatus(StrEnum):
    """How one device's part of a fan-out ended."""

    OK = "ok"
    STAGED = "staged"  #: pushed and verified, not activated (``--no-activate``)
    SKIPPED = "skipped"  #: nothing to do (already runs it)
    FAILED = "failed"
    UNREACHABLE = "unreachable"  #: could not connect, or the connection dropped
    TIMED_OUT = "timed_out"  #: its deadline passed
    CANCELLED = "cancelled"  #: never started: the fan-out was cancelled
    ROLLED_BACK = "rolled_back"  #: activated, then switched back by a failed wave gate
    ROLLBACK_FAILED = "rollback_failed"
    NOT_STARTED = "not_started"  #: a later wave of a halted rollout

    @property
    def succeeded(self) -> bool:
        return self in (DeviceStatus.OK, DeviceStatus.STAGED, DeviceStatus.SKIPPED)

    @property
    def label(self) -> str:
        """The word of the CLI's ``status`` column and JSON field (stable since wave 1):
        every kind of failure reads ``failed``; the exact status is ``outcome``."""
        if self in (DeviceStatus.UNREACHABLE, DeviceStatus.TIMED_OUT):
            return "failed"
        return self.value.replace("_", " ")


_UNREACHABLE: tuple[type[errors.FleetError], ...] = (
    errors.ConnectError, errors.DeviceOfflineError, errors.ConnectionLostError,
    errors.HostKeyError, errors.AuthError)


def status_for(err: errors.FleetError, *, deadline_expired: bool = False) -> DeviceStatus:
    """The failed status an error stands for."""
    if deadline_expired or isinstance(err, errors.TransportTimeout):
        return DeviceStatus.TIMED_OUT
    if isinstance(err, _UNREACHABLE):
        return DeviceStatus.UNREACHABLE
    if isinstance(err, errors.RolloutCancelledError):
        return DeviceStatus.CANCELLED
    return DeviceStatus.FAILED


class Deadline:
    """An instant on ``clock``'s time line (seconds)."""

    def __init__(self, seconds: float, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self.at = clock() + seconds

    def remaining(self, floor: float = 1.0) -> float:
        """Seconds left, at least ``floor`` (a call always gets a usable timeout; the
        watchdog closes the transport when the deadline really passes)."""
        return max(floor, self.at - self.clock())

    @property
    def expired(self) -> bool:
        return self.clock() >= self.at


@dataclass(frozen=True)
class Backoff:
    """Pause before retry ``attempt`` (0-based): ``min(cap, base * 2**attempt)`` scaled by
    a jitter factor drawn uniformly from ``[jitter, 1]``."""

    base: float = 0.5
    cap: float = 8.0
    jitter: float = 0.5

    def pause(self, attempt: int, rng: random.Random) -> float:
        return float(min(self.cap, self.base * 2 ** attempt) * rng.uniform(self.jitter, 1.0))


@dataclass
class TaskContext:
    """Handed to each device's task: its deadline, the attempt, a closer registry (what the
    watchdog runs past the deadline), progress hooks and the status to finish with."""

    name: str
    deadline: Deadline
    on_bytes: Callable[[str, int, int], None] | None = None
    on_state: Callable[[str, str], None] | None = None
    attempt: int = 0
    #: set by the task when it ends well but not plainly ``OK`` (skipped, staged)
    status: DeviceStatus = DeviceStatus.OK
    reason: str = ""
    _closers: list[Callable[[], None]] = field(default_factory=list)
    _aborted: threading.Event = field(default_factory=threading.Event)

    def add_closer(self, fn: Callable[[], None]) -> None:
        """Register something (a transport's close) that unblocks the task when aborted."""
        self._closers.append(fn)

    def finish_as(self, status: DeviceStatus, reason: str = "") -> None:
        """End this device with ``status`` (must be a success) when the task returns."""
        if not status.succeeded:
            raise ValueError(f"{status} is a failure: raise the error instead")
        self.status, self.reason = status, reason

    def abort(self) -> None:
        """Past the deadline: run the closers so a blocked call returns with an error."""
        if self._aborted.is_set():
            return
        self._aborted.set()
        for fn in list(self._closers):
            with contextlib.suppress(Exception):  # closing a broken connection may fail
                fn()

    def check(self) -> None:
        """Between steps: stop when the deadline passed (retryable: another attempt would
        start only if time were left, and it is not)."""
        if self._aborted.is_set() or self.deadline.expired:
            raise errors.TransportTimeout(f"{self.name}: deadline exceeded", device=self.name)

    def bytes(self, done: int, total: int) -> None:
        if self.on_bytes:
            self.on_bytes(self.name, done, total)

    def state(self, value: str) -> None:
        if self.on_state:
            self.on_state(self.name, value)

    def _new_attempt(self, attempt: int) -> None:
        self.attempt = attempt
        self.status, self.reason = DeviceStatus.OK, ""
        self._closers.clear()


@dataclass
class DeviceOutcome(Generic[R]):
    """One device's end: its status, the task's result or the error, attempts, timings
    (seconds on the fan-out's clock)."""

    device: str
    status: DeviceStatus
    result: R | None = None
    error: errors.FleetError | None = None
    reason: str = ""
    attempts: int = 0
    started_at: float | None = None
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status.succeeded

    def error_text(self) -> str | None:
        """``"code: message"``, the form the audit and rollback tables print."""
        return f"{self.error.code}: {self.error.message}" if self.error else None


@dataclass
class FleetResult(Generic[R]):
    """Every device's outcome, in target order; a failure never hides the others."""

    outcomes: dict[str, DeviceOutcome[R]] = field(default_factory=dict)

    def __iter__(self) -> Iterator[DeviceOutcome[R]]:
        return iter(list(self.outcomes.values()))

    def __len__(self) -> int:
        return len(self.outcomes)

    def __getitem__(self, device: str) -> DeviceOutcome[R]:
        return self.outcomes[device]

    def add(self, outcome: DeviceOutcome[R]) -> None:
        self.outcomes[outcome.device] = outcome

    def extend(self, other: FleetResult[R]) -> None:
        for o in other:
            self.add(o)

    def sorted_by(self, names: Sequence[str]) -> FleetResult[R]:
        """The same outcomes in the order of ``names`` (others after, as they were)."""
        rank = {n: i for i, n in enumerate(names)}
        ordered = sorted(self.outcomes.values(), key=lambda o: rank.get(o.device, len(rank)))
        return FleetResult({o.device: o for o in ordered})

    @property
    def succeeded(self) -> list[DeviceOutcome[R]]:
        return [o for o in self if o.ok]

    @property
    def failed(self) -> list[DeviceOutcome[R]]:
        return [o for o in self if not o.ok]

    @property
    def ok(self) -> bool:
        return not self.failed

    def raise_for_failures(self, what: str = "fan-out") -> None:
        """The one rule for a fan-out's exit: any device not succeeded (failed, timed out,
        cancelled, rolled back, not started) raises :class:`PartialFailureError` naming each
        device's status and error code, chained from the first error. Its exit code is 20,
        unless no device succeeded and every one failed with the same error class: then it
        exits as that class would (``exit_as``; e.g. 16 when every device's disk is full).
        The per-device error classes stay in the result (the table shows them)."""
        failed = self.failed
        if not failed:
            return
        codes = {o.device: (o.error.code if o.error else o.status.value) for o in failed}
        listed = ", ".join(f"{n} ({c})" for n, c in list(codes.items())[:8])
        more = f" and {len(codes) - 8} more" if len(codes) > 8 else ""
        first = next((o.error for o in failed if o.error), None)
        why = f": {first.message}" if len(failed) == 1 and first is not None else ""
        exc = errors.PartialFailureError(
            f"{what}: {len(failed)} of {len(self)} device(s) did not succeed: "
            f"{listed}{more}{why}", failed=codes)
        causes = {type(o.error) for o in failed}
        if not self.succeeded and len(causes) == 1 and first is not None:
            # every device failed the same way (all disk-full, all unreachable...): the exit
            # code says what went wrong, as it would for one device; mixed or partial: 20
            exc.exit_as = type(first)
        raise exc from first


def _as_is(doc: Any) -> Any:
    return doc


@dataclass(frozen=True)
class Remote:
    """A fan-out's task as a farm host's worker rebuilds it for one device: a task
    ``kind`` (a handler in :mod:`fleet.worker.tasks`) with JSON ``args`` for every device
    and ``each[name]`` for one (merged over ``args``). ``decode`` (controller side, never
    sent) turns the worker's JSON result back into the task's result type."""

    kind: str
    args: Mapping[str, Any] = field(default_factory=dict)
    each: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    decode: Callable[[Any], Any] = _as_is

    def args_for(self, name: str) -> dict[str, Any]:
        return {**self.args, **self.each.get(name, {})}


@dataclass(frozen=True)
class DispatchOptions:
    """The fan-out's options a dispatcher honours (seconds)."""

    deadline_s: float
    retries: int
    grace_s: float
    cancel: threading.Event
    on_state: Callable[[str, str], None] | None = None
    poll_s: float = 0.5
    #: ``on_bytes(device, done, total)``: a farm push's progress as its worker reports it
    on_bytes: Callable[[str, int, int], None] | None = None


#: runs some of the items in this process: ``local(items, on_done) -> FleetResult``
LocalRun = Callable[[dict[str, Any], Callable[[DeviceOutcome[Any]], None] | None],
                    FleetResult[Any]]


class Dispatcher(Protocol):
    """Runs a fan-out's devices somewhere: each device's outcome, in item order. Items it
    does not send away (no farm host) it runs through ``local``; ``on_done`` is called in
    the calling thread as each device ends."""

    def dispatch(self, items: dict[str, Any], remote: Remote, local: LocalRun,
                 options: DispatchOptions,
                 on_done: Callable[[DeviceOutcome[Any]], None] | None
                 ) -> FleetResult[Any]: ...


def _named(devices: Mapping[str, T] | Sequence[T]) -> dict[str, T]:
    if isinstance(devices, Mapping):
        return dict(devices)
    return {str(getattr(d, "name")): d for d in devices}  # noqa: B009 (any object with .name)


def _attempts(name: str, item: T, task: Callable[[T, TaskContext], R], ctx: TaskContext, *,
              deadline_s: float, retries: int, backoff: Backoff, rng: random.Random,
              clock: Clock, sleep: Callable[[float], None], cancel: threading.Event
              ) -> DeviceOutcome[R]:
    """One device: attempts until success, a non-retryable error, the last retry, the
    deadline, or a cancel (no new retry starts after it)."""
    start = clock()
    ctx.deadline = Deadline(deadline_s, clock)
    attempt = 0
    while True:
        ctx._new_attempt(attempt)
        try:
            ctx.check()
            result = task(item, ctx)
            return DeviceOutcome(name, ctx.status, result=result, reason=ctx.reason,
                                 attempts=attempt + 1, started_at=start,
                                 duration_s=clock() - start)
        except errors.FleetError as exc:
            err = exc
        except Exception as exc:  # a bug in one task must not take the others down
            err = errors.FleetError(f"{name}: {type(exc).__name__}: {exc}")
            err.__cause__ = exc
        expired = ctx.deadline.expired or ctx._aborted.is_set()
        if not err.retryable or attempt >= retries or expired or cancel.is_set():
            # timed out: the watchdog closed the transport, or time ran out for a retry;
            # a real refusal that merely came late keeps its own status
            timed_out = ctx._aborted.is_set() or (expired and err.retryable)
            return DeviceOutcome(name, status_for(err, deadline_expired=timed_out), error=err,
                                 reason=err.message, attempts=attempt + 1, started_at=start,
                                 duration_s=clock() - start)
        pause = min(backoff.pause(attempt, rng), max(0.0, ctx.deadline.at - clock()))
        _log.info("%s: attempt %d failed (%s: %s); retry in %.1fs", name, attempt + 1,
                  err.code, err.message, pause)
        ctx.state(f"retry in {pause:.1f}s ({err.code})")
        sleep(pause)
        attempt += 1


def call_each(devices: Mapping[str, T] | Sequence[T], task: Callable[[T, TaskContext], R], *,
              workers: int = 8, deadline_s: float = 900.0, retries: int = 2,
              backoff: Backoff | None = None, grace_s: float = 5.0,
              cancel: threading.Event | None = None, clock: Clock = time.monotonic,
              sleep: Callable[[float], None] | None = None, rng: random.Random | None = None,
              on_bytes: Callable[[str, int, int], None] | None = None,
              on_state: Callable[[str, str], None] | None = None,
              on_done: Callable[[DeviceOutcome[R]], None] | None = None,
              poll_s: float = 0.5, remote: Remote | None = None,
              dispatcher: Dispatcher | None = None) -> FleetResult[R]:
    """Run ``task(device, ctx)`` for every device (a name -> item mapping, or items with a
    ``name``); returns every device's outcome in the order given.

    ``deadline_s`` is per device, from its start; ``sleep`` defaults to waiting on the
    cancel event (a cancel cuts a backoff short); ``on_done`` runs in the calling thread.
    With ``dispatcher`` and ``remote`` both given, the dispatcher decides where each
    device runs (see the module docstring); the others run here.
    """
    items = _named(devices)
    if on_state is not None:
        for name in items:  # where every device starts (a progress display counts them)
            on_state(name, "queued")
    if dispatcher is not None and remote is not None:
        stop = cancel or threading.Event()

        def local(sub: dict[str, Any], done: Callable[[DeviceOutcome[Any]], None] | None
                  ) -> FleetResult[Any]:
            return call_each(sub, task, workers=workers, deadline_s=deadline_s,
                             retries=retries, backoff=backoff, grace_s=grace_s, cancel=stop,
                             clock=clock, sleep=sleep, rng=rng, on_bytes=on_bytes,
                             on_state=on_state, on_done=done, poll_s=poll_s)

        opts = DispatchOptions(deadline_s=deadline_s, retries=max(0, retries),
                               grace_s=grace_s, cancel=stop, on_state=on_state,
                               poll_s=poll_s, on_bytes=on_bytes)
        out: FleetResult[R] = dispatcher.dispatch(items, remote, local, opts, on_done)
        return out.sorted_by(list(items))
    backoff = backoff or Backoff()
    rng = rng or random.Random()
    cancel = cancel or threading.Event()

    def wait_or_cancel(seconds: float) -> None:
        cancel.wait(seconds)

    pause = sleep or wait_or_cancel
    contexts = {n: TaskContext(n, Deadline(float("inf")), on_bytes, on_state) for n in items}
    started: set[str] = set()
    lock = threading.Lock()

    def one(name: str) -> DeviceOutcome[R]:
        if cancel.is_set():
            return DeviceOutcome(name, DeviceStatus.CANCELLED,
                                 error=errors.RolloutCancelledError(
                                     f"{name}: cancelled before it started", device=name),
                                 reason="cancelled before it started")
        with lock:
            started.add(name)
        return _attempts(name, items[name], task, contexts[name], deadline_s=deadline_s,
                         retries=max(0, retries), backoff=backoff, rng=rng, clock=clock,
                         sleep=pause, cancel=cancel)

    result: FleetResult[R] = FleetResult()
    done_by_name: dict[str, DeviceOutcome[R]] = {}
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="fanout")
    futures: dict[Future[DeviceOutcome[R]], str] = {}
    try:
        for name in items:
            futures[pool.submit(one, name)] = name
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=poll_s, return_when=FIRST_COMPLETED)
            for fut in done:
                outcome = fut.result()
                done_by_name[futures[fut]] = outcome
                if on_done:
                    on_done(outcome)
            now = clock()
            for fut in pending:
                name = futures[fut]
                with lock:
                    running = name in started
                if running and now > contexts[name].deadline.at + grace_s:
                    contexts[name].abort()  # closes its transport: the blocked call returns
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    for name in items:
        if name in done_by_name:
            result.add(done_by_name[name])
    return result
