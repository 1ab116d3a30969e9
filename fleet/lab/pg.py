"""A private PostgreSQL cluster for the tests, the lab and the registry benchmark.

Debian's ``postgresql`` package provides the server binaries (``initdb``, ``pg_ctl``
under ``/usr/lib/postgresql/<major>/bin``); this module makes a cluster of its own with
them, independent of any system cluster:

    ROOT/data      the cluster (initdb), owned by the server's user, 0700
    ROOT/run       its unix socket directory (``.s.PGSQL.<port>``), 0700
    ROOT/log       the server log
    ROOT/pg.json   what :func:`load` needs to find it again (port, user, password)

Authentication: ``trust`` on the unix socket only (the socket directory is 0700, so only
the server's user and root reach it); TCP is off unless ``listen`` names addresses, and
then needs the superuser's generated password (scram-sha-256). initdb and the server
refuse to run as root: as root, the cluster is owned and run by the unprivileged
``postgres`` user (Debian's package creates it), and ROOT must be reachable by that user
(:func:`private_root` makes such a directory when the caller's own is not, e.g. under
``/root``). Every command here has a timeout; failures raise
:class:`fleet.core.errors.LabError` with the command and the log's tail.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fleet.core import errors

__all__ = ["PG_BIN_ENV", "PgCluster", "create", "destroy", "load", "pg_bindir",
           "private_root", "server_user", "start", "stop"]

#: a directory holding initdb and pg_ctl, when not Debian's /usr/lib/postgresql/*/bin
PG_BIN_ENV = "FLEET_PG_BIN"
#: the database the fleet uses in a lab cluster
DEFAULT_DB = "fleet"
#: the cluster's superuser (a database role, not an OS user)
SUPERUSER = "fleet"
_STATE = "pg.json"
_INSTALL_HINT = "apt-get install postgresql"


def pg_bindir() -> Path:
    """Where ``initdb`` and ``pg_ctl`` are: ``$FLEET_PG_BIN``, else the newest Debian
    ``/usr/lib/postgresql/<major>/bin``, else next to ``pg_ctl`` on PATH. Raises LabError
    when PostgreSQL's server is not installed."""
    env = os.environ.get(PG_BIN_ENV)
    candidates = [Path(env)] if env else []
    debian = Path("/usr/lib/postgresql")
    if debian.is_dir():
        majors = sorted((p for p in debian.iterdir() if p.name.isdigit()),
                        key=lambda p: int(p.name), reverse=True)
        candidates += [p / "bin" for p in majors]
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for c in candidates:
        if (c / "initdb").is_file() and (c / "pg_ctl").is_file():
            return c
    raise errors.LabError(f"PostgreSQL's server is not installed (no initdb/pg_ctl): "
                          f"{_INSTALL_HINT}, or set {PG_BIN_ENV}")


