"""A read-only, full or locked registry is one clear line with an exit code of its own
(issue 13, fault 7; case ``registry-disk``). The disks are real: a small tmpfs mounted by
the test (root only), remounted read-only or filled; nothing is mocked. The CLI runs in
subprocesses, as an operator runs it (an in-process engine would hold files open and keep
the mount from going read-only)."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.cli._exit import exit_code_for
from fleet.core import errors
from fleet.registry.faults import os_error_for, registry_error_for
from tests.conftest import REPO

needs_root = pytest.mark.usefixtures("_as_root")


@pytest.fixture
def _as_root() -> None:
    assert os.geteuid() == 0, "mounts a tmpfs: needs root (make test runs as root)"


def fleet(home: Path, *args: str, env: dict[str, str] | None = None
          ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleet", *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO,
                          env={"FLEET_HOME": str(home), "NO_COLOR": "1", "COLUMNS": "200",
                               "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                               "PYTHONPATH": f"{REPO / 'agents'}:{REPO}", **(env or {})})


def one_clear_line(r: subprocess.CompletedProcess[str]) -> str:
    """The stderr of a refused command: one ``error:`` line, no traceback, no SQL."""
    assert "Traceback" not in r.stderr and "sqlalchemy" not in r.stderr.lower(), r.stderr
    assert "OperationalError" not in r.stderr and "Background on this error" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "mnt"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(path)], check=False)
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def fleet_home(mnt: Path, tmp_path: Path) -> Path:
    home = mnt / "home"
    assert fleet(home, "init").returncode == 0
    assert fleet(home, "group", "create", "g").returncode == 0
    r = fleet(home, "device", "add", f"local://a?root={tmp_path / 'dev-a'}", "--name", "a",
              "--group", "g", "--no-enroll")
    assert r.returncode == 0, r.stderr
    return home


def _fill(mnt: Path) -> None:
    """Fill the tmpfs to the last page (unbuffered writes, smaller and smaller)."""
    fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (1 << 20, 1 << 16, 1 << 12, 512):
            while True:
                try:
                    os.write(fd, b"\0" * chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)


# -- read-only ---------------------------------------------------------------------------
@needs_root
def test_a_read_only_registry_still_reads_and_refuses_writes_in_one_line(
        mnt: Path, fleet_home: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    r = fleet(fleet_home, "status", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["devices"] == 1 and doc["registry_read_only"] is True
    assert "read-only" in r.stderr
    r = fleet(fleet_home, "device", "list", "--ndjson")
    assert r.returncode == 0 and json.loads(r.stdout)["name"] == "a"
    r = fleet(fleet_home, "group", "create", "h")
    line = one_clear_line(r)
    assert r.returncode == exit_code_for(errors.RegistryReadOnlyError("x")) == 22
    assert "read-only" in line and "mounted read-only" in line
    r = fleet(fleet_home, "group", "create", "h", "--json")  # --json still says why
    assert r.returncode == 22 and "read-only" in one_clear_line(r)
    subprocess.run(["mount", "-o", "remount,rw", str(mnt)], check=True)
    r = fleet(fleet_home, "group", "list", "--json")
    assert [g["name"] for g in json.loads(r.stdout)] == ["g"]  # nothing was written


# -- full --------------------------------------------------------------------------------
@needs_root
def test_a_full_registry_disk_refuses_in_one_line_and_loses_nothing(
        mnt: Path, fleet_home: Path) -> None:
    _fill(mnt)
    for args in (("group", "create", "big-" + "x" * 3000),
                 ("device", "add", "local://b?root=/tmp/b", "--name", "b", "--no-enroll",
                  "--tag", "k=" + "v" * 20000)):
        r = fleet(fleet_home, *args)
        line = one_clear_line(r)
        assert r.returncode in (23, 25), r.stderr  # full; or the disk I/O error of a full disk
        assert "no space left" in line or "disk" in line
    r = fleet(fleet_home, "status", "--json")  # SQLite's WAL needs room for its -shm even
    if r.returncode != 0:                       # to read: then it is the same clear line
        assert r.returncode == 23 and "no space left" in one_clear_line(r)
    (mnt / "filler").unlink()
    r = fleet(fleet_home, "device", "list", "--ndjson")
    assert [json.loads(x)["name"] for x in r.stdout.splitlines()] == ["a"]
    db = sqlite3.connect(fleet_home / "registry.db")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()
    assert fleet(fleet_home, "group", "create", "h").returncode == 0  # and writes again


# -- locked too long ---------------------------------------------------------------------
def test_a_registry_locked_past_the_wait_is_busy_and_reads_go_on(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert fleet(home, "init").returncode == 0
    holder = sqlite3.connect(home / "registry.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer that does not let go
    try:
        env = {"FLEET_DB_BUSY_TIMEOUT": "0.3"}
        r = fleet(home, "group", "create", "g", env=env)
        line = one_clear_line(r)
        assert r.returncode == 24 and "locked" in line, r.stderr
        assert fleet(home, "status", "--json", env=env).returncode == 0  # WAL: reads go on
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert fleet(home, "group", "create", "g").returncode == 0


# -- not a database ----------------------------------------------------------------------
def test_a_registry_file_that_is_not_a_database_is_exit_21_and_kept(tmp_path: Path) -> None:
    """Garbage (random bytes, or a text file) where registry.db should be: every command,
    `fleet init` included, refuses in one line (exit 21) and leaves the file as it was."""
    home = tmp_path / "home"
    assert fleet(home, "init").returncode == 0
    db = home / "registry.db"
    for junk, commands in ((os.urandom(8192), [("group", "create", "g"), ("init",)]),
                           (b"not a database\n", [("status", "--json")])):
        for side in ("-wal", "-shm"):
            db.with_name(db.name + side).unlink(missing_ok=True)
        db.write_bytes(junk)
        for args in commands:
            r = fleet(home, *args)
            line = one_clear_line(r)
            assert r.returncode == 21 and "not a readable database" in line, (args, line)
            if "--json" in args:
                assert json.loads(r.stdout)["error"]["exit"] == 21
        assert db.read_bytes() == junk  # nothing overwritten


# -- the mapping table -------------------------------------------------------------------
@pytest.mark.parametrize(("message", "cls"), [
    ("attempt to write a readonly database", errors.RegistryReadOnlyError),
    ("database or disk is full", errors.RegistryFullError),
    ("database is locked", errors.RegistryBusyError),
    ("no such column: deployments.lease_host", errors.RegistryError),
    ("database disk image is malformed", errors.RegistryError),
])
def test_sqlite_errors_map_to_registry_errors(tmp_path: Path, message: str,
                                              cls: type[errors.RegistryError]) -> None:
    from sqlalchemy.exc import OperationalError

    exc = OperationalError("INSERT ...", {}, sqlite3.OperationalError(message))
    mapped = registry_error_for(exc, f"sqlite:///{tmp_path / 'r.db'}")
    assert type(mapped) is cls
    assert mapped is not None and "sqlalchemy" not in mapped.message.lower()


def test_integrity_errors_are_not_storage_faults(tmp_path: Path) -> None:
    from sqlalchemy.exc import IntegrityError

    exc = IntegrityError("INSERT", {}, sqlite3.IntegrityError("UNIQUE constraint failed"))
    assert registry_error_for(exc, f"sqlite:///{tmp_path / 'r.db'}") is None


def test_os_errors_of_the_home_map_to_registry_errors(tmp_path: Path) -> None:
    full = os_error_for(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    ro = os_error_for(OSError(errno.EROFS, "Read-only file system"), tmp_path)
    assert isinstance(full, errors.RegistryFullError)
    assert isinstance(ro, errors.RegistryReadOnlyError)
    assert os_error_for(OSError(errno.ENOENT, "gone"), tmp_path) is None
    assert exit_code_for(full) == 23 and exit_code_for(ro) == 22


def test_every_registry_error_has_its_own_exit_code() -> None:
    classes = [errors.RegistryError, errors.RegistryReadOnlyError, errors.RegistryFullError,
               errors.RegistryBusyError, errors.RegistryIOError, errors.SchemaTooNewError,
               errors.NotInitializedError]
    codes = [exit_code_for(c("x")) for c in classes]
    assert len(set(codes)) == len(codes) and 1 not in codes
    assert errors.RegistryBusyError.retryable
