"""farm hosts: device via, workers

Revision ID: a1c0ffee1602
Revises: a1c0ffee1601
Create Date: 2026-11-29 23:59:00.000000

``devices.via`` names the farm host that reaches a device (``fleet device add --via``;
NULL: the controller itself), and ``workers`` holds one row per ``fleet worker`` process
(its Celery queue, machine, pid and heartbeat) for ``fleet worker list`` and the
dispatcher's liveness check (fleet.worker).
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

import fleet.registry.types

revision = "a1c0ffee1602"
down_revision = "a1c0ffee1601"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("via", sqlmodel.sql.sqltypes.AutoString(),
                                      nullable=True))
        batch_op.create_index(batch_op.f("ix_devices_via"), ["via"], unique=False)
    op.create_table(
        "workers",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("host", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("queue", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("hostname", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("concurrency", sa.Integer(), nullable=False),
        sa.Column("started_at", fleet.registry.types.UTCDateTime(timezone=True),
                  nullable=False),
        sa.Column("heartbeat_at", fleet.registry.types.UTCDateTime(timezone=True),
                  nullable=False),
        sa.Column("stopped_at", fleet.registry.types.UTCDateTime(timezone=True),
                  nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_workers_host"), ["host"], unique=False)
        batch_op.create_index(batch_op.f("ix_workers_name"), ["name"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_workers_name"))
        batch_op.drop_index(batch_op.f("ix_workers_host"))
    op.drop_table("workers")
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_devices_via"))
        batch_op.drop_column("via")
