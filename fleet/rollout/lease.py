"""A running deployment's lease: who runs it (host, pid) and when it last said so.

The controller that runs a deployment writes a heartbeat every ``interval_s``
(:class:`Heartbeat`, a thread). Any later command calls :func:`reap_stale`, which marks
``interrupted`` every ``running`` deployment whose lease is stale (:func:`staleness`, a
pure function): its heartbeat is older than ``stale_after_s`` (a closed laptop, a lost
ssh session, another host's controller that died), or it was taken on this host by a
process that no longer exists (SIGKILL, OOM: caught at once, without waiting for the
bound). A pid reused by another process only delays the verdict to the heartbeat bound.

Every write is a compare-and-set on (status, host, pid), so a controller that wakes up
after its deployment was marked interrupted (or cancelled) never overwrites that: its
heartbeat finds the lease gone and tells it to stop (``on_lost``). The compare reads the
row ``FOR UPDATE``: on PostgreSQL (READ COMMITTED) two resumes taking over one
deployment, or a heartbeat racing the reaper, queue on the row instead of both winning;
SQLite's ``BEGIN IMMEDIATE`` already serialises them.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime

from sqlmodel import col, select

from fleet.registry import Registry
from fleet.registry.models import Deployment, DeploymentState
from fleet.registry.types import utcnow

__all__ = ["Heartbeat", "Holder", "LeaseConfig", "LeaseView", "abandon", "holder", "pid_alive",
           "reap_stale", "refresh", "staleness", "take_over"]

Now = Callable[[], datetime]
#: (host, pid) of the process that holds a lease
Holder = tuple[str, int]


@dataclass(frozen=True)
class LeaseConfig:
    """Heartbeat period and the age at which a lease is stale (seconds)."""

    interval_s: float = 5.0
    stale_after_s: float = 60.0

    @classmethod
    def from_env(cls) -> LeaseConfig:
        """``FLEET_LEASE_STALE_S`` overrides the bound (the interval is a fifth of it)."""
        raw = os.environ.get("FLEET_LEASE_STALE_S")
        try:
            bound = float(raw) if raw else cls.stale_after_s
        except ValueError:
            bound = cls.stale_after_s
        return cls(interval_s=min(cls.interval_s, bound / 5), stale_after_s=bound)


@dataclass(frozen=True)
class LeaseView:
    """What the registry says about a running deployment's holder."""

    host: str | None
    pid: int | None
    heartbeat_at: datetime | None

    @classmethod
    def of(cls, dep: Deployment) -> LeaseView:
        return cls(dep.lease_host, dep.lease_pid, dep.heartbeat_at)


def holder() -> Holder:
    return socket.gethostname(), os.getpid()


def pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this host (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def staleness(lease: LeaseView, *, now: datetime, host: str, alive: Callable[[int], bool],
              stale_after_s: float) -> str | None:
    """Why this lease is stale, or None while it holds."""
    if lease.host is None or lease.pid is None or lease.heartbeat_at is None:
        return "it holds no lease (a controller from before leases, or a lost write)"
    age = (now - lease.heartbeat_at).total_seconds()
    if age > stale_after_s:
        return (f"no heartbeat for {age:.0f}s from pid {lease.pid} on {lease.host} "
                f"(bound {stale_after_s:.0f}s)")
    if lease.host == host and not alive(lease.pid):
        return f"its controller (pid {lease.pid} on {host}) is gone"
    return None


def reap_stale(reg: Registry, *, now: Now = utcnow, host: str | None = None,
               alive: Callable[[int], bool] = pid_alive,
               config: LeaseConfig | None = None) -> list[tuple[uuid.UUID, str]]:
    """Mark every ``running`` deployment with a stale lease ``interrupted`` (one
    transaction: a heartbeat cannot slip in between the check and the write). Returns
    (id, reason) of each one marked."""
    cfg = config or LeaseConfig.from_env()
    here = host or socket.gethostname()
    marked: list[tuple[uuid.UUID, str]] = []

    def verdict(dep: Deployment) -> str | None:
        if (dep.options or {}).get("mode") == "pull":
            return None  # fleet server drives it on the devices' schedule: no lease
        return staleness(LeaseView.of(dep), now=now(), host=here, alive=alive,
                         stale_after_s=cfg.stale_after_s)

    with reg.session() as s:
        running = s.exec(select(Deployment)
                         .where(Deployment.status == DeploymentState.RUNNING)).all()
        suspects = [d.id for d in running if verdict(d) is not None]
        if not suspects:  # the usual case: nothing locked, nothing written
            return marked
        # PostgreSQL: lock them and judge again on what is committed now (a heartbeat may
        # have landed meanwhile; it waits for this verdict from here on)
        for dep in s.exec(select(Deployment).where(col(Deployment.id).in_(suspects))
                          .with_for_update().execution_options(populate_existing=True)
                          ).all():
            why = verdict(dep) if dep.status is DeploymentState.RUNNING else None
            if why is None:
                continue
            dep.status = DeploymentState.INTERRUPTED
            dep.status_reason = f"interrupted: {why}"
            dep.lease_host = dep.lease_pid = None
            dep.heartbeat_at = None
            s.add(dep)
            marked.append((dep.id, why))
    return marked


def _cas(reg: Registry, dep_id: uuid.UUID, who: Holder, change: Callable[[Deployment], None],
         *, expect: DeploymentState = DeploymentState.RUNNING, held: bool = True) -> bool:
    with reg.session() as s:  # FOR UPDATE: the compare and the set are one step
        dep = s.get(Deployment, dep_id, with_for_update=True)
        if dep is None or dep.status is not expect:
            return False
        if held and (dep.lease_host, dep.lease_pid) != who:
            return False
        change(dep)
        s.add(dep)
        return True


def refresh(reg: Registry, dep_id: uuid.UUID, who: Holder, *, now: Now = utcnow) -> bool:
    """One heartbeat; False when the lease is no longer ours (stop working on it)."""
    def beat(dep: Deployment) -> None:
        dep.heartbeat_at = now()

    return _cas(reg, dep_id, who, beat)


def take_over(reg: Registry, dep_id: uuid.UUID, who: Holder, *, now: Now = utcnow) -> bool:
    """``interrupted`` -> ``running`` under ``who``'s lease (resume); False when another
    process got there first or it is not interrupted."""
    def claim(dep: Deployment) -> None:
        dep.status = DeploymentState.RUNNING
        dep.status_reason = None
        dep.finished_at = None
        dep.lease_host, dep.lease_pid = who
        dep.heartbeat_at = now()

    return _cas(reg, dep_id, who, claim, expect=DeploymentState.INTERRUPTED, held=False)


def abandon(reg: Registry, dep_id: uuid.UUID, who: Holder, reason: str) -> bool:
    """``running`` (ours) -> ``interrupted``, dropping the lease (a hard stop, an error)."""
    def drop(dep: Deployment) -> None:
        dep.status = DeploymentState.INTERRUPTED
        dep.status_reason = reason
        dep.lease_host = dep.lease_pid = None
        dep.heartbeat_at = None

    return _cas(reg, dep_id, who, drop)


class Heartbeat:
    """Refresh the lease every ``interval_s`` in a daemon thread; when a refresh finds
    the lease gone (cancelled, or marked interrupted), call ``on_lost`` once and stop.
    A refresh that fails (registry locked or full) is skipped, not fatal."""

    def __init__(self, reg: Registry, dep_id: uuid.UUID, who: Holder, *,
                 on_lost: Callable[[], None], config: LeaseConfig | None = None,
                 now: Now = utcnow) -> None:
        self.reg, self.dep_id, self.who = reg, dep_id, who
        self.on_lost, self.now = on_lost, now
        self.config = config or LeaseConfig.from_env()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{dep_id.hex[:8]}",
                                        daemon=True)

    def beat(self) -> bool:
        """One refresh (the thread's body; tests call it directly)."""
        try:
            ok = refresh(self.reg, self.dep_id, self.who, now=self.now)
        except Exception:  # a missed beat; the bound is many intervals long
            return True
        if not ok and not self.lost.is_set():
            self.lost.set()
            self.on_lost()
        return ok

    def _run(self) -> None:
        while not self._stop.wait(self.config.interval_s):
            if not self.beat():
                return

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.config.interval_s + 5)

    @contextlib.contextmanager
    def running(self) -> Iterator[Heartbeat]:
        self.start()
        try:
            yield self
        finally:
            self.stop()
