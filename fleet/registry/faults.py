"""Registry storage faults mapped to fleet errors at the registry's boundary.

SQLAlchemy wraps the driver's exception (``sqlite3.OperationalError``, psycopg's) in its
own; the operator should read one line that says what is wrong with the registry's
storage, and scripts should get an exit code per kind of fault, as with transports
(httpx's ``map_httpcore_exceptions``):

    sqlite SQLITE_READONLY, SQLITE_PERM, CANTOPEN on a read-only mount,
    PostgreSQL 25006 (read-only transaction: a standby, default_transaction_read_only),
    42501 (this login may not write), OSError EROFS/EACCES/EPERM     -> RegistryReadOnlyError
    sqlite SQLITE_FULL, IOERR on a (nearly) full disk,
    PostgreSQL 53100 (disk full), 53200/53400, OSError ENOSPC/EDQUOT -> RegistryFullError
    sqlite SQLITE_BUSY/LOCKED after the busy timeout,
    PostgreSQL 55P03 (lock_timeout), 40001 (serialization failure),
    40P01 (deadlock), 57014 (statement timeout)                      -> RegistryBusyError
    PostgreSQL: server unreachable (refused, no socket, unknown host, connect timeout),
    connection lost, server shutting down (57P01-57P03, class 08)    -> RegistryIOError
    PostgreSQL: login refused (28000, 28P01, "password authentication failed"),
    no such database (3D000)                                         -> RegistryError
    any other operational failure (disk I/O error)                   -> RegistryIOError
    sqlite SQLITE_NOTADB/SQLITE_CORRUPT (not a database, a damaged
    one), PostgreSQL class XX (data or index corrupted)              -> RegistryError
    a missing table or column (a registry behind this code's schema; sqlite's words,
    PostgreSQL 42P01/42703)                                          -> RegistryError

psycopg reports a failed connection with no SQLSTATE, only libpq's message, so those are
told apart by its words (``connection refused``, ``password authentication failed``).

Integrity errors (a UNIQUE constraint) and programming errors are not storage faults: they
pass through unchanged, for the caller that expects them (or as the bug they are).
"""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, OperationalError

from fleet.core import errors

__all__ = ["map_registry_errors", "os_error_for", "read_only_fs", "registry_error_for",
           "sqlite_path"]

#: below this many free bytes an SQLite "disk I/O error" is a full disk, not a bad one
_NEARLY_FULL = 256 * 1024

_PG_READ_ONLY = {"25006", "42501"}
_PG_FULL = {"53100", "53200", "53400"}
_PG_BUSY = {"55P03", "40001", "40P01", "57014"}
_PG_SCHEMA = {"42P01", "42703"}
_PG_LOGIN = {"28000", "28P01"}
_PG_GONE = {"57P01", "57P02", "57P03"}
#: libpq's words for a connection that never got to the server, or lost it
_PG_UNREACHABLE = ("connection refused", "no such file or directory", "failed to resolve",
                   "could not translate host", "timeout expired", "could not connect",
                   "server closed the connection", "connection is lost",
                   "connection is bad", "no route to host", "network is unreachable",
                   "consuming input failed", "the database system is")
_PG_AUTH = ("password authentication failed", "no password supplied",
            "authentication failed", "no pg_hba.conf entry", "role ")


def sqlite_path(url: str) -> Path | None:
    """The database file of an SQLite URL; None for other backends and in-memory ones."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return None
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    db = parsed.database
    if db == ":memory:" or db.startswith("file:"):
        return Path(db[5:].split("?", 1)[0]) if db.startswith("file:") else None
    return Path(db)


def read_only_fs(path: Path) -> bool:
    """True when the filesystem holding ``path`` (or its nearest existing parent) is
    mounted read-only. Permissions are not asked: root writes through them."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _free_bytes(path: Path) -> int | None:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _where(url: str) -> str:
    """Where the registry is, for a message: the SQLite file, or ``database on host:port``
    (no password) for a server."""
    path = sqlite_path(url)
    if path is not None:
        return str(path)
    try:
        parsed = make_url(url)
    except ArgumentError:
        return url
    if parsed.get_backend_name() == "postgresql":
        host = parsed.host or str(parsed.query.get("host") or "localhost")
        port = parsed.port or parsed.query.get("port") or 5432
        return f"{parsed.database or '?'} on {host}:{port}"
    return parsed.render_as_string(hide_password=True)


