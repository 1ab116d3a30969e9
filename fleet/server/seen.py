"""``last_seen`` of plain check-ins, written behind in batches (one UPDATE per batch).

At a 30-minute poll every check-in is a device's first in a long while, so recording
that it was seen would cost one write transaction (and, on PostgreSQL, one WAL flush)
per check-in: the dominant cost of the check-in path. A check-in that changes nothing
else (no progress, the same installed models, about the same free space) only notes the
time here; a daemon thread writes what was noted every :data:`FLUSH_S` seconds in one
transaction (an executemany UPDATE by primary key), and the server's shutdown writes
the rest. What a crash loses: up to ``FLUSH_S`` of ``last_seen`` times, which the next
check-ins put back. Check-ins that carry progress or new status facts are written at
once, as before (:func:`fleet.server.app._touch`).

The batch sets ``status`` ``ok`` and clears ``last_error`` (what
:meth:`fleet.registry.Registry.record_contact` decides for a contact that went well),
never for a device revoked meanwhile (``revoked_at`` set: its row is left alone).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import String, bindparam, func, update

from fleet.core import errors
from fleet.registry import Device, Registry

__all__ = ["FLUSH_S", "SeenWriter"]

#: seconds between two batch writes
FLUSH_S = 0.5
log = logging.getLogger("fleet.server")


class SeenWriter:
    """Noted contacts, by device id, waiting for the next batch write."""

    def __init__(self, registry: Callable[[], Registry], every_s: float = FLUSH_S) -> None:
        self._registry = registry
        self.every_s = every_s
        self._pending: dict[uuid.UUID, tuple[datetime, str | None, int | None]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def note(self, device_id: uuid.UUID, at: datetime, *, agent_version: str | None = None,
             root_version: int | None = None) -> None:
        """Device ``device_id`` checked in at ``at`` (UTC)."""
        with self._lock:
            self._pending[device_id] = (at, agent_version, root_version)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fleet-seen",
                                                daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.flush()
            except errors.FleetError as exc:  # busy registry: the next batch retries
                log.warning("last_seen batch not written: %s", exc.message)

    def flush(self) -> int:
        """Write what was noted (one transaction); returns how many devices. A failed
        write keeps the batch for the next try (newer notes win)."""
        with self._lock:
            batch, self._pending = self._pending, {}
        if not batch:
            return 0
        t = Device.__table__  # type: ignore[attr-defined]
        stmt = (update(t).where(t.c.id == bindparam("b_id"))
                .where(t.c.revoked_at.is_(None))
                .values(last_seen=bindparam("b_at"), status="ok", last_error=None,
                        agent_version=func.coalesce(bindparam("b_agent", type_=String),
                                                    t.c.agent_version),
                        root_version=func.coalesce(bindparam("b_root", type_=t.c.root_version.type),
                                                   t.c.root_version)))
        rows = [{"b_id": k, "b_at": at, "b_agent": agent, "b_root": root}
                for k, (at, agent, root) in batch.items()]
        try:
            with self._registry().session() as s:
                s.connection().execute(stmt, rows)
        except BaseException:
            with self._lock:
                self._pending = {**batch, **self._pending}
            raise
        return len(rows)

    def close(self) -> None:
        """Stop the thread and write the rest."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.flush()
