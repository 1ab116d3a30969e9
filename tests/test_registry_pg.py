"""The registry on a real PostgreSQL server (the run's private cluster, tests/pgfixture.py):
its faults are one clear line with the registry's exit codes, as on SQLite
(tests/test_registry_errors.py), and the cluster is private. The faults are real: a port
nobody listens on, a wrong password, a database that does not exist, a row another
session holds, a database switched read-only, a tablespace on a full tmpfs. Only the
serialization failure and the deadlock are built as psycopg's own exception objects: the
registry runs at READ COMMITTED and takes its locks in one order, so it cannot be made
to meet them for real."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.exc import OperationalError

from fleet.cli._exit import exit_code_for
from fleet.core import errors
from fleet.lab import pg
from fleet.registry.faults import registry_error_for
from tests.test_registry_errors import fleet, one_clear_line


@pytest.fixture
def db(pg_cluster: pg.PgCluster, pg_database: str) -> str:
    """The URL of this test's (empty) database."""
    return pg_cluster.url(pg_database)


def _home(tmp_path: Path, url: str) -> tuple[Path, dict[str, str]]:
    """A home whose registry is ``url``, initialised, with group g and device a."""
    home, env = tmp_path / "home", {"FLEET_DB": url}
    assert fleet(home, "init", env=env).returncode == 0
    assert fleet(home, "group", "create", "g", env=env).returncode == 0
    r = fleet(home, "device", "add", f"local://a?root={tmp_path / 'dev-a'}", "--name", "a",
              "--group", "g", "--no-enroll", env=env)
    assert r.returncode == 0, r.stderr
    return home, env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the cluster -------------------------------------------------------------------------
def test_the_cluster_is_private(pg_cluster: pg.PgCluster) -> None:
    """Run by an unprivileged user, its socket directory closed to others, TCP only with
    the generated password."""
    pid = int((pg_cluster.data_dir / "postmaster.pid").read_text().split()[0])
    uid = int(Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[0])
    assert uid != 0 and uid == os.stat(pg_cluster.data_dir).st_uid
    assert stat.S_IMODE(os.stat(pg_cluster.socket_dir).st_mode) == 0o700
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(host="127.0.0.1", port=pg_cluster.port, user="fleet",
                        dbname="postgres", password="not-it", connect_timeout=5)
    with psycopg.connect(host="127.0.0.1", port=pg_cluster.port, user="fleet",
                         dbname="postgres", password=pg_cluster.password) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


# -- unreachable, refused login, no database ---------------------------------------------
def test_a_server_nobody_answers_is_exit_25(tmp_path: Path) -> None:
    for url in (f"postgresql+psycopg://fleet:pw@127.0.0.1:{_free_port()}/fleet",
                f"postgresql+psycopg://fleet@/fleet?host={tmp_path}&port=5"):
        r = fleet(tmp_path / "h", "status", env={"FLEET_DB": url})
        line = one_clear_line(r)
        assert r.returncode == 25 and "cannot reach the registry server" in line, line
        assert "pw" not in line  # never the password


def test_a_refused_login_and_a_missing_database_are_exit_21(
        tmp_path: Path, pg_cluster: pg.PgCluster, pg_database: str) -> None:
    wrong = pg_cluster.url(pg_database, host="127.0.0.1").replace(
        f":{pg_cluster.password}@", ":not-the-password@")
    r = fleet(tmp_path / "h", "status", env={"FLEET_DB": wrong})
    line = one_clear_line(r)
    assert r.returncode == 21 and "refused the login" in line and "not-the-password" not in line
    r = fleet(tmp_path / "h", "status", env={"FLEET_DB": pg_cluster.url("no_such_db")})
    assert r.returncode == 21 and "no database" in one_clear_line(r)


def test_a_bare_postgresql_url_uses_psycopg_and_fleet_init_is_idempotent(
        tmp_path: Path, pg_cluster: pg.PgCluster, pg_database: str) -> None:
    url = pg_cluster.url(pg_database).replace("postgresql+psycopg://", "postgresql://")
    for _ in range(2):
        assert fleet(tmp_path / "h", "init", env={"FLEET_DB": url}).returncode == 0
    r = fleet(tmp_path / "h", "status", "--json", env={"FLEET_DB": url})
    assert r.returncode == 0 and json.loads(r.stdout)["devices"] == 0


# -- locked, read-only ------------------------------------------------------------------
def test_a_row_held_past_the_wait_is_busy_and_reads_go_on(tmp_path: Path, db: str,
                                                          pg_cluster: pg.PgCluster,
                                                          pg_database: str) -> None:
    home, env = _home(tmp_path, db)
    holder = psycopg.connect(**pg_cluster.conninfo(pg_database))
    try:
        holder.execute("SELECT * FROM devices WHERE name = 'a' FOR UPDATE")
        busy = {**env, "FLEET_DB_BUSY_TIMEOUT": "0.5"}
        r = fleet(home, "device", "revoke", "a", "--yes", env=busy)
        line = one_clear_line(r)
        assert r.returncode == 24 and "locked" in line, r.stderr
        assert fleet(home, "status", "--json", env=busy).returncode == 0  # MVCC: reads go on
    finally:
        holder.rollback()
        holder.close()
    assert fleet(home, "device", "revoke", "a", "--yes", env=env).returncode == 0


