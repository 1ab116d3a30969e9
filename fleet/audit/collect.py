"""Collect audit reports from devices (live through their agents, or the last stored),
add the controller-side findings (FA-regression) and group the findings by rule."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlmodel import col, select

from fleet.audit.grouping import GroupedFinding, finding, group_findings
from fleet.audit.regression import DEFAULT_THRESHOLD, find_regressions
from fleet.audit.stored import stored_state
from fleet.connect import device_session
from fleet.core import errors
from fleet.home import FleetHome
from fleet.registry import Device, Registry
from fleet.registry import history as hist
from fleet.registry.models import LoraState
from fleet.registry.types import utcnow
from fleet.rollout.deploy import Opener
from fleet.rollout.fanout import (
    DeviceOutcome,
    DeviceStatus,
    Dispatcher,
    FleetResult,
    Remote,
    TaskContext,
    call_each,
)
from fleet.worker.dispatch import dispatcher_for

__all__ = ["Audit", "AuditRow", "audit_each", "collect_audit"]


@dataclass
class AuditRow:
    """One device and model. ``findings`` are in the agent's shape; ``reported_at``: when
    the data of this row was reported (now, for a live audit); ``note``: why the row may
    not say what one expects (a rollback since the report, no report of this version)."""

    device: str
    platform: str
    model: str | None = None
    version: int | None = None
    configured: str | None = None
    effective: str | None = None
    recommended: str | None = None
    median_ms: float | None = None
    cpu_median_ms: float | None = None
    adapter: str | None = None
    findings: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    source: str = "live"
    reported_at: datetime | None = None
    note: str | None = None

    @property
    def entity(self) -> str | None:
        return f"{self.model}@{self.version}" if self.model else None

    def to_dict(self, now: datetime | None = None) -> dict[str, Any]:
        """JSON shape: ``model`` is ``name@version`` (``name``/``version`` apart too);
        ``findings`` a list of objects; ``age_s`` the age of the data in seconds."""
        now = now or utcnow()
        return {"device": self.device, "platform": self.platform, "model": self.entity,
                "name": self.model, "version": self.version, "configured": self.configured,
                "effective": self.effective, "recommended": self.recommended,
                "median_ms": self.median_ms, "cpu_median_ms": self.cpu_median_ms,
                "adapter": self.adapter, "findings": [finding(f) for f in self.findings],
                "error": self.error, "source": self.source,
                "reported_at": self.reported_at.isoformat() if self.reported_at else None,
                "age_s": round((now - self.reported_at).total_seconds(), 1)
                if self.reported_at else None,
                "note": self.note}


def _row(dev: Device, m: dict[str, Any], source: str, at: datetime | None) -> AuditRow:
    return AuditRow(
        device=dev.name, platform=dev.platform, model=m.get("name"), version=m.get("version"),
        configured=m.get("configured_backend"), effective=m.get("effective_backend"),
        recommended=m.get("recommended_backend"), median_ms=m.get("median_ms"),
        cpu_median_ms=m.get("cpu_median_ms"), adapter=m.get("adapter"),
        findings=list(m.get("findings") or []), source=source, reported_at=at)


def _rows_from_body(dev: Device, body: dict[str, Any], at: datetime) -> list[AuditRow]:
    rows = [_row(dev, m, "live", at) for m in body.get("models") or []]
    if not rows:
        rows.append(AuditRow(device=dev.name, platform=dev.platform,
                             findings=list(body.get("findings") or []), reported_at=at))
    return rows


@dataclass
class Audit:
    """The table (one row per device and model), the fan-out behind it (a device without
    an answer (live) or without a stored report (offline) is a failed outcome) and the
    FA-regression threshold used (a fraction)."""

    rows: list[AuditRow]
    result: FleetResult[dict[str, Any]]
    live: bool = True
    threshold: float = DEFAULT_THRESHOLD

    @property
    def findings(self) -> list[GroupedFinding]:
        """Every finding of every row, grouped by rule."""
        return group_findings((r.device, r.entity, f) for r in self.rows for f in r.findings)

    def ages(self, now: datetime | None = None) -> dict[str, Any]:
        """How old the data is: the newest and the oldest row's ``reported_at`` and their
        age in seconds (None when no row has data)."""
        now = now or utcnow()
        dated = sorted((r.reported_at, r.device) for r in self.rows if r.reported_at)
        if not dated:
            return {"newest_at": None, "newest_device": None, "newest_age_s": None,
                    "oldest_at": None, "oldest_device": None, "oldest_age_s": None}
        (old, old_dev), (new, new_dev) = dated[0], dated[-1]
        return {"newest_at": new.isoformat(), "newest_device": new_dev,
                "newest_age_s": round((now - new).total_seconds(), 1),
                "oldest_at": old.isoformat(), "oldest_device": old_dev,
                "oldest_age_s": round((now - old).total_seconds(), 1)}

    def to_dict(self, now: datetime | None = None) -> dict[str, Any]:
        now = now or utcnow()
        return {"source": "live" if self.live else "stored",
                "rows": [r.to_dict(now) for r in self.rows],
                "findings": [g.to_dict() for g in self.findings],
                "data": self.ages(now), "regression_threshold": self.threshold,
                "failed": len(self.result.failed)}


def collect_audit(home: FleetHome, reg: Registry, devices: list[Device], *, live: bool = True,
                  workers: int = 8, deadline_s: float = 120.0,
                  regression_threshold: float = DEFAULT_THRESHOLD) -> Audit:
    """Audit ``devices``: ask each agent (``live``) or read what the registry last heard,
    then add FA-regression findings (``regression_threshold``: a fraction, 0.10 = 10 %)."""
    if regression_threshold < 0:
        raise errors.UsageError("--regression-threshold must be >= 0")
    rows = (_live_rows(home, reg, devices, workers, deadline_s) if live
            else _stored_rows(reg, devices))
    audit = Audit(rows[0], rows[1], live=live, threshold=regression_threshold)
    _add_adapters(reg, devices, audit.rows)
    _add_regressions(reg, devices, audit)
    return audit


def _live_rows(home: FleetHome, reg: Registry, devices: list[Device], workers: int,
               deadline_s: float) -> tuple[list[AuditRow], FleetResult[dict[str, Any]]]:
    result = audit_each(home, devices, workers=workers, deadline_s=deadline_s,
                        dispatcher=dispatcher_for(home, reg))
    rows: list[AuditRow] = []
    for dev in devices:
        out = result[dev.name]
        if out.ok and out.result is not None:
            body = dict(out.result)
            hist.add_report(reg, dev, "audit", _flatten_findings(body))
            reg.touch_device(dev.name)
            rows.extend(_rows_from_body(dev, body, utcnow()))
        else:
            reg.record_contact(dev.name, out.error or errors.FleetError(out.status.value))
            rows.append(AuditRow(dev.name, dev.platform,
                                 error=out.error_text() or out.status.value))
    return rows, result


def _stored_rows(reg: Registry, devices: list[Device]
                 ) -> tuple[list[AuditRow], FleetResult[dict[str, Any]]]:
    """Rows from what the registry last heard (:func:`stored_state`); a device it heard
    nothing from is a failed outcome."""
    state = stored_state(reg, devices)
    rows: list[AuditRow] = []
    result: FleetResult[dict[str, Any]] = FleetResult()
    for dev in devices:
        models = state.get(dev.name) or []
        if not models:
            err = errors.NotFoundError(f"{dev.name}: no report stored", device=dev.name)
            result.add(DeviceOutcome(dev.name, DeviceStatus.FAILED, error=err,
                                     reason=err.message))
            rows.append(AuditRow(dev.name, dev.platform, error="no report stored",
                                 source="stored"))
            continue
        result.add(DeviceOutcome(dev.name, DeviceStatus.OK,
                                 result={"models": [m.entry for m in models]}))
        dev_rows = []
        for m in models:
            row = _row(dev, {**m.entry, "name": m.name, "version": m.version}, "stored",
                       m.reported_at)
            row.note = m.note
            dev_rows.append(row)
        rows.extend(dev_rows)
    return rows, result


def _add_regressions(reg: Registry, devices: list[Device], audit: Audit) -> None:
    """FA-regression findings on the rows of each device's active version."""
    by_name = {d.name: d for d in devices}
    per_model: dict[str, dict[str, int]] = {}
    for r in audit.rows:
        if r.model and r.version is not None and r.device in by_name:
            per_model.setdefault(r.model, {})[r.device] = int(r.version)
    index = {(r.device, r.model): r for r in audit.rows}
    for model, versions in per_model.items():
        devs = [by_name[n] for n in versions]
        for reg_found in find_regressions(reg, devs, model, version=versions,
                                          threshold=audit.threshold):
            index[(reg_found.device, model)].findings.append(reg_found.to_finding())


