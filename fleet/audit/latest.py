"""The stored reports an audit or a fleet report reads, in a fixed number of queries
whatever the fleet size: the newest report per (device, model, version) of the measuring
kinds, the newest audit report per device, and the rollbacks that changed a device's
active version after its last report.

Report kinds (``Report.kind``): ``activate`` (a deploy's health benchmark and pick),
``bench`` (a re-measurement of the active model), ``audit`` (the agent's findings for
every active model), ``probe`` and ``lora``.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, and_, func
from sqlmodel import col, select

from fleet.registry import Registry
from fleet.registry.models import (
    Deployment,
    DeploymentKind,
    DeploymentStep,
    Report,
    StepEvent,
    StepState,
)

__all__ = ["MEASURING_KINDS", "REPORT_KINDS", "RolledBack", "latest_audit_reports",
           "latest_measurement", "latest_model_reports", "rollbacks"]

#: Every kind of report the registry stores (``fleet reports --kind``).
REPORT_KINDS = ("activate", "bench", "audit", "probe", "lora")
#: The kinds whose body holds a health benchmark (candidates, pick, timings).
MEASURING_KINDS = ("activate", "bench")


def latest_model_reports(reg: Registry, device_ids: Sequence[uuid.UUID], *,
                         model: str | None = None,
                         kinds: Sequence[str] = MEASURING_KINDS) -> list[Report]:
    """The newest report of ``kinds`` per (device, model, version) for ``device_ids``
    (all models, or only ``model``); one query. Oldest first."""
    if not device_ids:
        return []
    where: list[ColumnElement[bool]] = [
        col(Report.kind).in_(list(kinds)), col(Report.device_id).in_(list(device_ids)),
        col(Report.model_name).is_not(None), col(Report.model_version).is_not(None)]
    if model is not None:
        where.append(col(Report.model_name) == model)
    newest = (select(col(Report.device_id).label("device_id"),
                     col(Report.model_name).label("model_name"),
                     col(Report.model_version).label("model_version"),
                     func.max(col(Report.created_at)).label("at"))
              .where(*where)
              .group_by(col(Report.device_id), col(Report.model_name),
                        col(Report.model_version)).subquery())
    stmt = (select(Report).join(newest, and_(
        col(Report.device_id) == newest.c.device_id,
        col(Report.model_name) == newest.c.model_name,
        col(Report.model_version) == newest.c.model_version,
        col(Report.created_at) == newest.c.at))
        .where(col(Report.kind).in_(list(kinds)))
        .order_by(col(Report.created_at)))
    with reg.reading() as s:
        return list(s.exec(stmt).all())


def latest_audit_reports(reg: Registry, device_ids: Sequence[uuid.UUID]
                         ) -> dict[uuid.UUID, Report]:
    """Device id -> its newest ``audit`` report (devices without one are absent); one
    query."""
    if not device_ids:
        return {}
    newest = (select(col(Report.device_id).label("device_id"),
                     func.max(col(Report.created_at)).label("at"))
              .where(col(Report.kind) == "audit",
                     col(Report.device_id).in_(list(device_ids)))
              .group_by(col(Report.device_id)).subquery())
    stmt = (select(Report).join(newest, and_(col(Report.device_id) == newest.c.device_id,
                                             col(Report.created_at) == newest.c.at))
            .where(col(Report.kind) == "audit"))
    with reg.reading() as s:
        return {r.device_id: r for r in s.exec(stmt).all()}


@dataclass(frozen=True)
class RolledBack:
    """One device's successful ``fleet rollback`` of ``model``: ``current`` is the version
    the agent said is active afterwards (None: no version is active)."""

    device_id: uuid.UUID
    model: str
    current: int | None
    at: datetime


def rollbacks(reg: Registry, device_ids: Sequence[uuid.UUID]) -> list[RolledBack]:
    """Every successful rollback step of ``device_ids`` with the version it left active
    (from the step's ``ok`` event), oldest first; one query."""
    if not device_ids:
        return []
    stmt = (select(DeploymentStep.device_id, Deployment.name, StepEvent.at, StepEvent.detail)
            .join(Deployment, col(Deployment.id) == col(DeploymentStep.deployment_id))
            .join(StepEvent, col(StepEvent.step_id) == col(DeploymentStep.id))
            .where(col(Deployment.kind) == DeploymentKind.ROLLBACK,
                   col(StepEvent.state) == StepState.OK,
                   col(DeploymentStep.device_id).in_(list(device_ids)))
            .order_by(col(StepEvent.at)))
    with reg.reading() as s:
        rows = s.exec(stmt).all()
    out = []
    for dev_id, name, at, detail in rows:
        cur = (detail or {}).get("current")
        out.append(RolledBack(dev_id, name, int(cur) if cur is not None else None, at))
    return out


def latest_measurement(reg: Registry, device_id: uuid.UUID, *, model: str | None = None,
                       kinds: Sequence[str] = MEASURING_KINDS) -> Report | None:
    """The device's newest report of ``kinds`` (of ``model`` when given), or None."""
    stmt = select(Report).where(col(Report.device_id) == device_id,
                                col(Report.kind).in_(list(kinds)))
    if model is not None:
        stmt = stmt.where(col(Report.model_name) == model)
    with reg.reading() as s:
        return s.exec(stmt.order_by(col(Report.created_at).desc()).limit(1)).first()
