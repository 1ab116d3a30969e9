"""artifact versions (UNIQUE name@version) and the device's last contact error

Revision ID: b7c41e2d9a53
Revises: 9fdd65f42854
Create Date: 2026-11-28 10:00:00.000000

``artifact_versions`` is back-filled from ``artifacts``: for each name@version the
earliest package's digest and kind. A registry that already holds two digests under one
name@version (the race this table prevents) keeps the first; the later package rows stay
as they were, for audit, and a new deploy of that build gets a new version.
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
import sqlmodel
from alembic import op

import fleet.registry.types

revision = "b7c41e2d9a53"
down_revision = "9fdd65f42854"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "artifact_versions",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("digest", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("created_at", fleet.registry.types.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name", "version"),
    )
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("last_error", sqlmodel.sql.sqltypes.AutoString(),
                                      nullable=True))

    bind = op.get_bind()
    rows = bind.execute(sa.text(
        "SELECT name, version, kind, digest, created_at FROM artifacts "
        "ORDER BY created_at")).all()
    first: dict[tuple[str, int], dict[str, object]] = {}
    for name, version, kind, digest, created_at in rows:
        first.setdefault((name, version), {
            "id": uuid.uuid4(), "name": name, "version": version, "kind": kind,
            "digest": digest, "created_at": created_at})
    if first:
        # created_at comes back as the backend's raw value; write it through untouched
        ins = sa.table("artifact_versions", sa.column("id", sa.Uuid()), sa.column("name"),
                       sa.column("version"), sa.column("kind"), sa.column("digest"),
                       sa.column("created_at"))
        op.bulk_insert(ins, list(first.values()))


def downgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_column("last_error")
    op.drop_table("artifact_versions")