def audit_task(home: FleetHome, opener: Opener | None = None
               ) -> Callable[[Device, TaskContext], dict[str, Any]]:
    """One device's ``audit`` answer (a farm worker runs the same task, kind ``audit``)."""
    def task(dev: Device, ctx: TaskContext) -> dict[str, Any]:
        with (opener(dev, ctx) if opener else device_session(home, dev, ctx)) as agent:
            return agent.audit(timeout=ctx.deadline.remaining(30))

    return task


def audit_each(home: FleetHome, devices: list[Device], *, workers: int = 8,
               deadline_s: float = 120.0, dispatcher: Dispatcher | None = None,
               **fanout_kw: Any) -> FleetResult[dict[str, Any]]:
    """Every device's ``audit`` answer (one retry of transport faults); devices behind a
    farm host through its worker when ``dispatcher`` is given."""
    kw: dict[str, Any] = {"retries": 1, **fanout_kw}
    return call_each(devices, audit_task(home), workers=workers, deadline_s=deadline_s,
                     remote=Remote("audit"), dispatcher=dispatcher, **kw)


def _add_adapters(reg: Registry, devices: list[Device], rows: list[AuditRow]) -> None:
    """The LoRA adapter each base model serves on its device, as the registry knows it
    (one query for all devices)."""
    names = {d.id: d.name for d in devices}
    if not names:
        return
    with reg.reading() as s:
        states = s.exec(select(LoraState).where(col(LoraState.device_id).in_(list(names))))
        serving = {(names[st.device_id], st.base_name):
                   f"{st.adapter_name}@{st.adapter_version}" if st.adapter_name
                   else "(base only)" for st in states.all()}
    for row in rows:
        found = serving.get((row.device, str(row.model)))
        if found is not None:
            row.adapter = found


def _flatten_findings(body: dict[str, Any]) -> dict[str, Any]:
    """Reports store findings at the top level, one list for all models."""
    out = dict(body)
    found = list(body.get("findings") or [])
    for m in body.get("models") or []:
        for f in m.get("findings") or []:
            found.append({**f, "model": m.get("name")})
    out["findings"] = found
    return out

