"""Everything the fleet report shows, gathered from the registry as plain dataclasses.

No plotting here, and no device is contacted: the report is what the registry last heard
(:mod:`fleet.audit.stored`: the active version of each model as last reported, rollbacks
included). A fixed number of queries serves any number of devices. Times are UTC,
latencies milliseconds.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func
from sqlmodel import col, select

from fleet.audit.candidates import CandidateTable, candidate_table
from fleet.audit.collect import AuditRow, collect_audit
from fleet.audit.grouping import GroupedFinding
from fleet.audit.latest import latest_measurement, latest_model_reports
from fleet.audit.regression import DEFAULT_THRESHOLD
from fleet.core import errors
from fleet.home import FleetHome
from fleet.registry import Device, Registry
from fleet.registry.models import CapabilitySnapshot, Deployment, DeploymentStep, Report
from fleet.registry.types import utcnow

__all__ = ["DeploymentInfo", "DeviceInfo", "LatencyPoint", "ReportData", "gather"]


@dataclass(frozen=True)
class DeviceInfo:
    """One device: ``arch`` from its latest probe (``"?"`` if never probed), ``backend``
    the backend(s) its active models run on as last reported (``"none"`` without one)."""

    name: str
    platform: str
    arch: str
    backend: str
    groups: tuple[str, ...]
    status: str
    last_seen: datetime | None


@dataclass(frozen=True)
class LatencyPoint:
    """``model@version`` on ``device``: the pick's median and p90 from the newest
    ``activate``/``bench`` report of that version, and the change of the median from the
    previous version reported on the same device (a fraction; None for the first)."""

    device: str
    model: str
    version: int
    median_ms: float | None
    p90_ms: float | None
    config: str | None
    reported_at: datetime
    change: float | None = None
    regression: bool = False

    @property
    def entity(self) -> str:
        return f"{self.model}@{self.version}"


@dataclass(frozen=True)
class DeploymentInfo:
    """One deployment that touched the devices reported on: ``steps`` counts their steps
    per state (``ok``, ``failed``, ``skipped`` ...)."""

    id: uuid.UUID
    kind: str
    model: str
    version: int | None
    state: str
    created_at: datetime
    finished_at: datetime | None
    steps: dict[str, int] = field(default_factory=dict)

    @property
    def entity(self) -> str:
        return f"{self.model}@{self.version}" if self.version is not None else self.model


@dataclass
class ReportData:
    """The report's content; ``candidates`` is the chosen device's latest candidate grid
    (None when no device has an activate/bench report)."""

    generated_at: datetime
    targets: str
    devices: list[DeviceInfo]
    rows: list[AuditRow]
    latency: list[LatencyPoint]
    candidates: CandidateTable | None
    findings: list[GroupedFinding]
    deployments: list[DeploymentInfo]
    regression_threshold: float = DEFAULT_THRESHOLD

    def to_dict(self) -> dict[str, Any]:
        """A summary for ``--json`` (what the files hold, not every figure)."""
        return {"generated_at": self.generated_at.isoformat(), "targets": self.targets,
                "devices": [d.name for d in self.devices],
                "models": sorted({p.entity for p in self.latency}),
                "candidates_of": self.candidates.device if self.candidates else None,
                "findings": [g.to_dict() for g in self.findings],
                "deployments": len(self.deployments)}


def _arches(reg: Registry, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, str]:
    """Device id -> CPU architecture of its newest probe snapshot (one query)."""
    if not ids:
        return {}
    newest = (select(col(CapabilitySnapshot.device_id).label("device_id"),
                     func.max(col(CapabilitySnapshot.taken_at)).label("at"))
              .where(col(CapabilitySnapshot.device_id).in_(list(ids)))
              .group_by(col(CapabilitySnapshot.device_id)).subquery())
    stmt = select(CapabilitySnapshot).join(newest, and_(
        col(CapabilitySnapshot.device_id) == newest.c.device_id,
        col(CapabilitySnapshot.taken_at) == newest.c.at))
    with reg.reading() as s:
        snaps = list(s.exec(stmt).all())
    out = {}
    for snap in snaps:
        probe = snap.probe or {}
        arch = (probe.get("cpu") or {}).get("arch") or (probe.get("os") or {}).get("machine")
        out[snap.device_id] = str(arch or "?")
    return out


def _pick_p90(rep: Report) -> tuple[float | None, str | None]:
    """The picked candidate's p90 and label, from a report body."""
    body = rep.body or {}
    label = (body.get("pick") or {}).get("label")
    for c in body.get("candidates") or []:
        if label is not None and c.get("label") == label:
            return (c.get("timing") or {}).get("p90_ms"), label
    return None, label