def server_user() -> str:
    """The OS user that owns and runs the cluster: ``postgres`` as root, else oneself."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name
    try:
        pwd.getpwnam("postgres")
    except KeyError as exc:
        raise errors.LabError("as root, PostgreSQL runs as the unprivileged user "
                              f"'postgres', which does not exist: {_INSTALL_HINT}") from exc
    return "postgres"


def _reachable_by(path: Path, user: str) -> bool:
    """Whether ``user`` can traverse every directory above ``path`` (x permission)."""
    pw = pwd.getpwnam(user)
    groups = {pw.pw_gid, *(g for g in os.getgrouplist(user, pw.pw_gid))}
    probe = path.resolve()
    for parent in [*reversed(probe.parents)]:
        try:
            st = parent.stat()
        except OSError:
            return False
        if st.st_uid == pw.pw_uid:
            ok = bool(st.st_mode & 0o100)
        elif st.st_gid in groups:
            ok = bool(st.st_mode & 0o010)
        else:
            ok = bool(st.st_mode & 0o001)
        if not ok:
            return False
    return True


def private_root(preferred: Path | None = None, *, prefix: str = "fleet-pg-") -> Path:
    """A directory for a cluster: ``preferred`` when the server's user can reach it, else
    a new 0700 directory under the system's temporary directory (a home under ``/root``
    is closed to ``postgres``). The caller keeps the returned path (lab state, config)."""
    user = server_user()
    if preferred is not None:
        preferred.mkdir(parents=True, exist_ok=True, mode=0o700)
        if _reachable_by(preferred, user):
            return preferred
    return Path(tempfile.mkdtemp(prefix=prefix))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class PgCluster:
    """One private cluster (see the module docstring for the layout under ``root``)."""

    root: Path
    port: int
    os_user: str
    bindir: Path
    password: str | None = None  #: the superuser's password; set when TCP is on
    listen: tuple[str, ...] = ()  #: TCP addresses the server listens on (none: socket only)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "run"

    @property
    def log_file(self) -> Path:
        return self.root / "log"

    def url(self, database: str = DEFAULT_DB, *, host: str | None = None) -> str:
        """The SQLAlchemy URL of ``database``: through the unix socket, or over TCP to
        ``host`` (one of ``listen``) with the superuser's password."""
        if host is None:
            return (f"postgresql+psycopg://{SUPERUSER}@/{database}"
                    f"?host={quote(str(self.socket_dir), safe='/')}&port={self.port}")
        if self.password is None:
            raise errors.UsageError("this cluster does not listen on TCP (no password)")
        return (f"postgresql+psycopg://{SUPERUSER}:{quote(self.password, safe='')}@{host}:"
                f"{self.port}/{database}")

    def conninfo(self, database: str = "postgres") -> dict[str, Any]:
        """psycopg.connect() keywords for ``database`` through the socket."""
        return {"host": str(self.socket_dir), "port": self.port, "user": SUPERUSER,
                "dbname": database}

    def running(self) -> bool:
        res = _run(self, ["pg_ctl", "-D", str(self.data_dir), "status"], check=False)
        return res.returncode == 0

    def execute(self, *statements: str, database: str = "postgres") -> None:
        """Run statements outside a transaction (CREATE/DROP DATABASE) as the superuser."""
        import psycopg

        with psycopg.connect(**self.conninfo(database), autocommit=True) as conn:
            for sql in statements:
                conn.execute(sql.encode())

    def create_database(self, name: str, *, template: str = "template0") -> str:
        """``CREATE DATABASE name TEMPLATE template``; returns its URL (socket)."""
        self.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name`` even while clients are connected to it (they are cut off)."""
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.update(root=str(self.root), bindir=str(self.bindir), listen=list(self.listen))
        return doc


def _run(cluster: PgCluster | None, argv: Sequence[str], *, os_user: str | None = None,
         bindir: Path | None = None, check: bool = True, timeout: float = 120.0,
         cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """A PostgreSQL tool as the cluster's OS user (root drops to it)."""
    user = os_user or (cluster.os_user if cluster else server_user())
    bins = bindir or (cluster.bindir if cluster else pg_bindir())
    full = [str(bins / argv[0]), *argv[1:]]
    drop = os.geteuid() == 0 and user != "root"
    try:
        res = subprocess.run(full, capture_output=True, text=True, timeout=timeout,
                             check=False, cwd=cwd or (cluster.root if cluster else None),
                             user=user if drop else None, group=_gid(user) if drop else None,
                             extra_groups=[] if drop else None,
                             env={**os.environ, "LC_ALL": "C.UTF-8"})
    except subprocess.TimeoutExpired as exc:
        raise errors.LabError(f"{' '.join(full)} did not finish in {timeout:g}s",
                              argv=full) from exc
    except FileNotFoundError as exc:
        raise errors.LabError(f"{full[0]} is missing: {_INSTALL_HINT}", argv=full) from exc
    if check and res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        if cluster is not None and cluster.log_file.exists():
            tail += cluster.log_file.read_text(errors="replace").strip().splitlines()[-3:]
        raise errors.LabError(f"{Path(full[0]).name} failed ({res.returncode}): "
                              f"{' | '.join(tail)}", argv=full, exit_code=res.returncode)
    return res


def _gid(user: str) -> int:
    return pwd.getpwnam(user).pw_gid


def _chown(path: Path, user: str) -> None:
    if os.geteuid() == 0:
        pw = pwd.getpwnam(user)
        os.chown(path, pw.pw_uid, pw.pw_gid)


