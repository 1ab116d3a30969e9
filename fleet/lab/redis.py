"""A private Redis server for the lab, the tests and the dispatch benchmark.

Debian's ``redis-server`` (the Makefile installs it), run as a child of no service
manager: its own directory, a Unix socket only (``port 0``: nothing listens on the
network), no persistence (a lab broker is thrown away), a pidfile and a log::

    ROOT/redis.sock   the socket (0700 directory, so only this user reaches it)
    ROOT/redis.conf, redis.pid, redis.log

The URL for Celery and kombu is ``redis+socket://ROOT/redis.sock`` (:attr:`RedisServer.url`).
Every wait is bounded; failures raise :class:`fleet.core.errors.LabError` with the log's
tail.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from fleet.core import errors

__all__ = ["RedisServer", "start", "stop"]

_INSTALL_HINT = "apt-get install redis-server"


@dataclass(frozen=True)
class RedisServer:
    root: Path

    @property
    def socket(self) -> Path:
        """The server's socket; under /tmp when ROOT is too long for AF_UNIX."""
        path = self.root / "redis.sock"
        if len(str(path)) > 100:
            digest = hashlib.sha256(str(self.root).encode()).hexdigest()[:12]
            path = Path("/tmp") / f"fleet-redis-{digest}.sock"
        return path

    @property
    def url(self) -> str:
        return f"redis+socket://{self.socket}"

    @property
    def pidfile(self) -> Path:
        return self.root / "redis.pid"

    @property
    def log(self) -> Path:
        return self.root / "redis.log"

    def pid(self) -> int | None:
        """The server's pid while it runs, else None."""
        try:
            pid = int(self.pidfile.read_text().strip())
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if b"redis-server" in cmd else None

    def ping(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(1.0)
                s.connect(str(self.socket))
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False


def _tail(path: Path) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-1500:]
    return ""


def start(root: Path, *, timeout_s: float = 20.0) -> RedisServer:
    """Start (or find running) the server under ``root``; returns it once it answers."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise errors.LabError(f"redis-server is not installed: {_INSTALL_HINT}")
    srv = RedisServer(root.resolve())
    if srv.pid() is not None and srv.ping():
        return srv
    srv.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(srv.root, 0o700)
    srv.socket.unlink(missing_ok=True)
    conf = srv.root / "redis.conf"
    conf.write_text("\n".join([
        "port 0", f"unixsocket {srv.socket}", "unixsocketperm 700",
        f"dir {srv.root}", f"pidfile {srv.pidfile}", f"logfile {srv.log}",
        'save ""', "appendonly no", "daemonize no", "protected-mode yes",
        "databases 4", "maxclients 4096", "",
    ]))
    with open(os.devnull, "rb") as devnull:
        proc = subprocess.Popen([exe, str(conf)], stdin=devnull, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise errors.LabError(f"redis-server exited ({proc.returncode}): "
                                  f"{_tail(srv.log)}", root=str(srv.root))
        if srv.ping():
            srv.pidfile.write_text(f"{proc.pid}\n")  # before redis writes it, if slow
            return srv
        time.sleep(0.02)
    proc.kill()
    raise errors.LabError(f"redis-server did not answer in {timeout_s:g}s: "
                          f"{_tail(srv.log)}", root=str(srv.root))


def stop(root: Path, *, timeout_s: float = 10.0) -> bool:
    """Stop the server under ``root`` (SIGTERM, then SIGKILL) and remove its files;
    False when none ran."""
    srv = RedisServer(root.resolve())
    pid = srv.pid()
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.02)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    srv.socket.unlink(missing_ok=True)
    if srv.root.is_dir():
        shutil.rmtree(srv.root, ignore_errors=True)
    return pid is not None
