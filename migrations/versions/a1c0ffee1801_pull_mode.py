"""pull mode: enrollment tokens, desired state

Revision ID: a1c0ffee1801
Revises: a1c0ffee1602
Create Date: 2026-11-30 00:06:00.000000

``enrollment_tokens`` keeps the SHA-256 of each one-time enrollment token of a
``pull://`` device (never the token), with its expiry and when it was used;
``desired_states`` holds, per pull device, what it should run and the registry counter
value of that state (``fleet server`` signs it at each check-in). A pull device's key
lives where every device's does (``devices.public_key``/``fingerprint``).
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

import fleet.registry.types

revision = "a1c0ffee1801"
down_revision = "a1c0ffee1602"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "enrollment_tokens",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("device_id", sa.Uuid(), nullable=False),
        sa.Column("token_sha256", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("expires_at", fleet.registry.types.UTCDateTime(timezone=True),
                  nullable=False),
        sa.Column("used_at", fleet.registry.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("created_at", fleet.registry.types.UTCDateTime(timezone=True),
                  nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("enrollment_tokens", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_enrollment_tokens_device_id"), ["device_id"],
                              unique=False)
        batch_op.create_index(batch_op.f("ix_enrollment_tokens_token_sha256"),
                              ["token_sha256"], unique=True)
    op.create_table(
        "desired_states",
        sa.Column("device_id", sa.Uuid(), nullable=False),
        sa.Column("counter", sa.BigInteger(), nullable=False),
        sa.Column("models", sa.JSON(), nullable=False),
        sa.Column("updated_at", fleet.registry.types.UTCDateTime(timezone=True),
                  nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("device_id"),
    )


def downgrade() -> None:
    op.drop_table("desired_states")
    with op.batch_alter_table("enrollment_tokens", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_enrollment_tokens_token_sha256"))
        batch_op.drop_index(batch_op.f("ix_enrollment_tokens_device_id"))
    op.drop_table("enrollment_tokens")
