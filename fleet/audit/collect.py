"""Collect audit reports from devices (live through their agents, or the last stored)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fleet.connect import device_session
from fleet.core import errors
from fleet.home import FleetHome
from fleet.registry import Device, Registry
from fleet.registry import history as hist
from fleet.rollout.fanout import DeviceOutcome, DeviceStatus, FleetResult, TaskContext, call_each

__all__ = ["Audit", "AuditRow", "audit_each", "collect_audit"]


@dataclass
class AuditRow:
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

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _rows_from_body(dev: Device, body: dict[str, Any], source: str) -> list[AuditRow]:
    rows = []
    models = body.get("models") or []
    for m in models:
        rows.append(AuditRow(
            device=dev.name, platform=dev.platform, model=m.get("name"),
            version=m.get("version"), configured=m.get("configured_backend"),
            effective=m.get("effective_backend"), recommended=m.get("recommended_backend"),
            median_ms=m.get("median_ms"), cpu_median_ms=m.get("cpu_median_ms"),
            adapter=m.get("adapter"), findings=list(m.get("findings") or []), source=source))
    if not rows:
        rows.append(AuditRow(device=dev.name, platform=dev.platform,
                             findings=list(body.get("findings") or []), source=source))
    return rows


@dataclass
class Audit:
    """The table (one row per device and model) and the fan-out behind it: a device
    without an answer (live) or without a stored report (offline) is a failed outcome."""

    rows: list[AuditRow]
    result: FleetResult[dict[str, Any]]


def collect_audit(home: FleetHome, reg: Registry, devices: list[Device], *, live: bool = True,
                  workers: int = 8, deadline_s: float = 120.0) -> Audit:
    if live:
        result = audit_each(home, devices, workers=workers, deadline_s=deadline_s)
    else:
        result = _stored(reg, devices)
    rows: list[AuditRow] = []
    source = "live" if live else "stored"
    for dev in devices:
        out = result[dev.name]
        if out.ok and out.result is not None:
            body = dict(out.result)
            if live:
                hist.add_report(reg, dev, "audit", _flatten_findings(body))
                reg.touch_device(dev.name)
            rows.extend(_with_adapters(reg, dev, _rows_from_body(dev, body, source)))
        elif live:
            reg.record_contact(dev.name, out.error or errors.FleetError(out.status.value))
            rows.append(AuditRow(dev.name, dev.platform,
                                 error=out.error_text() or out.status.value))
        else:
            rows.append(AuditRow(dev.name, dev.platform, error="no audit report stored",
                                 source="stored"))
    return Audit(rows, result)


def _stored(reg: Registry, devices: list[Device]) -> FleetResult[dict[str, Any]]:
    """The last stored audit report per device, in the fan-out's result shape."""
    latest = hist.latest_reports(reg, devices, ("audit",))
    result: FleetResult[dict[str, Any]] = FleetResult()
    for dev in devices:
        rep = latest.get(dev.name)
        if rep is None:
            err = errors.NotFoundError(f"{dev.name}: no audit report stored", device=dev.name)
            result.add(DeviceOutcome(dev.name, DeviceStatus.FAILED, error=err,
                                     reason=err.message))
        else:
            result.add(DeviceOutcome(dev.name, DeviceStatus.OK, result=dict(rep.body)))
    return result


def audit_each(home: FleetHome, devices: list[Device], *, workers: int = 8,
               deadline_s: float = 120.0, **fanout_kw: Any) -> FleetResult[dict[str, Any]]:
    """Every device's ``audit`` answer (one retry of transport faults)."""
    def task(dev: Device, ctx: TaskContext) -> dict[str, Any]:
        with device_session(home, dev, ctx) as agent:
            return agent.audit(timeout=ctx.deadline.remaining(30))

    kw: dict[str, Any] = {"retries": 1, **fanout_kw}
    return call_each(devices, task, workers=workers, deadline_s=deadline_s, **kw)


def _with_adapters(reg: Registry, dev: Device, rows: list[AuditRow]) -> list[AuditRow]:
    """The LoRA adapter each base model serves on this device, as the registry knows it."""
    serving = {st.base_name: (f"{st.adapter_name}@{st.adapter_version}" if st.adapter_name
                              else "(base only)") for st in hist.lora_states(reg, dev)}
    for row in rows:
        if row.model in serving:
            row.adapter = serving[row.model]
    return rows


def _flatten_findings(body: dict[str, Any]) -> dict[str, Any]:
    """Reports store findings at the top level, one list for all models."""
    out = dict(body)
    found = list(body.get("findings") or [])
    for m in body.get("models") or []:
        for f in m.get("findings") or []:
            found.append({**f, "model": m.get("name")})
    out["findings"] = found
    return out
