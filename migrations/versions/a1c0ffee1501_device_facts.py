"""device facts for selectors

Revision ID: a1c0ffee1501
Revises: e5a7d3c91b24
Create Date: 2026-11-29 23:59:00.000000

``devices.facts``: the flat facts that ``-l/--selector`` matches in SQL (``hw.*`` from the
latest capability probe, ``model.NAME`` and ``disk.free_gb`` as last reported;
``fleet.registry.facts``). Added NOT NULL with the default ``{}`` (no table rebuild on
SQLite), then backfilled: each device's latest capability snapshot gives its ``hw.*``
facts, and its activation reports, oldest first, the model versions it activated.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

from fleet.registry.types import UTCDateTime

revision = "a1c0ffee1501"
down_revision = "e5a7d3c91b24"
branch_labels = None
depends_on = None

_devices = sa.table("devices", sa.column("id", sa.Uuid()), sa.column("facts", sa.JSON()))
_snapshots = sa.table("capability_snapshots", sa.column("device_id", sa.Uuid()),
                      sa.column("taken_at", UTCDateTime()), sa.column("probe", sa.JSON()))
_reports = sa.table("reports", sa.column("device_id", sa.Uuid()), sa.column("kind", sa.String()),
                    sa.column("model_name", sa.String()),
                    sa.column("model_version", sa.Integer()),
                    sa.column("created_at", UTCDateTime()))


def _backfill(conn: Any) -> None:
    from fleet.registry.facts import hw_facts  # the same flattening the code does

    facts: dict[Any, dict[str, Any]] = {}
    rows = conn.execute(sa.select(_snapshots.c.device_id, _snapshots.c.taken_at,
                                  _snapshots.c.probe).order_by(_snapshots.c.taken_at))
    for device_id, taken_at, probe in rows:  # the latest one per device wins
        if isinstance(probe, dict) and probe:
            f = {k: v for k, v in facts.get(device_id, {}).items() if not k.startswith("hw.")}
            f.update(hw_facts(probe))
            f["_probed_at"] = taken_at.isoformat(timespec="seconds") if taken_at else None
            facts[device_id] = {k: v for k, v in f.items() if v is not None}
    acts = conn.execute(sa.select(_reports.c.device_id, _reports.c.model_name,
                                  _reports.c.model_version)
                        .where(_reports.c.kind == "activate")
                        .order_by(_reports.c.created_at))
    for device_id, name, version in acts:
        if name and isinstance(version, int):
            facts.setdefault(device_id, {})[f"model.{name}"] = version
    for device_id, f in facts.items():
        conn.execute(sa.update(_devices).where(_devices.c.id == device_id).values(facts=f))


def upgrade() -> None:
    # a plain ALTER TABLE ADD COLUMN, never batch mode's table rebuild: on SQLite that
    # drops ``devices`` with foreign keys on, and the drop cascades to every table that
    # references it (memberships, reports, snapshots, steps)
    op.add_column("devices", sa.Column("facts", sa.JSON(), nullable=False,
                                       server_default=sa.text("'{}'")))
    _backfill(op.get_bind())


def downgrade() -> None:
    op.drop_column("devices", "facts")  # ALTER TABLE DROP COLUMN (SQLite 3.35+): no rebuild
