"""Registry tables (sqlmodel). UUID keys, UTC timestamps, JSON for structured facts.

No secrets live here: device and controller keys appear only as public parts and
fingerprints. Every state change of a deployment step is its own row (``StepEvent``), so
a deployment survives a controller crash and can be resumed or audited.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, UniqueConstraint
from sqlmodel import Field, SQLModel

from fleet.registry.types import UTCDateTime, utcnow

__all__ = [
    "Artifact",
    "CapabilitySnapshot",
    "Deployment",
    "DeploymentStep",
    "Device",
    "Finding",
    "Group",
    "LoraState",
    "Membership",
    "PublicKey",
    "Report",
    "StepEvent",
]


def _ts(**kw: Any) -> Any:
    return Field(default_factory=utcnow, sa_type=UTCDateTime, **kw)



class Device(SQLModel, table=True):
    __tablename__ = "devices"
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    name: str = Field(index=True, unique=True)
    platform: str  # android | ios | linux
    uri: str
    tags: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    status: str = "registered"  # registered | enrolled | ok | degraded | failed | unreachable
    last_seen: datetime | None = Field(default=None, sa_type=UTCDateTime)
    agent_version: str | None = None
    agent_root: str | None = None
    agent_cmd: list[str] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    public_key: str | None = None  # device P-256 public key, PEM
    fingerprint: str | None = None
    created_at: datetime = _ts()


class Group(SQLModel, table=True):
    __tablename__ = "groups"
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    name: str = Field(index=True, unique=True)
    description: str = ""
    created_at: datetime = _ts()


class Membership(SQLModel, table=True):
    __tablename__ = "memberships"
    group_id: uuid.UUID = Field(foreign_key="groups.id", primary_key=True, ondelete="CASCADE")
    device_id: uuid.UUID = Field(foreign_key="devices.id", primary_key=True, ondelete="CASCADE")
    added_at: datetime = _ts()


class CapabilitySnapshot(SQLModel, table=True):
    __tablename__ = "capability_snapshots"
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    device_id: uuid.UUID = Field(foreign_key="devices.id", index=True, ondelete="CASCADE")
    taken_at: datetime = _ts()
    probe: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class Artifact(SQLModel, table=True):
    """A package the controller built: one row per .fpkg file."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("package_sha256"),)
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    name: str = Field(index=True)
    kind: str = "model"  # model | lora
    version: int
    digest: str  # sha256 of the plaintext payload
    package_sha256: str
    size: int
    path: str
    manifest: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = _ts()


class Deployment(SQLModel, table=True):
    __tablename__ = "deployments"
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    artifact_id: uuid.UUID | None = Field(default=None, foreign_key="artifacts.id")
    name: str
    version: int
    target: str  # "group:phones" or "device:a,b"
    status: str = "running"  # running | ok | partial | failed
    options: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = _ts()
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class DeploymentStep(SQLModel, table=True):
    """One device's part of a deployment; ``state`` is the latest of its events."""

    __tablename__ = "deployment_steps"
    __table_args__ = (UniqueConstraint("deployment_id", "device_id"),)
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    deployment_id: uuid.UUID = Field(foreign_key="deployments.id", index=True,
                                     ondelete="CASCADE")
    device_id: uuid.UUID = Field(foreign_key="devices.id", index=True, ondelete="CASCADE")
    state: str = "pending"  # pending|pushing|pushed|staged|activated|ok|skipped|failed
    error_code: str | None = None
    error_message: str | None = None
    bytes_sent: int = 0
    attempts: int = 0
    updated_at: datetime = _ts()


class StepEvent(SQLModel, table=True):
    __tablename__ = "step_events"
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    step_id: uuid.UUID = Field(foreign_key="deployment_steps.id", index=True, ondelete="CASCADE")
    state: str
    at: datetime = _ts()
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class Report(SQLModel, table=True):
    __tablename__ = "reports"
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    device_id: uuid.UUID = Field(foreign_key="devices.id", index=True, ondelete="CASCADE")
    deployment_id: uuid.UUID | None = Field(default=None, foreign_key="deployments.id")
    kind: str  # activate | bench | audit | probe | lora
    model_name: str | None = None
    model_version: int | None = None
    configured_backend: str | None = None
    effective_backend: str | None = None
    recommended_backend: str | None = None
    median_ms: float | None = None
    body: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = _ts()


class Finding(SQLModel, table=True):
    __tablename__ = "findings"
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    report_id: uuid.UUID = Field(foreign_key="reports.id", index=True, ondelete="CASCADE")
    device_id: uuid.UUID = Field(foreign_key="devices.id", index=True, ondelete="CASCADE")
    rule_id: str
    severity: str
    message: str
    fix: str = ""
    created_at: datetime = _ts()


class PublicKey(SQLModel, table=True):
    """Public halves only: controller signing keys seen, for audit and rotation."""

    __tablename__ = "public_keys"
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    kind: str  # controller_signing | device
    fingerprint: str = Field(index=True, unique=True)
    public_key: str
    created_at: datetime = _ts()


class LoraState(SQLModel, table=True):
    """Which adapter each device serves (one row per device and base model)."""

    __tablename__ = "lora_state"
    device_id: uuid.UUID = Field(foreign_key="devices.id", primary_key=True, ondelete="CASCADE")
    base_name: str = Field(primary_key=True)
    adapter_name: str | None = None
    adapter_version: int | None = None
    previous: str | None = None
    updated_at: datetime = _ts()
