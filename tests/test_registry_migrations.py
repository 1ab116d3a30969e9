"""Migrations: upgrade on an empty database, downgrade to base, and no drift; on SQLite and
on PostgreSQL (tests/pgfixture.py)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlmodel import SQLModel

import fleet.registry.models  # noqa: F401
from fleet.core import errors
from fleet.home import FleetHome
from fleet.registry import Registry
from fleet.registry.db import HEAD_REVISIONS, alembic_config, make_engine, migrate
from fleet.registry.types import UTCDateTime

pytestmark = pytest.mark.backends

TABLES = {"devices", "groups", "memberships", "capability_snapshots", "artifacts",
          "artifact_versions",
          "deployments", "deployment_steps", "step_events", "reports", "findings",
          "public_keys", "lora_state"}


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_head_on_empty_db_creates_every_table(db_url: str) -> None:
    migrate(db_url)
    names = _tables(db_url)
    assert names >= TABLES
    assert "alembic_version" in names


def test_downgrade_base_removes_everything_and_upgrades_again(db_url: str) -> None:
    migrate(db_url)
    command.downgrade(alembic_config(db_url), "base")
    assert not (TABLES & _tables(db_url))
    migrate(db_url)  # every downgrade left what its upgrade can build on again
    assert _tables(db_url) >= TABLES


def test_autogenerate_finds_no_difference(db_url: str) -> None:
    migrate(db_url)
    engine = make_engine(db_url)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True,
                                                     "render_as_batch": True})
        diff = compare_metadata(ctx, SQLModel.metadata)
    engine.dispose()
    assert diff == []


def test_selector_documents_are_jsonb_on_postgresql(registry: Registry, db_backend: str
                                                    ) -> None:
    types = {c["name"]: str(c["type"]) for c in inspect(registry.engine).get_columns("devices")}
    want = "JSONB" if db_backend == "postgresql" else "JSON"
    assert (types["tags"], types["facts"]) == (want, want)


@pytest.mark.backends("sqlite")
def test_wal_mode_is_on(registry: Registry) -> None:
    with registry.engine.connect() as conn:
        mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
    assert mode == "wal"


def test_newer_schema_is_refused(home: FleetHome, registry: Registry) -> None:
    with registry.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num='ffffffffffff'")
    with pytest.raises(errors.SchemaTooNewError, match="newer than this fleet"):
        Registry.open(home)


def test_uninitialised_home_is_refused(home: FleetHome) -> None:
    with pytest.raises(errors.NotInitializedError, match="fleet init"):
        Registry.open(home)


def test_timestamps_are_utc_aware(registry: Registry, tmp_path: Path) -> None:
    dev = registry.add_device("d1", f"local://d1?root={tmp_path}")
    again = registry.get_device("d1")
    assert dev.created_at.tzinfo is not None
    assert again.created_at.utcoffset().total_seconds() == 0  # type: ignore[union-attr]


def test_the_fast_schema_check_knows_alembics_heads() -> None:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert set(script.get_heads()) == HEAD_REVISIONS


def test_a_registry_at_an_unknown_revision_is_refused_as_newer(tmp_path: Path,
                                                                db_url: str) -> None:
    migrate(db_url)
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'feedfacecafe'")
    engine.dispose()
    with pytest.raises(errors.SchemaTooNewError):
        Registry.open(FleetHome(tmp_path / "h", db_override=db_url))


def test_artifact_versions_are_back_filled_first_digest_wins(db_url: str) -> None:
    """A registry from before UNIQUE(name, version), holding the race's two digests for
    m@1: the upgrade keeps the first as m@1's digest and leaves the package rows alone."""
    migrate(db_url, "9fdd65f42854")
    artifacts = sa.table("artifacts", sa.column("id", sa.Uuid()), sa.column("name"),
                         sa.column("kind"), sa.column("version"), sa.column("digest"),
                         sa.column("package_sha256"), sa.column("size"), sa.column("path"),
                         sa.column("manifest", sa.JSON()), sa.column("created_at", UTCDateTime()))
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(sa.insert(artifacts), [
            {"id": uuid.UUID(int=i + 1), "name": "m", "kind": "model", "version": version,
             "digest": digest, "package_sha256": f"p{i}", "size": 1, "path": "/x",
             "manifest": {}, "created_at": datetime(2026, 1, 1, 0, 0, second, tzinfo=UTC)}
            for i, (version, digest, second) in enumerate([(1, "aa", 1), (1, "bb", 2),
                                                           (2, "cc", 3)])])
    migrate(db_url, "b7c41e2d9a53")
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT name, version, digest FROM artifact_versions "
                                    "ORDER BY version").fetchall()
        kept = conn.exec_driver_sql("SELECT count(*) FROM artifacts").scalar()
    engine.dispose()
    assert [tuple(r) for r in rows] == [("m", 1, "aa"), ("m", 2, "cc")]
    assert kept == 3