def _read_only(where: str, path: Path | None, **details: object) -> errors.RegistryReadOnlyError:
    why = ("its filesystem is mounted read-only" if path is not None and read_only_fs(path)
           else "its storage refuses writes")
    return errors.RegistryReadOnlyError(
        f"the registry {where} is read-only ({why}); nothing was written", path=where,
        **details)


def _full(where: str, **details: object) -> errors.RegistryFullError:
    return errors.RegistryFullError(
        f"no space left for the registry {where}: free space there and run the command "
        "again (nothing was written)", path=where, **details)


def registry_error_for(exc: BaseException, url: str) -> errors.RegistryError | None:
    """The registry error that ``exc`` (raised by the database layer for ``url``) means,
    or None when it is not a storage fault (integrity and programming errors)."""
    if isinstance(exc, IntegrityError):
        return None
    orig: BaseException = exc.orig if isinstance(exc, DBAPIError) and exc.orig else exc
    if isinstance(orig, sqlite3.IntegrityError):
        return None
    where, path = _where(url), sqlite_path(url)
    detail = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    if isinstance(orig, sqlite3.Error):
        return _from_sqlite(orig, where, path, detail)
    if type(orig).__module__.startswith("psycopg"):
        mapped = _from_postgres(orig, where, detail)
        if mapped is not None:
            return mapped
    if isinstance(exc, OperationalError):
        return errors.RegistryIOError(f"the registry {where} failed: {detail}", path=where,
                                      reason=detail)
    return None


def _libpq_reason(orig: BaseException) -> str:
    """The part of libpq's message that says why (``Connection refused``,
    ``password authentication failed for user "fleet"``), on one line."""
    text = " ".join(str(orig).split())
    for cut in ("failed: FATAL: ", "failed: "):
        if cut in text:
            text = text.rsplit(cut, 1)[1]
            break
    for hint in (" Is the server running",):
        text = text.split(hint, 1)[0]
    return text.removeprefix("FATAL: ").strip().rstrip(".")


def _from_postgres(orig: BaseException, where: str, detail: str
                   ) -> errors.RegistryError | None:
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    text = str(orig).lower()
    if code in _PG_SCHEMA:
        return errors.RegistryError(
            f"the registry {where} does not have the tables this fleet expects ({detail}); "
            "run `fleet init` to migrate it", path=where, reason=detail)
    if code in _PG_READ_ONLY:
        return _read_only(where, None, reason=detail)
    if (code or "").startswith("XX0"):  # data_corrupted, index_corrupted
        return _damaged(where, detail)
    if code in _PG_FULL:
        return _full(where, reason=detail)
    if code in _PG_BUSY:
        return errors.RegistryBusyError(
            f"the registry {where} stayed locked by another fleet command past the wait "
            f"({detail}); try again when it finishes (nothing was written)", path=where,
            reason=detail)
    why = _libpq_reason(orig)
    if code == "3D000" or (code is None and "database" in text and "does not exist" in text):
        return errors.RegistryError(
            f"the registry server has no database for {where} ({why}): create it "
            "(createdb), then run `fleet init`", path=where, reason=why)
    if code in _PG_LOGIN or (code is None and any(w in text for w in _PG_AUTH)):
        return errors.RegistryError(
            f"the registry server {where} refused the login ({why}): check the user and "
            "password in FLEET_DB or registry.url in the home's config.toml", path=where,
            reason=why)
    if (code in _PG_GONE or (code or "").startswith("08")
            or (code is None and any(w in text for w in _PG_UNREACHABLE))):
        return errors.RegistryIOError(
            f"cannot reach the registry server {where} ({why}): is PostgreSQL running "
            "there? (nothing was written)", path=where, reason=why)
    return None


