"""Migrations: upgrade on an empty database, downgrade to base, and no drift."""

from __future__ import annotations

from pathlib import Path

import pytest
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

TABLES = {"devices", "groups", "memberships", "capability_snapshots", "artifacts",
          "artifact_versions",
          "deployments", "deployment_steps", "step_events", "reports", "findings",
          "public_keys", "lora_state"}


def test_upgrade_head_on_empty_db_creates_every_table(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    migrate(url)
    names = set(inspect(make_engine(url)).get_table_names())
    assert names >= TABLES
    assert "alembic_version" in names


def test_downgrade_base_removes_everything(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    migrate(url)
    command.downgrade(alembic_config(url), "base")
    names = set(inspect(make_engine(url)).get_table_names())
    assert not (TABLES & names)


def test_autogenerate_finds_no_difference(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    migrate(url)
    with make_engine(url).connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True,
                                                     "render_as_batch": True})
        diff = compare_metadata(ctx, SQLModel.metadata)
    assert diff == []


def test_wal_mode_is_on(registry: Registry) -> None:
    with registry.engine.connect() as conn:
        mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
    assert mode == "wal"


def test_newer_schema_is_refused(home: FleetHome, registry: Registry) -> None:
    with registry.engine.connect() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num='ffffffffffff'")
        conn.exec_driver_sql("COMMIT")
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


def test_a_registry_at_an_unknown_revision_is_refused_as_newer(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    migrate(url)
    with make_engine(url).connect() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'feedfacecafe'")
        conn.commit()
    with pytest.raises(errors.SchemaTooNewError):
        Registry.open(FleetHome(tmp_path / "h", db_override=url))


def test_artifact_versions_are_back_filled_first_digest_wins(tmp_path: Path) -> None:
    """A registry from before UNIQUE(name, version), holding the race's two digests for
    m@1: the upgrade keeps the first as m@1's digest and leaves the package rows alone."""
    url = f"sqlite:///{tmp_path / 'r.db'}"
    migrate(url, "9fdd65f42854")
    with make_engine(url).connect() as conn:
        for i, (version, digest, at) in enumerate([(1, "aa", "2026-01-01 00:00:01"),
                                                   (1, "bb", "2026-01-01 00:00:02"),
                                                   (2, "cc", "2026-01-01 00:00:03")]):
            conn.exec_driver_sql(
                "INSERT INTO artifacts (id, name, kind, version, digest, package_sha256, size,"
                " path, manifest, created_at) VALUES (?, 'm', 'model', ?, ?, ?, 1, '/x', '{}',"
                " ?)", (f"{i:032x}", version, digest, f"p{i}", at))
        conn.commit()
    migrate(url, "b7c41e2d9a53")
    with make_engine(url).connect() as conn:
        rows = conn.exec_driver_sql("SELECT name, version, digest FROM artifact_versions "
                                    "ORDER BY version").fetchall()
        kept = conn.exec_driver_sql("SELECT count(*) FROM artifacts").scalar()
    assert [tuple(r) for r in rows] == [("m", 1, "aa"), ("m", 2, "cc")]
    assert kept == 3
