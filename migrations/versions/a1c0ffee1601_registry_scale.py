"""registry at scale: indexes for what the CLI filters and joins on

Revision ID: a1c0ffee1601
Revises: a1c0ffee1501
Create Date: 2026-11-29 23:59:00.000000

``memberships(device_id, group_id)`` (a device's groups, from the index alone: the
primary key (group_id, device_id) only serves a group's devices), ``devices(status)``
(``fleet status``, ``-l status=...``), ``reports(device_id, kind, created_at)`` (a
device's latest report of a kind),
``capability_snapshots(device_id, taken_at)`` (its latest probe),
``deployments(status)`` (the stale-lease reaper reads the running ones at every
command), ``deployments(created_at)`` (``deployment list``, newest first) and
``deployment_steps(deployment_id, state)`` (a deployment's counts per state).

On PostgreSQL, ``devices.tags`` and ``devices.facts`` become ``jsonb`` (what selectors
look into: ``->>`` on ``json`` re-parses the text of every row); SQLite keeps JSON text.
No data changes.
"""

from __future__ import annotations

from alembic import op

revision = "a1c0ffee1601"
down_revision = "a1c0ffee1501"
branch_labels = None
depends_on = None

#: (table, index name, columns)
INDEXES = [
    ("memberships", "ix_memberships_device_id", ["device_id", "group_id"]),
    ("devices", "ix_devices_status", ["status"]),
    ("reports", "ix_reports_device_kind_created", ["device_id", "kind", "created_at"]),
    ("capability_snapshots", "ix_capability_snapshots_device_taken",
     ["device_id", "taken_at"]),
    ("deployments", "ix_deployments_status", ["status"]),
    ("deployments", "ix_deployments_created_at", ["created_at"]),
    ("deployment_steps", "ix_deployment_steps_deployment_state", ["deployment_id", "state"]),
]


#: PostgreSQL only: JSON columns stored as jsonb
JSONB_COLUMNS = [("devices", "tags", None), ("devices", "facts", "'{}'")]


def _retype(to: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, column, default in JSONB_COLUMNS:
        if default is not None:
            op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} DROP DEFAULT")
        op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} TYPE {to} "
                   f"USING {column}::{to}")
        if default is not None:
            op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET DEFAULT "
                       f"{default}::{to}")


def upgrade() -> None:
    for table, name, columns in INDEXES:
        op.create_index(name, table, columns, unique=False)
    _retype("jsonb")


def downgrade() -> None:
    _retype("json")
    for table, name, _ in reversed(INDEXES):
        op.drop_index(name, table_name=table)