_SCHEMA_WORDS = ("no such table", "no such column", "has no column named")
_DAMAGED_WORDS = ("file is not a database", "database disk image is malformed")


def _damaged(where: str, detail: str) -> errors.RegistryError:
    return errors.RegistryError(
        f"the registry {where} is not a readable database ({detail}): restore it from a "
        "backup, or move it aside and run `fleet init` for an empty one", path=where,
        reason=detail)


def _from_sqlite(orig: sqlite3.Error, where: str, path: Path | None, detail: str
                 ) -> errors.RegistryError | None:
    name = getattr(orig, "sqlite_errorname", "") or ""
    text = detail.lower()
    if any(w in text for w in _SCHEMA_WORDS):
        return errors.RegistryError(
            f"the registry {where} does not have the tables this fleet expects ({detail}); "
            "run `fleet init` to migrate it", path=where, reason=detail)
    if (name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT"))
            or any(w in text for w in _DAMAGED_WORDS)):
        return _damaged(where, detail)
    if name.startswith(("SQLITE_READONLY", "SQLITE_PERM")) or "readonly database" in text:
        return _read_only(where, path, reason=detail)
    if name.startswith("SQLITE_FULL") or "database or disk is full" in text:
        return _full(where, reason=detail)
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "database is locked" in text:
        return errors.RegistryBusyError(
            f"the registry {where} stayed locked by another fleet command past the wait; "
            "try again when it finishes (nothing was written)", path=where, reason=detail)
    if path is not None and (name.startswith("SQLITE_CANTOPEN") or "unable to open" in text):
        if read_only_fs(path):
            return _read_only(where, path, reason=detail)
        return errors.RegistryIOError(
            f"cannot open the registry {where} ({detail}): check that its folder exists and "
            "is readable", path=where, reason=detail)
    if name.startswith("SQLITE_IOERR") or "disk i/o error" in text:
        free = _free_bytes(path) if path is not None else None
        if free is not None and free < _NEARLY_FULL:
            return _full(where, reason=detail, free_bytes=free)
        if path is not None and read_only_fs(path):
            return _read_only(where, path, reason=detail)
        return errors.RegistryIOError(
            f"the registry {where} failed a disk read or write ({detail}); nothing was "
            "written", path=where, reason=detail)
    if isinstance(orig, sqlite3.OperationalError):
        return errors.RegistryIOError(f"the registry {where} failed: {detail}", path=where,
                                      reason=detail)
    return None


def os_error_for(exc: OSError, path: Path | str) -> errors.RegistryError | None:
    """The registry error an OSError on the controller home's storage (the registry
    folder, the package cache) means, or None when it is another kind of OSError."""
    where = str(path)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return errors.RegistryFullError(
            f"no space left in {where} (the controller's registry and package cache): free "
            "space there and run the command again", path=where, reason=str(exc))
    if exc.errno == errno.EROFS or (exc.errno in (errno.EACCES, errno.EPERM)
                                    and read_only_fs(Path(where))):
        return errors.RegistryReadOnlyError(
            f"{where} is read-only (the controller's registry and package cache); nothing "
            "was written", path=where, reason=str(exc))
    return None


@contextmanager
def map_registry_errors(url: str) -> Iterator[None]:
    """Raise the registry error a database failure in the block means (``from`` the
    original); anything else passes through unchanged. OSErrors are not mapped here: the
    code that touches a file knows which file it was (:func:`os_error_for`)."""
    try:
        yield
    except errors.FleetError:
        raise
    except DBAPIError as exc:
        mapped = registry_error_for(exc, url)
        if mapped is None:
            raise
        raise mapped from exc
    except Exception as exc:  # the driver's own (sqlite3, psycopg), outside SQLAlchemy
        if not (isinstance(exc, sqlite3.Error)
                or type(exc).__module__.startswith("psycopg")):
            raise
        mapped = registry_error_for(exc, url)
        if mapped is None:
            raise
        raise mapped from exc
