"""deployment lifecycle: kind, lease, waves, timings, states

Revision ID: c3e8a1f05d17
Revises: b7c41e2d9a53
Create Date: 2026-11-28 12:00:00.000000

A running deployment holds a lease (``lease_host``, ``lease_pid``, ``heartbeat_at``); a
wave rollout is one deployment (``deployment_steps.wave``, ``halted_at_wave``); a
``fleet rollback`` is a deployment of kind ``rollback`` (``version`` may be NULL: each
device's previous slot; ``reverts_id``). Old states are renamed: ``ok`` -> ``completed``,
``partial`` -> ``failed``; a ``running`` row from before has no lease, so the next
command marks it ``interrupted``.
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

import fleet.registry.types

revision = "c3e8a1f05d17"
down_revision = "b7c41e2d9a53"
branch_labels = None
depends_on = None

_TS = fleet.registry.types.UTCDateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(),
                                      nullable=False, server_default="deploy"))
        batch_op.add_column(sa.Column("status_reason", sqlmodel.sql.sqltypes.AutoString(),
                                      nullable=True))
        batch_op.add_column(sa.Column("halted_at_wave", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("reverts_id", sa.Uuid(), nullable=True))
        batch_op.add_column(sa.Column("lease_host", sqlmodel.sql.sqltypes.AutoString(),
                                      nullable=True))
        batch_op.add_column(sa.Column("lease_pid", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("heartbeat_at", _TS, nullable=True))
        batch_op.alter_column("version", existing_type=sa.Integer(), nullable=True)
    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.alter_column("kind", server_default=None)
    op.execute("UPDATE deployments SET status = 'completed' WHERE status = 'ok'")
    op.execute("UPDATE deployments SET status = 'failed' WHERE status = 'partial'")
    with op.batch_alter_table("deployment_steps", schema=None) as batch_op:
        batch_op.add_column(sa.Column("wave", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("started_at", _TS, nullable=True))
        batch_op.add_column(sa.Column("finished_at", _TS, nullable=True))


def downgrade() -> None:
    op.execute("UPDATE deployments SET status = 'ok' WHERE status = 'completed'")
    op.execute("UPDATE deployments SET status = 'partial' WHERE status NOT IN "
               "('ok', 'running', 'failed')")
    op.execute("DELETE FROM deployments WHERE version IS NULL")
    with op.batch_alter_table("deployment_steps", schema=None) as batch_op:
        batch_op.drop_column("finished_at")
        batch_op.drop_column("started_at")
        batch_op.drop_column("wave")
    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.alter_column("version", existing_type=sa.Integer(), nullable=False)
        batch_op.drop_column("heartbeat_at")
        batch_op.drop_column("lease_pid")
        batch_op.drop_column("lease_host")
        batch_op.drop_column("reverts_id")
        batch_op.drop_column("halted_at_wave")
        batch_op.drop_column("status_reason")
        batch_op.drop_column("kind")
