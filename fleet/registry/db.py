"""Engine, migrations and the schema check every command runs first.

SQLite runs in WAL mode with a busy timeout, and every transaction starts with
``BEGIN IMMEDIATE`` so two writers queue instead of failing on a lock upgrade. A registry
on a read-only mount is opened ``immutable`` (WAL needs a writable ``-shm`` even to read):
reading commands work, writes fail as :class:`RegistryReadOnlyError`. Storage faults are
mapped to registry errors by :mod:`fleet.registry.faults`.

PostgreSQL (``postgresql+psycopg://``; a bare ``postgresql://`` gets psycopg 3) runs at
READ COMMITTED, so writers are not serialised as a whole: the code that reads and then
writes takes the lock it needs (``SELECT ... FOR UPDATE`` on the row, which SQLite's
compiler leaves out, or :func:`serialize` for a row that may not exist yet). A lock
waited on past ``FLEET_DB_BUSY_TIMEOUT`` (the server's ``lock_timeout``) is
:class:`RegistryBusyError`, as on SQLite; reading transactions are ``READ ONLY``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.orm import Session

from fleet.core import errors
from fleet.registry.faults import map_registry_errors, read_only_fs, sqlite_path

if TYPE_CHECKING:
    from alembic.config import Config

__all__ = ["BUSY_TIMEOUT_ENV", "HEAD_REVISIONS", "READS_ONLY", "alembic_config", "busy_timeout_s",
           "check_schema", "is_postgres", "make_engine", "migrate", "migrations_dir",
           "normalize_url", "open_read_only", "serialize"]

#: execution option of a transaction that only reads: a plain (deferred) BEGIN, so with
#: WAL it goes on while another command holds the write lock (``Registry.reading``)
READS_ONLY = "fleet_reads_only"

#: seconds a writer waits for another one's lock before RegistryBusyError (default 30)
BUSY_TIMEOUT_ENV = "FLEET_DB_BUSY_TIMEOUT"

#: The migration heads this code expects. Every command compares the registry with this
#: set in one plain query, so alembic (about a third of a cold start) is imported only by
#: ``fleet init`` and when the registry is not at head; tests/test_registry_migrations.py
#: checks it equals alembic's heads.
HEAD_REVISIONS = frozenset({"a1c0ffee1801"})


def migrations_dir() -> Path:
    """Where alembic's scripts are, for this install.

    A wheel carries them as the package data ``fleet/migrations`` (pyproject.toml maps the
    top-level ``migrations/`` there), found through importlib.resources. An editable install
    maps only the Python packages, so there they are the ``migrations/`` of the project the
    install points to. Raises :class:`RegistryError` when neither has them (a broken install).
    """
    from importlib.resources import files

    packaged = files("fleet") / "migrations"
    if isinstance(packaged, Path) and (packaged / "env.py").is_file():
        return packaged
    from fleet._version import editable_project

    project = editable_project()
    if project is not None and (project / "migrations" / "env.py").is_file():
        return project / "migrations"
    raise errors.RegistryError(
        "the registry's migrations are missing from this mnn-fleet install (no "
        f"fleet/migrations in {packaged}); reinstall mnn-fleet from its wheel")


def busy_timeout_s() -> float:
    """How long a writer waits for the registry's lock (``FLEET_DB_BUSY_TIMEOUT``, s)."""
    raw = os.environ.get(BUSY_TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else 30.0
    except ValueError as exc:
        raise errors.UsageError(f"{BUSY_TIMEOUT_ENV}={raw!r} is not a number of seconds"
                                ) from exc
    return max(value, 0.0)


def open_read_only(url: str) -> bool:
    """True when ``url`` is an SQLite file on a read-only mount that can be read as
    immutable: no write-ahead log with unmerged pages beside it (a non-empty ``-wal``
    would be ignored, so the registry is then refused rather than read stale)."""
    path = sqlite_path(url)
    if path is None or not path.exists() or not read_only_fs(path):
        return False
    wal = path.with_name(path.name + "-wal")
    return not (wal.exists() and wal.stat().st_size > 0)


def make_engine(url: str, *, read_only: bool = False) -> Engine:
    """The engine for ``url``. ``read_only`` (SQLite files only): open the file immutable,
    for a registry on a read-only mount (:func:`open_read_only`)."""
    if url.startswith("sqlite"):
        timeout = busy_timeout_s()
        path = sqlite_path(url)
        if read_only and path is not None:
            url = f"sqlite:///file:{path}?immutable=1&uri=true"
        engine = create_engine(url, connect_args={"timeout": timeout,
                                                  "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _rec: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            if not read_only:
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            reads = read_only or conn.get_execution_options().get(READS_ONLY, False)
            conn.exec_driver_sql("BEGIN" if reads else "BEGIN IMMEDIATE")

        return engine
    if is_postgres(url):
        return _pg_engine(normalize_url(url))
    return create_engine(url, pool_pre_ping=True)


def normalize_url(url: str) -> str:
    """``url`` with psycopg 3 as the driver of a bare ``postgresql://`` (SQLAlchemy's
    default there is psycopg2, which mnn-fleet does not install); others as they are."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return url
    if parsed.drivername in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+psycopg").render_as_string(
            hide_password=False)
    return url


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql", "postgres:"))


def _pg_engine(url: str) -> Engine:
    """A PostgreSQL engine: lock waits bounded by the busy timeout, connects bounded to
    10 s, reading transactions READ ONLY (a write in one fails, as on SQLite)."""
    wait_ms = int(busy_timeout_s() * 1000)
    # jit off: short OLTP queries pay seconds of LLVM compilation for nothing (a 100k
    # device listing spent 2.7 s in JIT for 6 s of work)
    engine = create_engine(url, pool_pre_ping=True, connect_args={
        "connect_timeout": 10, "options": f"-c lock_timeout={wait_ms} -c jit=off"})

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        if conn.get_execution_options().get(READS_ONLY, False):
            conn.exec_driver_sql("SET TRANSACTION READ ONLY")

    return engine


def _lock_id(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big",
                          signed=True)


def serialize(s: Session | Connection, key: str) -> None:
    """Serialise this transaction with every other one that passes the same ``key`` (a
    name, not a row: it works for rows that do not exist yet, e.g. a version about to be
    claimed). PostgreSQL: a transaction-scoped advisory lock, released at commit or
    rollback. SQLite: nothing to do, ``BEGIN IMMEDIATE`` already serialised all writers."""
    bind = s.get_bind() if isinstance(s, Session) else s
    if bind.dialect.name == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _lock_id(key)})


def alembic_config(url: str) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(url: str, revision: str = "head") -> None:
    """Upgrade the registry to ``revision``; storage faults raise registry errors."""
    from alembic import command

    with map_registry_errors(url):
        command.upgrade(alembic_config(url), revision)


def _current_revisions(engine: Engine, url: str) -> set[str] | None:
    """The registry's ``alembic_version`` rows, or None when the table is missing.
    Raises the registry error of a storage fault (read-only, full, locked, I/O)."""
    with map_registry_errors(url):
        try:
            with engine.connect().execution_options(**{READS_ONLY: True}) as conn:
                return {row[0] for row in conn.execute(text("SELECT version_num FROM "
                                                             "alembic_version"))}
        except DBAPIError as exc:
            if ("no such table" in str(exc.orig)
                    or getattr(exc.orig, "sqlstate", None) == "42P01"):  # undefined_table
                return None
            raise


def check_schema(engine: Engine, url: str) -> None:
    """Refuse a database that is uninitialised, older, or newer than this code.

    Raises :class:`NotInitializedError`, :class:`SchemaTooNewError` or
    :class:`RegistryError` (older schema). The common case (at head) costs one query.
    """
    current = _current_revisions(engine, url)
    if current == HEAD_REVISIONS:
        return
    if not current:
        raise errors.NotInitializedError(
            f"no fleet registry at {url}: run `fleet init` first", url=url)
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config(url))
    heads = set(script.get_heads())
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
