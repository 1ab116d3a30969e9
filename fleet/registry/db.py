"""Engine, migrations and the schema check every command runs first.

SQLite runs in WAL mode with a busy timeout, and every transaction starts with
``BEGIN IMMEDIATE`` so two writers queue instead of failing on a lock upgrade.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine

from fleet.core import errors

__all__ = ["MIGRATIONS_DIR", "alembic_config", "check_schema", "make_engine", "migrate"]

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _rec: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True)


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def check_schema(engine: Engine, url: str) -> None:
    """Refuse a database that is uninitialised, older, or newer than this code."""
    script = ScriptDirectory.from_config(alembic_config(url))
    heads = set(script.get_heads())
    with engine.connect() as conn:
        current = set(MigrationContext.configure(conn).get_current_heads())
    if not current:
        raise errors.NotInitializedError(
            f"no fleet registry at {url}: run `fleet init` first", url=url)
    known = {rev.revision for rev in script.walk_revisions()}
    unknown = current - known
    if unknown:
        raise errors.SchemaTooNewError(
            f"the registry's schema ({', '.join(sorted(unknown))}) is newer than this fleet "
            f"(knows up to {', '.join(sorted(heads))}); upgrade mnn-fleet", url=url,
            db_revision=sorted(unknown), code_heads=sorted(heads))
    if current != heads:
        raise errors.RegistryError(
            f"the registry's schema ({', '.join(sorted(current))}) is older than this fleet; "
            "run `fleet init` to migrate it", url=url)