def test_a_read_only_database_reads_and_refuses_writes(tmp_path: Path, db: str,
                                                       pg_cluster: pg.PgCluster,
                                                       pg_database: str) -> None:
    home, env = _home(tmp_path, db)
    pg_cluster.execute(f'ALTER DATABASE "{pg_database}" SET default_transaction_read_only = on')
    try:
        r = fleet(home, "group", "create", "h", env=env)
        assert r.returncode == exit_code_for(errors.RegistryReadOnlyError("x")) == 22
        assert "read-only" in one_clear_line(r)
        r = fleet(home, "device", "list", "--ndjson", env=env)
        assert r.returncode == 0 and json.loads(r.stdout)["name"] == "a"
    finally:
        pg_cluster.execute(f'ALTER DATABASE "{pg_database}" RESET default_transaction_read_only')
    assert fleet(home, "group", "create", "h", env=env).returncode == 0


# -- full ---------------------------------------------------------------------------------
@pytest.fixture
def full_db(pg_cluster: pg.PgCluster) -> Iterator[tuple[str, Path]]:
    """A database whose tables live in a tablespace on a 4 MiB tmpfs (root: mounts)."""
    assert os.geteuid() == 0, "mounts a tmpfs: needs root (make test runs as root)"
    mnt = Path(tempfile.mkdtemp(prefix="fleet-pg-full-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mnt)],
                   check=True)
    name = f"full{secrets.token_hex(3)}"
    try:
        os.chown(mnt, os.stat(pg_cluster.data_dir).st_uid, os.stat(pg_cluster.data_dir).st_gid)
        pg_cluster.execute(f"CREATE TABLESPACE {name} LOCATION '{mnt}'")
        pg_cluster.execute(f'CREATE DATABASE "{name}" TABLESPACE {name}')
        yield pg_cluster.url(name), mnt
    finally:
        with contextlib.suppress(psycopg.Error):
            pg_cluster.drop_database(name)
            pg_cluster.execute(f"DROP TABLESPACE {name}")
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        with contextlib.suppress(OSError):
            mnt.rmdir()


def test_a_full_disk_refuses_in_one_line_and_loses_nothing(
        tmp_path: Path, full_db: tuple[str, Path]) -> None:
    from tests.test_registry_errors import _fill

    url, mnt = full_db
    home, env = _home(tmp_path, url)
    _fill(mnt)
    r = fleet(home, "device", "add", "local://b?root=/tmp/b", "--name", "b", "--no-enroll",
              "--tag", "k=" + secrets.token_hex(40_000), env=env)  # incompressible: new pages
    line = one_clear_line(r)
    assert r.returncode == 23 and "no space left" in line, r.stderr
    assert fleet(home, "status", "--json", env=env).returncode == 0
    (mnt / "filler").unlink()
    assert fleet(home, "device", "add", "local://b?root=/tmp/b", "--name", "b", "--no-enroll",
                 "--tag", "k=" + secrets.token_hex(40_000), env=env).returncode == 0
    r = fleet(home, "device", "list", "--ndjson", env=env)
    assert [json.loads(x)["name"] for x in r.stdout.splitlines()] == ["a", "b"]


# -- the mapping table ----------------------------------------------------------------------
@pytest.mark.parametrize(("exc", "cls"), [
    (psycopg.errors.SerializationFailure("could not serialize access"),
     errors.RegistryBusyError),
    (psycopg.errors.DeadlockDetected("deadlock detected"), errors.RegistryBusyError),
    (psycopg.errors.LockNotAvailable("canceling statement due to lock timeout"),
     errors.RegistryBusyError),
    (psycopg.errors.DiskFull("could not extend file"), errors.RegistryFullError),
    (psycopg.errors.ReadOnlySqlTransaction("cannot execute INSERT"),
     errors.RegistryReadOnlyError),
    (psycopg.errors.AdminShutdown("terminating connection"), errors.RegistryIOError),
    (psycopg.errors.UndefinedTable('relation "workers" does not exist'),
     errors.RegistryError),
    (psycopg.errors.DataCorrupted("invalid page in block 0 of relation"),
     errors.RegistryError),
])
def test_postgresql_errors_map_to_registry_errors(exc: psycopg.Error,
                                                  cls: type[errors.RegistryError]) -> None:
    wrapped = OperationalError("SELECT ...", {}, exc)
    mapped = registry_error_for(wrapped, "postgresql+psycopg://fleet:secret@db:5432/fleet")
    assert type(mapped) is cls
    assert mapped is not None and "secret" not in mapped.message
    assert "fleet on db:5432" in mapped.message
