"""The Celery dispatcher: the fan-out's seam (:class:`fleet.rollout.fanout.Dispatcher`)
with a broker configured.

For one fan-out:

1. devices without a farm host (``via`` None) run in this process, through the ordinary
   thread pool, while the rest is on the farm (they are never sent to a queue: the
   controller is their host);
2. a device whose farm host has no live worker (no heartbeat for
   :attr:`~fleet.worker.settings.FarmSettings.stale_s`) fails at once as
   ``unreachable``, nothing sent;
3. every other device becomes one task on its host's queue ``fleet.host.<NAME>``, with
   the per-device deadline (capped at the broker's ``deadline_s``, which the visibility
   timeout is derived from), the retries and the fan-out's cancel token. A task waits in
   its queue for a free worker thread as an in-process device waits for a pool slot (its
   deadline starts when it starts); once the fan-out is over the token is set, so a task
   of it that a worker takes later (a host back after it was given up) does nothing;
4. the controller polls the tasks' states (one ``MGET`` per 500) and, for a deployment,
   each step's state in the registry (the workers write them) and the pushes' bytes
   (:mod:`fleet.worker.progress`, one ``HGETALL`` a second) for the progress display;
   each finished task's outcome is decoded into the same :class:`DeviceOutcome` the
   in-process fan-out gives, so callers print the same table;
5. a device whose host loses its last live worker while its task is pending fails as
   ``unreachable`` (its task revoked); one not finished within
   :meth:`~fleet.worker.settings.FarmSettings.task_bound_s` of its start (one
   redelivery after a worker's death plus a full deadline) as ``timed_out``; when the
   broker cannot be read for ``stale_s``, whatever is pending fails as ``unreachable``;
6. a cancel (Ctrl-C, lost lease) revokes the tasks not started (``cancelled``) and sets
   the token, so the started ones stop at their next safe point, as in-process ones do.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlmodel import col, select

from fleet.core import errors
from fleet.home import FleetHome
from fleet.registry import Registry
from fleet.registry.models import DeploymentStep, Device
from fleet.registry.types import utcnow
from fleet.rollout.fanout import (
    DeviceOutcome,
    DeviceStatus,
    DispatchOptions,
    FleetResult,
    LocalRun,
    Remote,
    status_for,
)
from fleet.worker import artifacts, roster
from fleet.worker.broker import Broker, CeleryBroker, Send
from fleet.worker.settings import FarmSettings, queue_for, settings_for
from fleet.worker.wire import outcome_from_doc

__all__ = ["CeleryDispatcher", "dispatcher_for", "task_payload"]

Clock = Callable[[], float]
#: a queued task nobody took for this long is dropped by the broker (a host gone for good)
QUEUE_EXPIRY_S = 24 * 3600.0
OnDone = Callable[[DeviceOutcome[Any]], None]
_LIVENESS_EVERY_S = 2.0
_PROGRESS_EVERY_S = 1.0


def task_payload(kind: str, args: dict[str, Any], device: str, *, deadline_s: float,
                 retries: int, grace_s: float, cancel: str) -> dict[str, Any]:
    """What one farm task carries (JSON): everything a worker needs besides the registry."""
    return {"kind": kind, "args": args, "device": device, "deadline_s": deadline_s,
            "retries": retries, "grace_s": grace_s, "cancel": cancel}


@dataclass
class _Sent:
    name: str
    host: str
    task_id: str
    started_at: float | None = None  #: when the controller first saw it STARTED


class _FarmRun:
    """One fan-out's farm devices, from sending to the last outcome."""

    def __init__(self, d: CeleryDispatcher, remote: Remote, options: DispatchOptions,
                 emit: OnDone, tick: Callable[[], None]) -> None:
        self.d, self.remote, self.options, self.emit, self.tick = d, remote, options, emit, tick
        self.deadline_s = min(options.deadline_s, d.settings.deadline_s)
        self.bound_s = d.settings.task_bound_s(self.deadline_s)
        self.token = uuid.uuid4().hex
        self.pending: dict[str, _Sent] = {}
        self.cancelled = False
        self.states_seen: dict[str, str] = {}
        self.bytes_seen: dict[str, tuple[int, int]] = {}
        self.steps_since: datetime | None = None
        self.broker_lost_at: float | None = None

    def end(self, name: str, status: DeviceStatus, err: errors.FleetError) -> None:
        self.emit(DeviceOutcome(name, status, error=err, reason=err.message))

    def run(self, farm: dict[str, Any]) -> None:
        if self.options.cancel.is_set():
            for name in farm:
                self.end(name, DeviceStatus.CANCELLED, errors.RolloutCancelledError(
                    f"{name}: cancelled before it started", device=name))
            return
        live = self.d.live_hosts()
        batch: list[Send] = []
        for name, item in farm.items():
            host = str(item.via)
            if host not in live:
                err = errors.ConnectError(
                    f"{name}: farm host {host!r} has no live worker (start `fleet worker "
                    f"--host {host}` there)", device=name, via=host)
                self.end(name, DeviceStatus.UNREACHABLE, err)
                continue
            sent = _Sent(name, host, uuid.uuid4().hex)
            payload = task_payload(self.remote.kind, self.remote.args_for(name), name,
                                   deadline_s=self.deadline_s, retries=self.options.retries,
                                   grace_s=self.options.grace_s, cancel=self.token)
            batch.append(Send(sent.task_id, queue_for(host), payload, QUEUE_EXPIRY_S))
            self.pending[name] = sent
        try:
            self.d.broker.send(batch)
        except errors.FleetError as exc:
            for name in list(self.pending):
                self.pending.pop(name)
                self.end(name, status_for(exc), exc)
            return
        try:
            self.follow()
        finally:  # whatever is still queued somewhere belongs to a fan-out that is over
            with contextlib.suppress(errors.FleetError):
                self.d.broker.cancel(self.token)

    def follow(self) -> None:
        poll = min(self.options.poll_s, 0.25)
        next_live = next_progress = next_bytes = self.d.clock()
        while self.pending:
            self.tick()
            if self.options.on_bytes is not None and self.d.clock() >= next_bytes:
                self.pushed()  # before collecting: a push that just ended shows its end
                next_bytes = self.d.clock() + _PROGRESS_EVERY_S
            self.collect()
            now = self.d.clock()
            if self.options.cancel.is_set() and not self.cancelled:
                self.cancel()
            if now >= next_live and self.pending:
                self.check_hosts()
                next_live = now + _LIVENESS_EVERY_S
            if now >= next_progress and self.pending and self.options.on_state:
                self.progress()
                next_progress = now + _PROGRESS_EVERY_S
            for name, sent in list(self.pending.items()):
                if sent.started_at is not None and now - sent.started_at > self.bound_s:
                    self.give_up(name, DeviceStatus.TIMED_OUT, errors.TransportTimeout(
                        f"{name}: no result from farm host {sent.host!r} within "
                        f"{self.bound_s:.0f}s of its start", device=name, via=sent.host))
            if self.pending:
                self.d.sleep(poll)

    def collect(self) -> None:
        by_id = {s.task_id: s for s in self.pending.values()}
        try:
            states = self.d.broker.states(list(by_id))
        except errors.FleetError as exc:  # a blink: try again; gone for long: give up
            now = self.d.clock()
            self.broker_lost_at = self.broker_lost_at or now
            if now - self.broker_lost_at > self.d.settings.stale_s:
                for name in list(self.pending):
                    self.pending.pop(name)
                    self.end(name, DeviceStatus.UNREACHABLE, errors.ConnectError(
                        f"{name}: {exc.message}", device=name))
            return
        self.broker_lost_at = None
        for tid, st in states.items():
            sent = by_id[tid]
            if st.state == "STARTED":
                if sent.started_at is None:
                    sent.started_at = self.d.clock()
                continue
            if st.state == "SUCCESS":
                self.pending.pop(sent.name)
                try:
                    out = outcome_from_doc(st.result, self.remote.decode)
                except (ValueError, TypeError, KeyError) as exc:
                    self.end(sent.name, DeviceStatus.FAILED, errors.FleetError(
                        f"{sent.name}: malformed result from farm host {sent.host!r}: "
                        f"{exc}", device=sent.name))
                    continue
                self.emit(out)
            elif st.state == "FAILURE":
                self.pending.pop(sent.name)
                self.end(sent.name, DeviceStatus.FAILED, errors.FleetError(
                    f"{sent.name}: the task failed on farm host {sent.host!r}: "
                    f"{st.result}", device=sent.name, via=sent.host))
            elif st.state == "REVOKED":
                self.pending.pop(sent.name)
                if self.cancelled:
                    self.end(sent.name, DeviceStatus.CANCELLED, errors.RolloutCancelledError(
                        f"{sent.name}: cancelled before it started", device=sent.name))
                else:
                    self.end(sent.name, DeviceStatus.TIMED_OUT, errors.TransportTimeout(
                        f"{sent.name}: its task expired in farm host {sent.host!r}'s "
                        "queue", device=sent.name, via=sent.host))

    def cancel(self) -> None:
        """Stop: queued tasks are revoked (``cancelled``), started ones are told to stop
        at their next safe point (their outcome comes back as usual)."""
        self.cancelled = True
        queued = [s for s in self.pending.values() if s.started_at is None]
        try:
            self.d.broker.cancel(self.token)
            self.d.broker.revoke([s.task_id for s in queued])
        except errors.FleetError:
            pass  # the tasks still expire, and a deployment's worker checks its lease
        for s in queued:
            self.pending.pop(s.name)
            self.end(s.name, DeviceStatus.CANCELLED, errors.RolloutCancelledError(
                f"{s.name}: cancelled before it started", device=s.name))

    def give_up(self, name: str, status: DeviceStatus, err: errors.FleetError) -> None:
        sent = self.pending.pop(name)
        with contextlib.suppress(errors.FleetError):  # it expires anyway
            self.d.broker.revoke([sent.task_id])
        self.end(name, status, err)

    def check_hosts(self) -> None:
        live = self.d.live_hosts()
        for name, sent in list(self.pending.items()):
            if sent.host not in live:
                self.give_up(name, DeviceStatus.UNREACHABLE, errors.ConnectError(
                    f"{name}: farm host {sent.host!r} lost its last live worker (no "
                    f"heartbeat for {self.d.settings.stale_s:.0f}s)", device=name,
                    via=sent.host))

    def pushed(self) -> None:
        """Each pending device's push progress as its worker reported it (one read)."""
        on_bytes = self.options.on_bytes
        if on_bytes is None:
            return
        try:
            report = self.d.broker.pushed(self.token)
        except errors.FleetError:
            return  # progress is best effort; the states' poll notices a broker gone
        for name, (done, total) in report.items():
            if name in self.pending and self.bytes_seen.get(name) != (done, total):
                self.bytes_seen[name] = (done, total)
                on_bytes(name, done, total)

    def progress(self) -> None:
        """Each pending device's step state, from the registry (what the workers wrote)."""
        dep = self.remote.args.get("deployment")
        on_state = self.options.on_state
        if not dep or on_state is None:
            return
        try:
            since, rows = self.d.step_states(uuid.UUID(str(dep)), self.steps_since)
        except errors.FleetError:
            return
        self.steps_since = since
        for name, state in rows:
            if name in self.pending and self.states_seen.get(name) != state:
                self.states_seen[name] = state
                on_state(name, state)


