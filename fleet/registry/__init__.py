"""The fleet registry: SQLite (WAL) or any SQLAlchemy URL, migrated with alembic."""

from __future__ import annotations

from fleet.registry.api import Registry
from fleet.registry.models import (
    Artifact,
    CapabilitySnapshot,
    Counter,
    Deployment,
    DeploymentStep,
    Device,
    Finding,
    Group,
    LoraState,
    Membership,
    PublicKey,
    Report,
    StepEvent,
)

__all__ = [
    "Artifact",
    "CapabilitySnapshot",
    "Counter",
    "Deployment",
    "DeploymentStep",
    "Device",
    "Finding",
    "Group",
    "LoraState",
    "Membership",
    "PublicKey",
    "Registry",
    "Report",
    "StepEvent",
]