def _settings(cluster: PgCluster, *, durable: bool) -> str:
    lines = [
        f"port = {cluster.port}",
        f"unix_socket_directories = '{cluster.socket_dir}'",
        f"listen_addresses = '{','.join(cluster.listen)}'",
        "max_connections = 200",
        "shared_buffers = 128MB",
        "log_min_messages = warning",
        "dynamic_shared_memory_type = posix",
    ]
    if not durable:  # test clusters: a crash loses the cluster, which is thrown away
        lines += ["fsync = off", "synchronous_commit = off", "full_page_writes = off"]
    return "\n# fleet.lab.pg\n" + "\n".join(lines) + "\n"


def create(root: Path, *, port: int | None = None, listen: Sequence[str] = (),
           durable: bool = True) -> PgCluster:
    """initdb a new cluster under ``root`` (which must not hold one yet) and write its
    settings; it is not started. ``listen``: TCP addresses to serve besides the socket
    (a password is generated for them). ``durable=False`` turns fsync off (tests)."""
    user = server_user()
    bins = pg_bindir()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    if (root / "data").exists():
        raise errors.LabError(f"{root} already holds a PostgreSQL cluster", path=str(root))
    os.chmod(root, 0o700)
    _chown(root, user)
    password = secrets.token_urlsafe(18) if listen else None
    cluster = PgCluster(root=root, port=port or _free_port(), os_user=user, bindir=bins,
                        password=password, listen=tuple(listen))
    cluster.socket_dir.mkdir(mode=0o700, exist_ok=True)
    _chown(cluster.socket_dir, user)
    pwfile = root / ".pw"
    argv = ["initdb", "-D", str(cluster.data_dir), "-U", SUPERUSER, "-E", "UTF8",
            "--locale=C.UTF-8", "--auth-local=trust", "--auth-host=scram-sha-256",
            "--no-instructions"]
    if password is not None:
        pwfile.write_text(password + "\n")
        os.chmod(pwfile, 0o600)
        _chown(pwfile, user)
        argv.append(f"--pwfile={pwfile}")
    try:
        _run(cluster, argv)
    finally:
        pwfile.unlink(missing_ok=True)
    with (cluster.data_dir / "postgresql.conf").open("a") as f:
        f.write(_settings(cluster, durable=durable))
    if cluster.listen:  # TCP from anywhere it listens, with the password only
        with (cluster.data_dir / "pg_hba.conf").open("a") as f:
            f.write("host all all 0.0.0.0/0 scram-sha-256\nhost all all ::/0 scram-sha-256\n")
    _save(cluster)
    return cluster


def _save(cluster: PgCluster) -> None:
    path = cluster.root / _STATE
    tmp = path.with_name(f".{_STATE}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(cluster.to_dict(), f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def load(root: Path) -> PgCluster:
    """The cluster :func:`create` made under ``root``. Raises LabError when there is none."""
    try:
        doc = json.loads((root / _STATE).read_text())
        return PgCluster(root=Path(doc["root"]), port=int(doc["port"]),
                         os_user=str(doc["os_user"]), bindir=Path(doc["bindir"]),
                         password=doc.get("password"), listen=tuple(doc.get("listen") or ()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise errors.LabError(f"no PostgreSQL cluster under {root} ({exc})",
                              path=str(root)) from exc


def start(cluster: PgCluster, *, database: str | None = DEFAULT_DB,
          timeout_s: float = 60.0) -> PgCluster:
    """Start the server (waits until it accepts connections) and create ``database``
    when missing. Starting a running cluster does nothing."""
    if not cluster.running():
        _run(cluster, ["pg_ctl", "-D", str(cluster.data_dir), "-l", str(cluster.log_file),
                       "-w", "-t", str(int(timeout_s)), "start"], timeout=timeout_s + 10)
    if database:
        import psycopg

        with psycopg.connect(**cluster.conninfo(), autocommit=True) as conn:
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                 (database,)).fetchone()
        if found is None:
            cluster.create_database(database)
    return cluster


def stop(cluster: PgCluster, *, timeout_s: float = 60.0) -> None:
    """Stop the server (fast shutdown: clients are cut off). A stopped one is left be."""
    if cluster.running():
        _run(cluster, ["pg_ctl", "-D", str(cluster.data_dir), "-m", "fast", "-w",
                       "-t", str(int(timeout_s)), "stop"], timeout=timeout_s + 10)


def destroy(cluster: PgCluster) -> None:
    """Stop the server and remove everything under its root."""
    with contextlib.suppress(errors.LabError):
        stop(cluster)
    shutil.rmtree(cluster.root, ignore_errors=True)
