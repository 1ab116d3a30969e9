"""What happened: artifacts built, deployments and their per-device steps (every state
change is a row), reports and findings, capability snapshots, LoRA state."""

from __future__ import annotations

import uuid
from typing import Any

from sqlmodel import col, select

from fleet.registry.api import Registry
from fleet.registry.models import (
    Artifact,
    CapabilitySnapshot,
    Deployment,
    DeploymentStep,
    Device,
    Finding,
    LoraState,
    Report,
    StepEvent,
)
from fleet.registry.types import utcnow

__all__ = [
    "add_report",
    "add_snapshot",
    "create_deployment",
    "finish_deployment",
    "latest_reports",
    "lora_states",
    "next_version",
    "record_artifact",
    "reports_for",
    "set_lora_state",
    "set_step",
    "step_events",
    "steps_of",
]

TERMINAL = {"ok", "staged", "skipped", "failed"}


def next_version(reg: Registry, name: str) -> int:
    with reg.session() as s:
        rows = s.exec(select(Artifact.version).where(Artifact.name == name)).all()
    return max(rows, default=0) + 1


def record_artifact(reg: Registry, *, name: str, kind: str, version: int, digest: str,
                    package_sha256: str, size: int, path: str, manifest: dict[str, Any]
                    ) -> Artifact:
    with reg.session() as s:
        found = s.exec(select(Artifact).where(Artifact.package_sha256 == package_sha256)).first()
        if found:
            return found
        art = Artifact(name=name, kind=kind, version=version, digest=digest,
                       package_sha256=package_sha256, size=size, path=path, manifest=manifest)
        s.add(art)
        return art


def create_deployment(reg: Registry, *, name: str, version: int, target: str,
                      devices: list[Device], artifact_id: uuid.UUID | None,
                      options: dict[str, Any] | None = None) -> tuple[Deployment,
                                                                       dict[str, DeploymentStep]]:
    with reg.session() as s:
        dep = Deployment(name=name, version=version, target=target, artifact_id=artifact_id,
                         options=options or {})
        s.add(dep)
        s.flush()
        steps = {}
        for d in devices:
            st = DeploymentStep(deployment_id=dep.id, device_id=d.id)
            s.add(st)
            s.flush()
            s.add(StepEvent(step_id=st.id, state="pending"))
            steps[d.name] = st
        return dep, steps


def set_step(reg: Registry, step_id: uuid.UUID, state: str, *, error_code: str | None = None,
             error_message: str | None = None, bytes_sent: int | None = None,
             attempt: bool = False, **detail: Any) -> None:
    """Move a step to ``state`` and append the event row (one transaction)."""
    with reg.session() as s:
        st = s.get(DeploymentStep, step_id)
        assert st is not None
        st.state = state
        st.updated_at = utcnow()
        if error_code is not None or state != "failed":
            st.error_code = error_code
            st.error_message = error_message
        if bytes_sent is not None:
            st.bytes_sent = bytes_sent
        if attempt:
            st.attempts += 1
        s.add(st)
        ev_detail = dict(detail)
        if error_code:
            ev_detail.update(error_code=error_code, error_message=error_message)
        s.add(StepEvent(step_id=step_id, state=state, detail=ev_detail))


def finish_deployment(reg: Registry, deployment_id: uuid.UUID) -> str:
    with reg.session() as s:
        dep = s.get(Deployment, deployment_id)
        assert dep is not None
        states = [st.state for st in s.exec(
            select(DeploymentStep).where(DeploymentStep.deployment_id == deployment_id)).all()]
        failed = sum(1 for x in states if x == "failed")
        unfinished = sum(1 for x in states if x not in TERMINAL)
        dep.status = ("failed" if failed == len(states) and states else
                      "partial" if failed or unfinished else "ok")
        dep.finished_at = utcnow()
        s.add(dep)
        return dep.status


def steps_of(reg: Registry, deployment_id: uuid.UUID) -> list[tuple[DeploymentStep, Device]]:
    with reg.session() as s:
        stmt = (select(DeploymentStep, Device)
                .join(Device, col(Device.id) == col(DeploymentStep.device_id))
                .where(DeploymentStep.deployment_id == deployment_id)
                .order_by(col(Device.name)))
        return [(a, b) for a, b in s.exec(stmt).all()]


def step_events(reg: Registry, step_id: uuid.UUID) -> list[StepEvent]:
    with reg.session() as s:
        return list(s.exec(select(StepEvent).where(StepEvent.step_id == step_id)
                           .order_by(col(StepEvent.at))).all())


def add_report(reg: Registry, device: Device, kind: str, body: dict[str, Any], *,
               deployment_id: uuid.UUID | None = None) -> Report:
    """Store one agent report and its findings."""
    pick = body.get("pick") or {}
    rep = Report(device_id=device.id, deployment_id=deployment_id, kind=kind,
                 model_name=body.get("name"), model_version=body.get("version"),
                 configured_backend=body.get("configured_backend"),
                 effective_backend=body.get("effective_backend") or pick.get("effective_backend"),
                 recommended_backend=body.get("recommended_backend") or pick.get("backend"),
                 median_ms=pick.get("median_ms"), body=body)
    with reg.session() as s:
        s.add(rep)
        s.flush()
        for f in body.get("findings") or []:
            s.add(Finding(report_id=rep.id, device_id=device.id, rule_id=str(f.get("id")),
                          severity=str(f.get("severity", "info")),
                          message=str(f.get("message", "")), fix=str(f.get("fix", ""))))
        return rep


def reports_for(reg: Registry, device: Device, *, kind: str | None = None, limit: int = 20
                ) -> list[Report]:
    with reg.session() as s:
        stmt = select(Report).where(Report.device_id == device.id)
        if kind:
            stmt = stmt.where(Report.kind == kind)
        return list(s.exec(stmt.order_by(col(Report.created_at).desc()).limit(limit)).all())


def latest_reports(reg: Registry, devices: list[Device], kinds: tuple[str, ...]
                   ) -> dict[str, Report | None]:
    out: dict[str, Report | None] = {}
    with reg.session() as s:
        for d in devices:
            stmt = (select(Report).where(Report.device_id == d.id)
                    .where(col(Report.kind).in_(kinds))
                    .order_by(col(Report.created_at).desc()).limit(1))
            out[d.name] = s.exec(stmt).first()
    return out


def findings_of(reg: Registry, report: Report) -> list[Finding]:
    with reg.session() as s:
        return list(s.exec(select(Finding).where(Finding.report_id == report.id)).all())


def add_snapshot(reg: Registry, device: Device, probe: dict[str, Any]) -> None:
    with reg.session() as s:
        s.add(CapabilitySnapshot(device_id=device.id, probe=probe))


def set_lora_state(reg: Registry, device: Device, base_name: str, adapter_name: str | None,
                   adapter_version: int | None) -> None:
    with reg.session() as s:
        row = s.get(LoraState, (device.id, base_name))
        if row is None:
            row = LoraState(device_id=device.id, base_name=base_name)
        elif row.adapter_name:
            row.previous = f"{row.adapter_name}@{row.adapter_version}"
        row.adapter_name = adapter_name
        row.adapter_version = adapter_version
        row.updated_at = utcnow()
        s.add(row)


def lora_states(reg: Registry, device: Device) -> list[LoraState]:
    with reg.session() as s:
        return list(s.exec(select(LoraState).where(LoraState.device_id == device.id)).all())