class CeleryDispatcher:
    """:class:`~fleet.rollout.fanout.Dispatcher` for farm hosts (module docstring)."""

    def __init__(self, settings: FarmSettings, reg: Registry, broker: Broker, *,
                 clock: Clock = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 now: Callable[[], datetime] = utcnow) -> None:
        self.settings, self.reg, self.broker = settings, reg, broker
        self.clock, self.sleep, self.now = clock, sleep, now

    def publish(self, package: Path, sha256: str) -> str:
        """``package``'s key in the artifact location the workers share."""
        return artifacts.publish(self.settings.artifacts, package, sha256)

    def live_hosts(self) -> dict[str, float]:
        return roster.host_liveness(self.reg, stale_s=self.settings.stale_s, now=self.now())

    def step_states(self, dep_id: uuid.UUID, since: datetime | None
                    ) -> tuple[datetime, list[tuple[str, str]]]:
        """(the time of this read, [(device, step state)] of the steps changed since
        ``since``) for one deployment (one query)."""
        at = self.now()
        stmt = (select(Device.name, DeploymentStep.state)
                .join(Device, col(Device.id) == col(DeploymentStep.device_id))
                .where(DeploymentStep.deployment_id == dep_id))
        if since is not None:
            stmt = stmt.where(col(DeploymentStep.updated_at) >= since)
        with self.reg.reading() as s:
            rows = [(str(n), str(getattr(st, "value", st))) for n, st in s.exec(stmt).all()]
        return at, rows

    def dispatch(self, items: dict[str, Any], remote: Remote, local: LocalRun,
                 options: DispatchOptions, on_done: OnDone | None) -> FleetResult[Any]:
        farm = {n: it for n, it in items.items() if getattr(it, "via", None)}
        here = {n: it for n, it in items.items() if n not in farm}
        result: FleetResult[Any] = FleetResult()
        finished: queue.Queue[DeviceOutcome[Any]] = queue.Queue()
        box: dict[str, Any] = {}

        def emit(out: DeviceOutcome[Any]) -> None:
            result.add(out)
            if on_done:
                on_done(out)

        def drain() -> None:
            while True:
                try:
                    emit(finished.get_nowait())
                except queue.Empty:
                    return

        def run_here() -> None:
            try:
                box["result"] = local(here, finished.put)
            except BaseException as exc:  # re-raised in the calling thread
                box["error"] = exc

        thread = None
        if here:
            thread = threading.Thread(target=run_here, name="fanout-here", daemon=True)
            thread.start()
        if farm:
            _FarmRun(self, remote, options, emit, drain).run(farm)
        while thread is not None and thread.is_alive():
            thread.join(0.1)
            drain()
        drain()
        if "error" in box:
            raise box["error"]
        for out in box.get("result", FleetResult()):
            if out.device not in result.outcomes:
                result.add(out)  # ended without passing through on_done
        return result


_apps: dict[str, Any] = {}
_lock = threading.Lock()


def dispatcher_for(home: FleetHome, reg: Registry) -> CeleryDispatcher | None:
    """The Celery dispatcher when ``home`` has a broker configured, else None (the
    fan-out then runs every device in this process, as without farm hosts)."""
    settings = settings_for(home)
    if settings.broker_url is None:
        return None
    from fleet.worker.app import make_app

    def app() -> Any:
        with _lock:
            key = f"{settings.broker_url}|{settings.visibility_timeout_s}"
            if key not in _apps:
                _apps[key] = make_app(settings)
            return _apps[key]

    return CeleryDispatcher(settings, reg, CeleryBroker(app))
