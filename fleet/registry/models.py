"""Registry tables (sqlmodel). UUID keys, UTC timestamps, JSON for structured facts.

No secrets live here: device and controller keys appear only as public parts and
fingerprints. Every state change of a deployment step is its own row (``StepEvent``), so
after a controller crash the registry still says how far each device got: it can be
audited, and ``fleet deployment resume`` reconciles from it
(:mod:`fleet.rollout.reconcile`). A running deployment holds a lease (host, pid,
heartbeat; :mod:`fleet.rollout.lease`). States are enums (:class:`DeploymentState`,
:class:`StepState`), stored as their string values.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Index, UniqueConstraint, text
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator
from sqlmodel import AutoString, Field, SQLModel

from fleet.registry.types import UTCDateTime, utcnow

__all__ = [
    "Artifact",
    "ArtifactVersion",
    "CapabilitySnapshot",
    "Counter",
    "Deployment",
    "DeploymentKind",
    "DeploymentState",
    "DeploymentStep",
    "DesiredState",
    "Device",
    "EnrollmentToken",
    "Finding",
    "Group",
    "LoraState",
    "Membership",
    "PublicKey",
    "Report",
    "StepEvent",
    "StepState",
    "Worker",
]


class _Doc(TypeDecorator[Any]):
    """JSON that selectors look into: ``jsonb`` on PostgreSQL (stored parsed: ``->>`` does
    not re-parse the text of every row, ~10x faster over 100k devices), JSON text on
    SQLite. (A TypeDecorator rather than ``with_variant``: the PostgreSQL dialect is
    imported only where it is used, not at every command's start.)"""

    impl = JSON
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import JSONB

            return dialect.type_descriptor(JSONB())
        return dialect.type_descriptor(JSON())


DOC = _Doc()


def _ts(**kw: Any) -> Any:
    return Field(default_factory=utcnow, sa_type=UTCDateTime, **kw)


class DeploymentState(StrEnum):
    """A deployment's lifecycle (``running`` is the only state that holds a lease)."""

    RUNNING = "running"
    COMPLETED = "completed"  #: every device ended well (ok, staged or skipped)
    FAILED = "failed"  #: some devices failed
    HALTED = "halted"  #: a wave gate stopped it; its rollbacks are recorded on its steps
    INTERRUPTED = "interrupted"  #: Ctrl-C, or its controller died (stale lease): resumable
    CANCELLED = "cancelled"  #: an operator cancelled it (`fleet deployment cancel`)

    @property
    def finished(self) -> bool:
        return self not in (DeploymentState.RUNNING, DeploymentState.INTERRUPTED)


class DeploymentKind(StrEnum):
    DEPLOY = "deploy"
    ROLLBACK = "rollback"  #: `fleet rollback`: its own deployment, ``reverts_id`` if known


class StepState(StrEnum):
    """One device's step; each change is a :class:`StepEvent` row. ``activating`` is
    written *before* the activate call, so after a crash the registry says whether the
    controller asked for an activation (the reconcile table depends on it)."""

    PENDING = "pending"
    CONNECTING = "connecting"
    PUSHING = "pushing"
    PUSHED = "pushed"
    STAGED = "staged"
    ACTIVATING = "activating"
    ACTIVATED = "activated"
    OK = "ok"
    SKIPPED = "skipped"
    FAILED = "failed"
    CANCELLED = "cancelled"  #: its deployment was cancelled before the device finished
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    ROLLBACK_FAILED = "rollback_failed"
    NOT_STARTED = "not_started"  #: a later wave of a halted rollout

    @property
    def terminal(self) -> bool:
        """Nothing more happens to this device in this deployment (``staged`` is terminal
        only for a ``--no-activate`` deployment; the caller decides that)."""
        return self in _TERMINAL_STEPS


_TERMINAL_STEPS = frozenset({StepState.OK, StepState.SKIPPED, StepState.FAILED,
                             StepState.CANCELLED, StepState.ROLLED_BACK,
                             StepState.ROLLBACK_FAILED, StepState.NOT_STARTED})


class _StrEnumColumn(TypeDecorator[StrEnum]):
    """A string column that hands back the enum (unknown strings fail loudly)."""

    impl = AutoString
    cache_ok = True

    def __init__(self, enum: type[StrEnum]) -> None:
        super().__init__()
        self.enum = enum

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else str(self.enum(value).value)

    def process_result_value(self, value: Any, dialect: Dialect) -> StrEnum | None:
        return None if value is None else self.enum(value)



class Device(SQLModel, table=True):
    __tablename__ = "devices"
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    name: str = Field(index=True, unique=True)
    platform: str  # android | ios | linux
    uri: str
    tags: dict[str, str] = Field(default_factory=dict, sa_column=Column(DOC, nullable=False))
    #: fleet.registry.status.DeviceState, from the last contact (indexed: `fleet status`)
    status: str = Field(default="registered", index=True)
    last_seen: datetime | None = Field(default=None, sa_type=UTCDateTime)  # last answer
    last_error: str | None = None  # error code of the last contact, None when it went well
    agent_version: str | None = None
    agent_root: str | None = None
    agent_cmd: list[str] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    public_key: str | None = None  # device P-256 public key, PEM
    fingerprint: str | None = None
    #: the root of trust version the device reported holding (enroll, stage)
    root_version: int | None = None
    #: set by ``fleet device revoke``: no package is made for it again
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    #: selector facts (hw.* of the latest probe, model.NAME, disk.free_gb): flat keys,
    #: refreshed with the snapshot/report they come from (fleet.registry.facts)
    facts: dict[str, Any] = Field(default_factory=dict, sa_column=Column(
        DOC, nullable=False, server_default=text("'{}'")))
    #: the farm host that reaches it (``fleet worker --host NAME``); None: the controller
    via: str | None = Field(default=None, index=True)
    created_at: datetime = _ts()


class Group(SQLModel, table=True):
    __tablename__ = "groups"
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    name: str = Field(index=True, unique=True)
    description: str = ""
    created_at: datetime = _ts()


class Membership(SQLModel, table=True):
    __tablename__ = "memberships"
    #: the primary key serves group -> devices; this one device -> groups, covering (the
    #: group ids are in the index: listings read no table row for them)
    __table_args__ = (Index("ix_memberships_device_id", "device_id", "group_id"),)
    group_id: uuid.UUID = Field(foreign_key="groups.id", primary_key=True, ondelete="CASCADE")
    device_id: uuid.UUID = Field(foreign_key="devices.id", primary_key=True, ondelete="CASCADE")
    added_at: datetime = _ts()


class CapabilitySnapshot(SQLModel, table=True):
    __tablename__ = "capability_snapshots"
    #: a device's latest snapshot
    __table_args__ = (Index("ix_capability_snapshots_device_taken", "device_id", "taken_at"),)
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


class ArtifactVersion(SQLModel, table=True):
    """One ``name@version`` and the payload digest it stands for (fleet.registry.versions).

    ``artifacts`` holds one row per package file, and one payload may be packaged several
    times (for other recipients), so the uniqueness of ``name@version`` lives here: the row
    is inserted when the version is allocated, before the package is built, and the UNIQUE
    constraint makes two concurrent allocations of one version impossible. Names are one
    namespace for models and LoRA packs (the device's store keys them by name alone).
    """

    __tablename__ = "artifact_versions"
    __table_args__ = (UniqueConstraint("name", "version"),)
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    name: str
    version: int
    kind: str = "model"  # model | lora
    digest: str  # sha256 of the plaintext payload
    created_at: datetime = _ts()


class Deployment(SQLModel, table=True):
    """One rollout (waves inside it) or one ``fleet rollback``. ``options`` holds what a
    resume needs (the job: package path and digests, bench, activate; workers, deadline,
    waves and the gate)."""

    __tablename__ = "deployments"
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    artifact_id: uuid.UUID | None = Field(default=None, foreign_key="artifacts.id")
    kind: DeploymentKind = Field(default=DeploymentKind.DEPLOY,
                                 sa_type=_StrEnumColumn(DeploymentKind))
    name: str
    version: int | None = None  #: None: a rollback to each device's previous slot
    target: str  # "group:phones" or "device:a,b"
    status: DeploymentState = Field(default=DeploymentState.RUNNING, index=True,
                                    sa_type=_StrEnumColumn(DeploymentState))
    status_reason: str | None = None  #: why it is interrupted/cancelled/halted
    options: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    halted_at_wave: int | None = None
    reverts_id: uuid.UUID | None = None  #: a rollback: the deployment it reverts
    lease_host: str | None = None
    lease_pid: int | None = None
    heartbeat_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_at: datetime = _ts(index=True)  #: `fleet deployment list`: newest first
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class DeploymentStep(SQLModel, table=True):
    """One device's part of a deployment; ``state`` is the latest of its events."""

    __tablename__ = "deployment_steps"
    __table_args__ = (UniqueConstraint("deployment_id", "device_id"),
                      Index("ix_deployment_steps_deployment_state", "deployment_id", "state"))
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    deployment_id: uuid.UUID = Field(foreign_key="deployments.id", index=True,
                                     ondelete="CASCADE")
    device_id: uuid.UUID = Field(foreign_key="devices.id", index=True, ondelete="CASCADE")
    state: StepState = Field(default=StepState.PENDING, sa_type=_StrEnumColumn(StepState))
    wave: int | None = None  #: 1-based wave of a wave rollout
    error_code: str | None = None
    error_message: str | None = None
    bytes_sent: int = 0
    attempts: int = 0
    started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    updated_at: datetime = _ts()


class StepEvent(SQLModel, table=True):
    __tablename__ = "step_events"
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    step_id: uuid.UUID = Field(foreign_key="deployment_steps.id", index=True, ondelete="CASCADE")
    state: StepState = Field(sa_type=_StrEnumColumn(StepState))
    at: datetime = _ts()
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class Report(SQLModel, table=True):
    __tablename__ = "reports"
    #: a device's latest report of a kind (audit, device listings)
    __table_args__ = (Index("ix_reports_device_kind_created", "device_id", "kind",
                            "created_at"),)
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


class Counter(SQLModel, table=True):
    """Monotonic counters (``sequence``: the signing sequence of packages and rollback
    orders, fleet.registry.counters). Never the clock: a clock once ahead would block
    every later rollback order until real time caught up."""

    __tablename__ = "counters"
    name: str = Field(primary_key=True)
    value: int = Field(sa_type=BigInteger)


class LoraState(SQLModel, table=True):
    """Which adapter each device serves (one row per device and base model)."""

    __tablename__ = "lora_state"
    device_id: uuid.UUID = Field(foreign_key="devices.id", primary_key=True, ondelete="CASCADE")
    base_name: str = Field(primary_key=True)
    adapter_name: str | None = None
    adapter_version: int | None = None
    previous: str | None = None
    updated_at: datetime = _ts()


class Worker(SQLModel, table=True):
    """One ``fleet worker`` process of a farm host (fleet.worker): the Celery queue it
    serves and its heartbeat; ``fleet worker list`` and the dispatcher's liveness check
    read it."""

    __tablename__ = "workers"
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    name: str = Field(index=True, unique=True)  #: Celery node name, ``HOST@machine``
    host: str = Field(index=True)  #: the farm host (the ``via`` of its devices)
    queue: str
    hostname: str  #: the machine it runs on
    pid: int
    concurrency: int = 1
    started_at: datetime = _ts()
    heartbeat_at: datetime = _ts()
    stopped_at: datetime | None = Field(default=None, sa_type=UTCDateTime)  #: clean stop


class EnrollmentToken(SQLModel, table=True):
    """Pull mode: a one-time enrollment token of a ``pull://`` device (``fleet device
    add pull://NAME``). Only its SHA-256 is kept: the token itself is printed once and
    never stored (no secrets in the registry)."""

    __tablename__ = "enrollment_tokens"
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    device_id: uuid.UUID = Field(foreign_key="devices.id", index=True, ondelete="CASCADE")
    token_sha256: str = Field(index=True, unique=True)
    expires_at: datetime = Field(sa_type=UTCDateTime)
    used_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_at: datetime = _ts()


class DesiredState(SQLModel, table=True):
    """Pull mode: what a device should run (fleet.rollout.pull writes it, ``fleet
    server`` signs it at each check-in). ``counter`` comes from the registry's counter
    whenever ``models`` changes, so a device can refuse an older state (no replay)."""

    __tablename__ = "desired_states"
    device_id: uuid.UUID = Field(foreign_key="devices.id", primary_key=True,
                                 ondelete="CASCADE")
    counter: int = Field(sa_type=BigInteger)
    models: list[dict[str, Any]] = Field(default_factory=list,
                                         sa_column=Column(JSON, nullable=False))
    updated_at: datetime = _ts()
