"""root of trust: devices' root version and revocation; the signing sequence counter

Revision ID: e5a7d3c91b24
Revises: c3e8a1f05d17
Create Date: 2026-11-29 12:00:00.000000

``devices.root_version`` (the root of trust a device reported holding),
``devices.revoked_at`` (``fleet device revoke``), and ``counters`` (name -> value): the
monotonic signing sequence of packages and rollback orders, which earlier releases took
from the clock. The counter is created lazily (fleet.registry.counters) and seeded once
above every sequence number already issued, so devices that saw clock-based numbers
accept the next order.
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

import fleet.registry.types

revision = "e5a7d3c91b24"
down_revision = "c3e8a1f05d17"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("root_version", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column(
            "revoked_at", fleet.registry.types.UTCDateTime(timezone=True), nullable=True))
    op.create_table(
        "counters",
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("counters")
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_column("revoked_at")
        batch_op.drop_column("root_version")
