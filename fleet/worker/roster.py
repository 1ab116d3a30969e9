"""The ``workers`` table: which ``fleet worker`` runs for which farm host, and whether it
is alive (its heartbeat is younger than :attr:`FarmSettings.stale_s`).

A worker upserts its row by name when it starts (:func:`register`), refreshes
``heartbeat_at`` every ``heartbeat_s`` (:func:`beat`) and stamps ``stopped_at`` when it
stops cleanly. Liveness is a pure function of the rows and the time (:func:`liveness`),
so a worker that was SIGKILLed reads as dead once its heartbeat is stale, and as alive
again as soon as its restarted process beats.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlmodel import col, select

from fleet.registry import Registry
from fleet.registry.models import Device, Worker
from fleet.registry.types import utcnow

__all__ = ["WorkerView", "beat", "devices_by_host", "host_liveness", "liveness", "register",
           "stopped", "workers"]


@dataclass(frozen=True)
class WorkerView:
    name: str
    host: str
    queue: str
    hostname: str
    pid: int
    concurrency: int
    started_at: datetime
    heartbeat_at: datetime
    stopped_at: datetime | None
    age_s: float  #: seconds since its last heartbeat
    live: bool


def liveness(rows: Iterable[Worker], *, now: datetime, stale_s: float) -> list[WorkerView]:
    """Each worker with its heartbeat's age; live: not stopped and younger than
    ``stale_s``. Sorted by host, then name."""
    out = []
    for w in rows:
        age = max(0.0, (now - w.heartbeat_at).total_seconds())
        out.append(WorkerView(w.name, w.host, w.queue, w.hostname, w.pid, w.concurrency,
                              w.started_at, w.heartbeat_at, w.stopped_at, age,
                              w.stopped_at is None and age < stale_s))
    return sorted(out, key=lambda v: (v.host, v.name))


def register(reg: Registry, *, name: str, host: str, queue: str, hostname: str, pid: int,
             concurrency: int, now: datetime | None = None) -> None:
    """Insert or refresh ``name``'s row as started now (a restarted worker keeps its
    name and row)."""
    at = now or utcnow()
    with reg.session() as s:
        row = s.exec(select(Worker).where(Worker.name == name)).first()
        if row is None:
            row = Worker(name=name, host=host, queue=queue, hostname=hostname, pid=pid,
                         concurrency=concurrency, started_at=at, heartbeat_at=at)
        else:
            row.host, row.queue, row.hostname, row.pid = host, queue, hostname, pid
            row.concurrency, row.started_at, row.heartbeat_at = concurrency, at, at
            row.stopped_at = None
        s.add(row)


def beat(reg: Registry, name: str, pid: int, now: datetime | None = None) -> bool:
    """One heartbeat; False when the row is gone or another process took the name."""
    with reg.session() as s:
        row = s.exec(select(Worker).where(Worker.name == name)).first()
        if row is None or row.pid != pid:
            return False
        row.heartbeat_at = now or utcnow()
        s.add(row)
        return True


def stopped(reg: Registry, name: str, pid: int) -> None:
    """A clean stop: the row stays (``worker list --all``), no longer live."""
    with reg.session() as s:
        row = s.exec(select(Worker).where(Worker.name == name)).first()
        if row is not None and row.pid == pid:
            row.stopped_at = utcnow()
            s.add(row)


def workers(reg: Registry, *, stale_s: float, now: datetime | None = None
            ) -> list[WorkerView]:
    """Every worker row with its liveness (one query)."""
    with reg.reading() as s:
        rows = list(s.exec(select(Worker)).all())
    return liveness(rows, now=now or utcnow(), stale_s=stale_s)


def host_liveness(reg: Registry, *, stale_s: float, now: datetime | None = None
                  ) -> dict[str, float]:
    """Farm host -> seconds since the freshest heartbeat of any of its live workers; hosts
    with no live worker are absent (one query)."""
    out: dict[str, float] = {}
    for w in workers(reg, stale_s=stale_s, now=now):
        if w.live:
            out[w.host] = min(w.age_s, out.get(w.host, w.age_s))
    return out


def devices_by_host(reg: Registry) -> dict[str, list[str]]:
    """Farm host -> the names of the devices it reaches, sorted (one query)."""
    out: dict[str, list[str]] = {}
    with reg.reading() as s:
        rows = s.exec(select(Device.name, Device.via).where(col(Device.via).is_not(None))
                      .order_by(col(Device.name))).all()
    for name, via in rows:
        out.setdefault(str(via), []).append(name)
    return out
