"""Collect audit reports from devices (live through their agents, or the last stored)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fleet.connect import open_device
from fleet.core import errors
from fleet.home import FleetHome
from fleet.registry import Device, Registry
from fleet.registry import history as hist
from fleet.rollout.execute import FanOut, TaskContext

__all__ = ["AuditRow", "collect_audit"]


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


def collect_audit(home: FleetHome, reg: Registry, devices: list[Device], *, live: bool = True,
                  workers: int = 8, deadline_s: float = 120.0) -> list[AuditRow]:
    rows: list[AuditRow] = []
    if not live:
        latest = hist.latest_reports(reg, devices, ("audit",))
        for dev in devices:
            rep = latest.get(dev.name)
            if rep is None:
                rows.append(AuditRow(dev.name, dev.platform, error="no audit report stored",
                                     source="stored"))
            else:
                rows.extend(_with_adapters(reg, dev, _rows_from_body(dev, rep.body,
                                                                     "stored")))
        return rows

    def task(dev: Device, ctx: TaskContext) -> dict[str, Any]:
        transport, agent = open_device(home, dev)
        ctx.add_closer(transport.close)
        with transport:
            doc = agent.call("audit", {}, timeout=ctx.deadline.remaining(30))
        return doc

    outcomes = FanOut(workers=workers, deadline_s=deadline_s, retries=1).run(
        {d.name: d for d in devices}, task)
    for dev in devices:
        out = outcomes[dev.name]
        if out.ok and out.result is not None:
            body = dict(out.result)
            hist.add_report(reg, dev, "audit", _flatten_findings(body))
            reg.touch_device(dev.name)
            rows.extend(_with_adapters(reg, dev, _rows_from_body(dev, body, "live")))
        else:
            err = out.error or errors.FleetError("unknown")
            rows.append(AuditRow(dev.name, dev.platform, error=f"{err.code}: {err.message}"))
    return rows


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