def _latency(reg: Registry, devices: Sequence[Device], regressed: set[tuple[str, str, int]]
             ) -> list[LatencyPoint]:
    by_id = {d.id: d for d in devices}
    per: dict[tuple[str, str], list[Report]] = {}
    for rep in latest_model_reports(reg, list(by_id)):
        per.setdefault((by_id[rep.device_id].name, str(rep.model_name)), []).append(rep)
    out = []
    for (dev, model), reps in sorted(per.items()):
        prev: float | None = None
        for rep in sorted(reps, key=lambda r: int(r.model_version or 0)):
            version = int(rep.model_version or 0)
            p90, label = _pick_p90(rep)
            med = rep.median_ms
            change = (med / prev - 1.0) if (med is not None and prev) else None
            out.append(LatencyPoint(dev, model, version, med, p90, label, rep.created_at,
                                    change, (dev, model, version) in regressed))
            prev = med if med is not None else prev
    return out


def _deployments(reg: Registry, ids: Sequence[uuid.UUID], limit: int
                 ) -> list[DeploymentInfo]:
    """The newest ``limit`` deployments with a step on ``ids``, oldest first, and their
    steps on those devices per state (two queries)."""
    if not ids:
        return []
    with reg.reading() as s:
        touched = (select(col(DeploymentStep.deployment_id))
                   .where(col(DeploymentStep.device_id).in_(list(ids))).distinct())
        deps = list(s.exec(select(Deployment).where(col(Deployment.id).in_(touched))
                           .order_by(col(Deployment.created_at).desc()).limit(limit)).all())
        dep_ids = [d.id for d in deps]
        counts = s.exec(select(DeploymentStep.deployment_id, DeploymentStep.state, func.count())
                        .where(col(DeploymentStep.deployment_id).in_(dep_ids),
                               col(DeploymentStep.device_id).in_(list(ids)))
                        .group_by(col(DeploymentStep.deployment_id),
                                  col(DeploymentStep.state))).all() if dep_ids else []
    steps: dict[uuid.UUID, dict[str, int]] = {i: {} for i in dep_ids}
    for dep_id, state, n in counts:
        steps[dep_id][str(getattr(state, "value", state))] = int(n)
    return [DeploymentInfo(d.id, str(getattr(d.kind, "value", d.kind)), d.name, d.version,
                           str(getattr(d.status, "value", d.status)), d.created_at,
                           d.finished_at, steps[d.id]) for d in reversed(deps)]


def _candidates(reg: Registry, devices: Sequence[Device], latency: Sequence[LatencyPoint],
                grid_device: str | None) -> CandidateTable | None:
    names = {d.name: d for d in devices}
    if grid_device is not None:
        dev = names.get(grid_device)
        if dev is None:
            raise errors.UsageError(f"--grid-device {grid_device!r} is not among the "
                                    "devices reported on", device=grid_device)
    else:
        newest = max(latency, key=lambda p: p.reported_at, default=None)
        if newest is None:
            return None
        dev = names[newest.device]
    rep = latest_measurement(reg, dev.id)
    if rep is None:
        if grid_device is not None:
            raise errors.NotFoundError(f"{grid_device}: no activate or bench report stored",
                                       device=grid_device)
        return None
    return candidate_table(dev.name, rep)


def gather(home: FleetHome, reg: Registry, devices: Sequence[Device], *, targets: str = "",
           grid_device: str | None = None, threshold: float = DEFAULT_THRESHOLD,
           deployments: int = 200) -> ReportData:
    """The report on ``devices`` (``targets``: how they were chosen, for the title).

    ``grid_device``: whose candidate grid to draw (default: the device reported most
    recently); ``threshold``: FA-regression's (a fraction); ``deployments``: how many of
    the newest deployments the timeline shows. Raises :class:`UsageError` for a
    ``grid_device`` outside ``devices``, :class:`NotFoundError` when it has no report."""
    devs = list(devices)
    audit = collect_audit(home, reg, devs, live=False, regression_threshold=threshold)
    regressed = {(r.device, str(r.model), int(f["evidence"]["version"]))
                 for r in audit.rows for f in r.findings
                 if f.get("id") == "FA-regression" and f.get("evidence")}
    latency = _latency(reg, devs, regressed)
    arches = _arches(reg, [d.id for d in devs])
    groups = reg.groups_by_device()
    backends: dict[str, set[str]] = {}
    for r in audit.rows:
        if r.effective or r.recommended:
            backends.setdefault(r.device, set()).add(str(r.effective or r.recommended))
    infos = [DeviceInfo(d.name, d.platform, arches.get(d.id, "?"),
                        "+".join(sorted(backends.get(d.name, set()))) or "none",
                        tuple(groups.get(d.name, [])), str(d.status), d.last_seen)
             for d in devs]
    return ReportData(generated_at=utcnow(), targets=targets, devices=infos,
                      rows=audit.rows, latency=latency,
                      candidates=_candidates(reg, devs, latency, grid_device),
                      findings=audit.findings,
                      deployments=_deployments(reg, [d.id for d in devs], deployments),
                      regression_threshold=threshold)
