"""One device step's registry writes, kept in memory and written at its safe points.

A deploy step used to write every state change in an ORM transaction of its own (about
ten per device: the attempt, the contact, the status facts, pushing, pushed, staged,
activating, the activation with its report, the contact again, each a locked read of the
row, its update and the event). :class:`StepLog` takes the same writes in the order they
happen and :meth:`StepLog.flush` writes all of them in ONE transaction of plain SQL
statements: one ``UPDATE`` of the step row to where the moves left it, one multi-row
``INSERT`` of their events (each with the time it happened, in order), one locked read
and one ``UPDATE`` of the device row (contact, facts), and the activation's report. The
rows are the ones the ORM path wrote: the same step columns, the same events with the
same details, the same device columns, facts, reports, findings and probe snapshots.

The deploy step flushes:

- before every agent call that changes the device (the upload, the activation), so the
  registry says ``pushing``/``activating`` before the device can be found half-way;
- at its kill points (``staged``), so a process killed there has recorded what the point
  says;
- when the step ends, whether it returns or raises (the attempt and whatever happened
  before a failure are recorded before the fan-out records the failure).

So a process killed between two flushes loses only the writes since the last flush,
which is what a process killed just before them loses anyway: the reconcile table reads
the agent's ``status`` on resume (the registry may always be one step behind the
device). A fresh step costs four transactions and about a dozen statements instead of
ten transactions and forty.

Writers: one deployment's step has one writer at a time (its lease holder's process, or
the one worker its task was delivered to), so the step's columns are computed here from
the state this log knows; the device row, which other deployments share, is read and
written under its row lock.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, insert, select, update

from fleet.core import errors
from fleet.registry import Device, Registry, facts
from fleet.registry import history as hist
from fleet.registry.models import (
    CapabilitySnapshot,
    DeploymentStep,
    Finding,
    Report,
    StepEvent,
    StepState,
)
from fleet.registry.status import DeviceState
from fleet.registry.types import utcnow

__all__ = ["StepLog"]

_STEPS = DeploymentStep.__table__  # type: ignore[attr-defined]
_DEVICES = Device.__table__  # type: ignore[attr-defined]
_EVENTS = StepEvent.__table__  # type: ignore[attr-defined]
_US = timedelta(microseconds=1)


@dataclass(frozen=True)
class _Move:
    state: StepState
    at: datetime
    done: bool
    bytes_sent: int | None


@dataclass
class StepLog:
    """Buffered writes of one step (``step_id``) on one device (``device``)."""

    reg: Registry
    step_id: uuid.UUID
    device: Device
    #: the step's state as this log last read or moved it
    state: StepState = StepState.PENDING
    _attempts: int = 0
    _connected_at: datetime | None = None  #: an attempt moved it from ``pending``
    _moves: list[_Move] = field(default_factory=list)
    _events: list[dict[str, Any]] = field(default_factory=list)
    _contact: dict[str, Any] | None = None
    _facts: list[Callable[[dict[str, Any]], None]] = field(default_factory=list)
    _fields: dict[str, Any] = field(default_factory=dict)
    _rows: list[tuple[Any, list[Any]]] = field(default_factory=list)  #: (table, rows)
    _last_at: datetime | None = None

    def _now(self) -> datetime:
        """The time of a write, strictly after the previous one (events sort by it)."""
        at = utcnow()
        if self._last_at is not None and at <= self._last_at:
            at = self._last_at + _US
        self._last_at = at
        return at

    def _event(self, state: StepState, at: datetime, detail: dict[str, Any]) -> None:
        self._events.append({"id": uuid.uuid4(), "step_id": self.step_id, "state": state,
                             "at": at, "detail": dict(detail)})

    # -- what happened ------------------------------------------------------------------
    def attempt(self, attempt_no: int, known: StepState | None = None) -> StepState:
        """Keep an attempt: ``attempts + 1`` and a ``connecting`` event; the state moves
        to ``connecting`` only from ``pending`` (the rule of
        :func:`fleet.registry.history.record_attempt`). Returns the state the reconcile
        table decides from: ``known`` (the caller just read the step), else read (one
        query). NotFoundError for an unknown step."""
        state: Any = known
        if state is None:
            with self.reg.reading() as s:
                state = s.execute(select(_STEPS.c.state)
                                  .where(_STEPS.c.id == self.step_id)).scalar()
        if state is None:
            raise errors.NotFoundError(f"no deployment step {self.step_id}",
                                       step=str(self.step_id))
        self.state = StepState(state)
        at = self._now()
        self._attempts += 1
        if self.state is StepState.PENDING:
            self.state = StepState.CONNECTING
            self._connected_at = at
        self._event(StepState.CONNECTING, at, {"attempt_no": attempt_no})
        return self.state

    def move(self, state: StepState, *, bytes_sent: int | None = None, done: bool = False,
             **detail: Any) -> None:
        """:func:`fleet.registry.history.set_step` without an error (which clears the
        step's error), kept until the flush."""
        state = StepState(state)
        at = self._now()
        self._moves.append(_Move(state, at, done, bytes_sent))
        self._event(state, at, detail)
        self.state = state

    def contact(self, *, agent_version: str | None = None, status: str | None = None
                ) -> None:
        """:meth:`Registry.touch_device`: a contact that went well (``last_seen`` now, no
        error, status ``ok`` or ``status``)."""
        doc = dict(self._contact or {})
        doc.update(last_seen=self._now(), last_error=None,
                   status=DeviceState(status or DeviceState.OK).value)
        if agent_version:
            doc["agent_version"] = agent_version
        self._contact = doc

    def status_facts(self, doc: dict[str, Any]) -> None:
        """:func:`fleet.registry.facts.record_status` (selectors' ``model.*``, disk)."""
        self._facts.append(facts.status_change(doc))

    def device_fields(self, **fields: Any) -> None:
        """:meth:`Registry.update_device` of some columns."""
        self._fields.update(fields)

    def activation(self, body: dict[str, Any], *, deployment_id: uuid.UUID,
                   bytes_sent: int | None, recovered: bool = False) -> None:
        """:func:`fleet.registry.history.record_activation`: ``activated``, the report
        with its findings (and probe snapshot), the facts, ``ok``."""
        extra = {"recovered": True} if recovered else {}
        self.move(StepState.ACTIVATED, **extra)
        rep, found = hist.report_rows(self.device.id, "activate", body,
                                      deployment_id=deployment_id)
        self._rows.append((Report.__table__, [rep.model_dump()]))  # type: ignore[attr-defined]
        if found:
            self._rows.append((Finding.__table__,  # type: ignore[attr-defined]
                               [f.model_dump() for f in found]))
        if body.get("probe"):
            snap = CapabilitySnapshot(device_id=self.device.id, probe=body["probe"])
            self._rows.append((CapabilitySnapshot.__table__,  # type: ignore[attr-defined]
                               [snap.model_dump()]))
        self._facts.append(facts.activation_change(body))  # selectors: hw.*, model.NAME
        self.move(StepState.OK, bytes_sent=bytes_sent, done=True, **extra)

    # -- the one transaction ------------------------------------------------------------
    def _step_values(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        if self._attempts:
            values["attempts"] = _STEPS.c.attempts + self._attempts
        if self._connected_at is not None:
            values.update(state=StepState.CONNECTING, updated_at=self._connected_at,
                          started_at=func.coalesce(_STEPS.c.started_at, self._connected_at))
        if self._moves:
            last = self._moves[-1]
            first = self._connected_at or self._moves[0].at
            values.update(state=last.state, updated_at=last.at, error_code=None,
                          error_message=None,
                          started_at=func.coalesce(_STEPS.c.started_at, first))
            ended = [m.at for m in self._moves if m.done or m.state.terminal]
            if ended:
                values["finished_at"] = ended[-1]
            sent = [m.bytes_sent for m in self._moves if m.bytes_sent is not None]
            if sent:
                values["bytes_sent"] = sent[-1]
        return values

    def _device_values(self, conn: Any) -> dict[str, Any]:
        values: dict[str, Any] = dict(self._fields)
        if self._facts:  # a read-modify-write of a row other deployments share: locked
            row = conn.execute(select(_DEVICES.c.facts).where(_DEVICES.c.id == self.device.id)
                               .with_for_update()).first()
            if row is None:
                raise errors.NotFoundError(f"no device {self.device.name}",
                                           device=self.device.name)
            doc = dict(row[0] or {})
            for change in self._facts:
                change(doc)
            values["facts"] = {k: v for k, v in doc.items() if v is not None}
        values.update(self._contact or {})
        return values

    def flush(self) -> None:
        """Write what is kept, in order, in one transaction (none when nothing is); on an
        error nothing of it is written and all of it is kept. NotFoundError when the step
        or the device is gone; the registry's errors otherwise."""
        step = self._step_values()
        if not (step or self._events or self._contact or self._facts or self._fields
                or self._rows):
            return
        with self.reg.session() as s:
            conn = s.connection()
            if step and conn.execute(update(_STEPS).where(_STEPS.c.id == self.step_id)
                                     .values(**step)).rowcount == 0:
                raise errors.NotFoundError(f"no deployment step {self.step_id}",
                                           step=str(self.step_id))
            if self._events:
                conn.execute(insert(_EVENTS), self._events)
            device = self._device_values(conn)
            if device and conn.execute(update(_DEVICES).where(_DEVICES.c.id == self.device.id)
                                       .values(**device)).rowcount == 0:
                raise errors.NotFoundError(f"no device {self.device.name}",
                                           device=self.device.name)
            for table, rows in self._rows:
                conn.execute(insert(table), rows)
        self._attempts, self._connected_at, self._contact = 0, None, None
        self._moves, self._events, self._facts, self._fields, self._rows = [], [], [], {}, []
