"""Listings that stay fast at any fleet size: devices streamed as JSON, status in SQL.

``fleet device list --ndjson`` over 100k devices cannot afford a Python object per device
(an ORM row, a dict, ``json.dumps``: ~30 µs each, seconds in all), so the database builds
each device's JSON object itself (SQLite's ``json_object``, PostgreSQL's ``row_to_json``),
its groups and its selector facts included through correlated subqueries on indexes, and
:func:`device_lines` streams the text as the rows come: a server-side cursor on
PostgreSQL, SQLite's own stepping cursor, ``yield_per`` batches; memory stays flat
whatever the count. The object has exactly :data:`DEVICE_KEYS` (the fields of
``fleet.cli.cmd_device.device_row``; tests/test_registry_listing.py keeps the two equal):
times are ISO 8601 UTC as ``datetime.isoformat`` writes them, ``id`` the dashed UUID,
``facts`` without the planner's ``_`` keys (:data:`PRIVATE_FACTS`), ``groups`` sorted.

:func:`status_summary` and :func:`group_summary` answer ``fleet status`` and
``fleet group show`` with aggregates (counts per status, per group) and a bounded list
of devices, in a fixed number of queries.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, literal_column
from sqlalchemy import select as sa_select
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import col, select

from fleet.registry.api import Registry
from fleet.registry.models import Device, Group, Membership

__all__ = ["DEVICE_KEYS", "PRIVATE_FACTS", "GroupSummary", "StatusSummary", "device_lines",
           "group_summary", "in_group", "status_summary"]

#: the keys of each listed device's JSON object, sorted
DEVICE_KEYS = ("agent_root", "agent_version", "facts", "fingerprint", "groups", "id",
               "last_error", "last_seen", "name", "platform", "revoked", "revoked_at",
               "root_version", "status", "tags", "uri", "via")

#: rows fetched per round trip while streaming
BATCH = 2000


def _sqlite_ts(column: str) -> str:
    # SQLAlchemy stores SQLite datetimes as 'YYYY-MM-DD HH:MM:SS.ffffff' (UTC here);
    # isoformat() leaves the fraction out when it is zero
    return (f"CASE WHEN {column} IS NULL THEN NULL "
            f"WHEN substr({column}, 21) = '000000' "
            f"THEN replace(substr({column}, 1, 19), ' ', 'T') || '+00:00' "
            f"ELSE replace({column}, ' ', 'T') || '+00:00' END")


def _sqlite_uuid(column: str) -> str:
    return (f"lower(substr({column}, 1, 8) || '-' || substr({column}, 9, 4) || '-' || "
            f"substr({column}, 13, 4) || '-' || substr({column}, 17, 4) || '-' || "
            f"substr({column}, 21))")


#: the planner's detail in ``devices.facts`` (fleet.registry.facts), never listed as facts;
#: tests/test_registry_listing.py checks that the facts code writes no other ``_`` key
PRIVATE_FACTS = ("_installed", "_disk_free", "_probed_at", "_status_at")
_SQLITE_PRIVATE = ", ".join(f"'$.{k}'" for k in PRIVATE_FACTS)
_PG_PRIVATE = "'{" + ",".join(PRIVATE_FACTS) + "}'::text[]"

_SQLITE_DEVICE = ("json_object("
                  "'agent_root', devices.agent_root, "
                  "'agent_version', devices.agent_version, "
                  f"'facts', json_remove(devices.facts, {_SQLITE_PRIVATE}), "
                  "'fingerprint', devices.fingerprint, "
                  "'groups', (SELECT json_group_array(name) FROM ("
                  "SELECT groups.name AS name FROM memberships JOIN groups "
                  "ON groups.id = memberships.group_id "
                  "WHERE memberships.device_id = devices.id ORDER BY groups.name)), "
                  f"'id', {_sqlite_uuid('devices.id')}, "
                  "'last_error', devices.last_error, "
                  f"'last_seen', {_sqlite_ts('devices.last_seen')}, "
                  "'name', devices.name, "
                  "'platform', devices.platform, "
                  "'revoked', json(CASE WHEN devices.revoked_at IS NULL THEN 'false' "
                  "ELSE 'true' END), "
                  f"'revoked_at', {_sqlite_ts('devices.revoked_at')}, "
                  "'root_version', devices.root_version, "
                  "'status', devices.status, "
                  "'tags', json(devices.tags), "
                  "'uri', devices.uri, "
                  "'via', devices.via)")


def _pg_ts(column: str) -> str:
    utc = f"({column} AT TIME ZONE 'UTC')"
    return (f"CASE WHEN {column} IS NULL THEN NULL ELSE "
            f"to_char({utc}, 'YYYY-MM-DD\"T\"HH24:MI:SS') || "
            f"CASE WHEN extract(microseconds FROM {utc})::bigint % 1000000 = 0 THEN '' "
            f"ELSE to_char({utc}, '.US') END || '+00:00' END")


_PG_DEVICE = ("(SELECT row_to_json(r)::text FROM (SELECT "
              "devices.agent_root, devices.agent_version, "
              f"(devices.facts::jsonb - {_PG_PRIVATE}) AS facts, "
              "devices.fingerprint, "
              "(SELECT coalesce(json_agg(groups.name ORDER BY groups.name COLLATE \"C\"), "
              "'[]'::json) FROM memberships JOIN groups ON groups.id = memberships.group_id "
              "WHERE memberships.device_id = devices.id) AS groups, "
              "devices.id::text AS id, devices.last_error, "
              f"{_pg_ts('devices.last_seen')} AS last_seen, "
              "devices.name, devices.platform, "
              "devices.revoked_at IS NOT NULL AS revoked, "
              f"{_pg_ts('devices.revoked_at')} AS revoked_at, "
              "devices.root_version, devices.status, devices.tags, devices.uri, "
              "devices.via) AS r)")


def _device_json(dialect: str) -> Any:
    return literal_column(_PG_DEVICE if dialect == "postgresql" else _SQLITE_DEVICE)


def device_lines(reg: Registry, *, where: Sequence[ColumnElement[bool]] = (),
                 limit: int | None = None) -> Iterator[str]:
    """Each device's JSON object (one line of text, no newline), sorted by name, filtered
    by ``where`` (SQL criteria on ``devices``: a group's members, selectors,
    :func:`fleet.registry.selectors.criteria`); at most ``limit``. One query, streamed in
    batches of :data:`BATCH` rows: the caller may write each line as it comes. Storage
    faults raise registry errors."""
    dialect = reg.engine.dialect.name
    stmt = sa_select(_device_json(dialect)).select_from(Device)
    for clause in where:
        stmt = stmt.where(clause)
    stmt = stmt.order_by(col(Device.name))
    if limit is not None:
        stmt = stmt.limit(limit)
    with reg.reading() as s:
        conn = s.connection()
        if dialect == "postgresql":  # a whole fleet's sort in memory, not on disk
            conn.exec_driver_sql("SET LOCAL work_mem = '64MB'")
        result = conn.execution_options(stream_results=True, yield_per=BATCH).execute(stmt)
        for (line,) in result:
            yield line


def in_group(group_id: Any) -> ColumnElement[bool]:
    """The criterion "a member of the group with this id", for :func:`device_lines`: an
    EXISTS probe of the membership's primary key per device, so the devices are read in
    name order from their index (no sort of the whole group)."""
    return (sa_select(col(Membership.device_id))
            .where(col(Membership.group_id) == group_id,
                   col(Membership.device_id) == col(Device.id))).exists()


@dataclass(frozen=True)
class StatusSummary:
    """``fleet status`` in numbers: devices per status and per group, and the first
    ``attention`` devices whose last contact failed (``attention_total`` of them in all)."""

    devices: int
    by_status: dict[str, int]
    groups: list[tuple[str, int]]
    attention: list[dict[str, Any]] = field(default_factory=list)
    attention_total: int = 0


def _attention_rows(rows: Any) -> list[dict[str, Any]]:
    return [{"name": n, "status": st, "last_error": e, "last_seen": seen}
            for n, st, e, seen in rows]


def status_summary(reg: Registry, attention_states: Sequence[str], *,
                   attention_limit: int = 50) -> StatusSummary:
    """Counts per status (one aggregate), per group (one aggregate), and the devices in
    ``attention_states`` (most recently seen first, at most ``attention_limit``)."""
    with reg.reading() as s:
        by_status = {str(st): int(n) for st, n in s.exec(
            select(col(Device.status), func.count()).group_by(col(Device.status))).all()}
        groups = [(str(name), int(n)) for name, n in s.exec(
            select(col(Group.name), func.count(col(Membership.device_id)))
            .outerjoin(Membership, col(Membership.group_id) == col(Group.id))
            .group_by(col(Group.id), col(Group.name)).order_by(col(Group.name))).all()]
        states = list(attention_states)
        attention = _attention_rows(s.exec(
            select(col(Device.name), col(Device.status), col(Device.last_error),
                   col(Device.last_seen)).where(col(Device.status).in_(states))
            .order_by(col(Device.last_seen).desc(), col(Device.name))
            .limit(attention_limit)).all())
    total = sum(n for st, n in by_status.items() if st in states)
    return StatusSummary(sum(by_status.values()), by_status, groups, attention, total)


@dataclass(frozen=True)
class GroupSummary:
    """``fleet group show``: the group, its size, its devices per status, and the first
    ``limit`` of its devices by name (name, platform, status, last error, uri)."""

    name: str
    description: str
    id: Any
    created_at: datetime
    devices: int
    by_status: dict[str, int]
    first: list[dict[str, Any]]


def group_summary(reg: Registry, name: str, *, limit: int = 50) -> GroupSummary:
    """One group in three queries whatever its size. NotFoundError for an unknown group."""
    g = reg.get_group(name)
    members = in_group(g.id)
    with reg.reading() as s:
        by_status = {str(st): int(n) for st, n in s.exec(
            select(col(Device.status), func.count()).where(members)
            .group_by(col(Device.status))).all()}
        first = [{"name": n, "platform": p, "status": st, "last_error": e, "uri": u}
                 for n, p, st, e, u in s.connection().execute(
                     sa_select(col(Device.name), col(Device.platform), col(Device.status),
                               col(Device.last_error), col(Device.uri)).where(members)
                     .order_by(col(Device.name)).limit(limit)).all()]
    return GroupSummary(g.name, g.description, g.id, g.created_at, sum(by_status.values()),
                        by_status, first)
