"""Android phones over adb: ``adb://SERIAL[?mode=shell|app&package=PKG&adb_port=N&root=DIR]``.

Talks to an adb server (``TransportOptions.adb_host``/``adb_port``, or ``adb_port`` in the
URI, or ``$ANDROID_ADB_SERVER_PORT``) through adbutils; it never starts a server itself
(adbutils would start one on the default port). Two agent modes, stated per device:

- ``shell`` (default): the agent runs through ``adb shell`` from ``/data/local/tmp/fleet``.
  A real phone needs a Python runtime the shell user (uid 2000) can execute, unpacked under
  ``/data/local/tmp`` with a ``fleet-agent`` launcher at ``/data/local/tmp/fleet/bin``
  (the default agent command; the registry's ``agent_cmd`` overrides it). Termux's Python
  lives in Termux's private folder, which ``adb shell`` cannot enter on a phone without root.
- ``app``: an app that embeds the agent answers the authenticated mailbox
  (:mod:`fleet.mailbox`: requests signed by the controller, answers by the device key;
  keys in ``TransportOptions.mailbox``) in
  ``/sdcard/Android/data/<package>/files/fleet/{inbox,outbox}``, woken with
  ``am broadcast -a <package>.FLEET_WAKE``. Agent calls (argv[0] named ``fleet-agent``)
  go there; every other command still runs through ``adb shell``.

Pushes use sync ``SEND`` and are verified on the phone afterwards (size by ``STA2``,
content by ``sha256sum``). Commands use shell v2 when the phone offers it (exit status,
separate stderr, stdin), else v1 with an exit-status marker. ``fleet-probe`` needs no
Python: :meth:`AdbTransport.run_probe` pushes and runs it.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import io
import os
import shlex
import shutil
import socket
import stat as stat_mod
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import adbutils
from adbutils.errors import AdbConnectionError, AdbError, AdbTimeout

from fleet.core import errors
from fleet.core.fsutil import sha256_file
from fleet.mailbox import AGENT_ARGV0, Mailbox
from fleet.transports import adb_wire
from fleet.transports._bounded import CappedBuffer
from fleet.transports._parts import part_slot
from fleet.transports.base import (
    CommandResult,
    ProgressCallback,
    RemoteStat,
    TransferResult,
    Transport,
    TransportOptions,
)
from fleet.transports.uri import parse_uri

__all__ = ["AdbTransport", "probe_executable"]

SHELL_AGENT_ROOT = "/data/local/tmp/fleet"
_EXIT_MARK = "\x1bfleet-exit:"


def probe_executable() -> Path | None:
    """The host's ``fleet-probe`` build, if any: ``$FLEET_PROBE``, the installed agent
    package's ``bin/`` (found by its import spec, without importing the agent), ``PATH``."""
    candidates = [Path(p) for p in [os.environ.get("FLEET_PROBE")] if p]
    spec = importlib.util.find_spec("fleet_agent")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        candidates.append(Path(loc) / "bin" / "fleet-probe")
    candidates += [Path(e) / "fleet_agent" / "bin" / "fleet-probe" for e in sys.path if e]
    which = shutil.which("fleet-probe")
    if which:
        candidates.append(Path(which))
    return next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)


class AdbTransport(Transport):
    scheme = "adb"
    default_agent_root = SHELL_AGENT_ROOT
    default_agent_cmd = (f"{SHELL_AGENT_ROOT}/bin/fleet-agent",)
    error_map = (
        (AdbTimeout, errors.TransportTimeout),
        (AdbConnectionError, errors.ConnectError),
        *Transport.error_map,
        (adb_wire.SyncFailure, errors.RemoteFileError),
        (ConnectionAbortedError, errors.ConnectionLostError),
        (OSError, errors.ConnectionLostError),
    )

    def __init__(self, uri: str, options: TransportOptions | None = None) -> None:
        super().__init__(uri, options)
        parsed = parse_uri(uri)
        self.serial = parsed.host
        query = parsed.query
        self.mode = query.get("mode", "shell")
        self.package = query.get("package")
        if self.mode not in ("shell", "app"):
            raise errors.MalformedUriError(f"adb mode must be shell or app, not {self.mode!r}",
                                           uri=uri)
        if self.mode == "app" and not self.package:
            raise errors.MalformedUriError(
                f"app mode needs the app's package: {uri}&package=com.example.app", uri=uri)
        port = query.get("adb_port")
        if port is None and self.options.adb_port == 5037:
            port = os.environ.get("ANDROID_ADB_SERVER_PORT")
        try:
            self.server_port = int(port) if port else self.options.adb_port
        except ValueError as exc:
            raise errors.MalformedUriError(f"adb_port must be a number in {uri}",
                                           uri=uri) from exc
        self.server_host = self.options.adb_host
        self._root = query.get("root")
        self._features: set[str] | None = None
        self._app_checked = False

    # -- agent placement ----------------------------------------------------------------
    def agent_root(self) -> str:
        if self._root:
            return self._root
        if self.mode == "app":
            return f"/sdcard/Android/data/{self.package}/files/fleet/agent"
        return SHELL_AGENT_ROOT

    def agent_cmd(self) -> list[str]:
        return [AGENT_ARGV0] if self.mode == "app" else list(self.default_agent_cmd)

    # -- connection -----------------------------------------------------------------------
    def _map(self, exc: AdbError, what: str) -> errors.TransportError:
        text = str(exc)
        low = text.lower()
        where = {"uri": self.uri, "serial": self.serial}
        if "unauthorized" in low:
            return errors.AuthError(
                f"{what}: phone {self.serial} has not authorized this adb server's key; "
                "accept the 'Allow USB debugging?' prompt on the phone", **where)
        if "offline" in low or "not found" in low or "no devices" in low:
            return errors.DeviceOfflineError(f"{what}: phone {self.serial} is offline or not "
                                             f"connected ({text})", **where)
        if isinstance(exc, AdbTimeout):
            return errors.TransportTimeout(f"{what}: {text}", **where)
        if isinstance(exc, AdbConnectionError) or "closed" in low:
            return errors.ConnectionLostError(f"{what}: {text}", **where)
        return errors.TransportError(f"{what}: {text}", **where)

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            with self.mapped_errors(what):
                yield
        except errors.TransportError as exc:
            # adbutils reports the server's FAIL text as a bare AdbError: read it
            if type(exc) is errors.TransportError and isinstance(exc.__cause__, AdbError):
                raise self._map(exc.__cause__, what) from exc.__cause__
            raise

    def _client(self) -> adbutils.AdbClient:
        try:
            with socket.create_connection((self.server_host, self.server_port),
                                          timeout=self.options.connect_timeout):
                pass
        except OSError as exc:
            raise errors.ConnectError(
                f"no adb server at {self.server_host}:{self.server_port} ({exc}); start one "
                f"with `adb -P {self.server_port} start-server`", uri=self.uri) from exc
        return adbutils.AdbClient(host=self.server_host, port=self.server_port,
                                  socket_timeout=self.options.connect_timeout)

    def _state(self, client: adbutils.AdbClient) -> str:
        for info in client.list():
            if info.serial == self.serial:
                return str(info.state)
        return "absent"

    def _reconnect(self, client: adbutils.AdbClient, state: str) -> str:
        """What an operator does for a Wi-Fi phone: ``adb connect`` (after ``adb disconnect``
        when the server holds a dead, offline transport), then wait up to the connect
        timeout for the phone to come back as ``device``."""
        deadline = time.monotonic() + self.options.connect_timeout
        with contextlib.suppress(AdbError):
            if state == "offline":
                client.disconnect(self.serial)
            client.connect(self.serial, timeout=self.options.connect_timeout)
        state = self._state(client)
        while state in ("absent", "offline") and time.monotonic() < deadline:
            time.sleep(0.2)
            state = self._state(client)
            if state == "absent":
                with contextlib.suppress(AdbError):
                    client.connect(self.serial, timeout=max(0.5, deadline - time.monotonic()))
        return state

    def _device(self) -> adbutils.AdbDevice:
        """The phone, once the server reports it as ``device``. Network serials
        (``host:port``) are re-``connect``ed and waited for briefly, as ``adb wait-for``."""
        client = self._client()
        with self._errors("adb devices"):
            state = self._state(client)
            if state in ("absent", "offline") and ":" in self.serial:
                state = self._reconnect(client, state)
        where = {"uri": self.uri, "serial": self.serial, "state": state}
        if state == "unauthorized":
            raise errors.AuthError(
                f"phone {self.serial} has not authorized this adb server's key; accept the "
                "'Allow USB debugging?' prompt on the phone", **where)
        if state == "absent":
            raise errors.DeviceOfflineError(f"phone {self.serial} is not connected to the adb "
                                            f"server at port {self.server_port}", **where)
        if state != "device":
            raise errors.DeviceOfflineError(f"phone {self.serial} is {state}", **where)
        return adbutils.AdbDevice(client, serial=self.serial)

    def features(self) -> set[str]:
        if self._features is None:
            dev = self._device()
            with self._errors("adb features"):
                self._features = set(filter(None, dev.get_features().split(",")))
        return self._features

    @contextlib.contextmanager
    def _service(self, service: str, what: str) -> Iterator[socket.socket]:
        dev = self._device()
        with self._errors(what):
            conn = dev.open_transport(timeout=self.options.connect_timeout * 6)
            try:
                conn.send_command(service)
                conn.check_okay()
                yield conn.conn
            finally:
                conn.close()

    # -- commands -------------------------------------------------------------------------
    def run(self, argv: Sequence[str], *, timeout: float, stdin: bytes | None = None
            ) -> CommandResult:
        if self.mode == "app" and argv and argv[0].rsplit("/", 1)[-1] == AGENT_ARGV0:
            # the app runs its embedded agent, whatever path the registry gave for it
            return self._mailbox().run([AGENT_ARGV0, *argv[1:]], timeout=timeout,
                                       stdin=stdin)
        return self._shell(argv, timeout=timeout, stdin=stdin)

    def _shell(self, argv: Sequence[str], *, timeout: float, stdin: bytes | None = None
               ) -> CommandResult:
        started = time.monotonic()
        deadline = started + timeout
        command = shlex.join(argv)
        if "shell_v2" in self.features():
            with self._service(f"shell,v2,raw:{command}", f"adb shell {argv[0]}") as sock, \
                    self._errors(f"adb shell {argv[0]}"):
                out = adb_wire.shell_v2(sock, stdin, deadline,
                                        out=CappedBuffer("stdout", uri=self.uri),
                                        err=CappedBuffer("stderr", uri=self.uri))
            return CommandResult(tuple(argv), out.exit_code, out.stdout, out.stderr,
                                 time.monotonic() - started)
        return self._shell_v1(argv, command, stdin, deadline, started)

    def _shell_v1(self, argv: Sequence[str], command: str, stdin: bytes | None,
                  deadline: float, started: float) -> CommandResult:
        """Old phones: no exit status, no stdin EOF. The status travels as a marker line
        and stdin as a temp file."""
        temp = None
        if stdin is not None:
            temp = f"/data/local/tmp/.fleet-stdin-{os.getpid()}-{time.monotonic_ns()}"
            self._write(temp, stdin)
            command = f"{command} < {shlex.quote(temp)}; r=$?; rm -f {shlex.quote(temp)}; " \
                      f"(exit $r)"
        wrapped = f"{command}; echo \"{_EXIT_MARK}$?\""
        buf = CappedBuffer("stdout", uri=self.uri)  # a device that prints without end fails
        with self._service(f"shell:{wrapped}", f"adb shell {argv[0]}") as sock, \
                self._errors(f"adb shell {argv[0]}"):
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("command did not finish before its deadline")
                sock.settimeout(remaining)
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf.add(chunk)
        text = bytes(buf)
        mark = text.rfind(_EXIT_MARK.encode())
        if mark < 0:
            raise errors.ConnectionLostError(f"adb shell {argv[0]}: output ended without an "
                                             "exit status", uri=self.uri)
        code = int(text[mark + len(_EXIT_MARK):].strip() or b"255")
        return CommandResult(tuple(argv), code, text[:mark], b"", time.monotonic() - started)

    def check(self, argv: Sequence[str], *, timeout: float = 60.0) -> bytes:
        result = self._shell(argv, timeout=timeout)
        if not result.ok:
            raise errors.RemoteFileError(
                f"`{shlex.join(argv)}` failed on {self.serial} ({result.exit_code}): "
                f"{(result.stderr or result.stdout).decode(errors='replace').strip()[-300:]}",
                uri=self.uri, exit_code=result.exit_code)
        return result.stdout

    # -- device facts -----------------------------------------------------------------------
    def properties(self) -> dict[str, str]:
        """The phone's property table (``getprop``)."""
        props = {}
        for line in self.check(["getprop"]).decode(errors="replace").splitlines():
            if line.startswith("[") and "]: [" in line:
                key, _, value = line[1:].partition("]: [")
                props[key] = value.rstrip("]")
        return props

    def getprop(self, key: str) -> str:
        return self.check(["getprop", key]).decode(errors="replace").strip()

    # -- files ------------------------------------------------------------------------------
    def stat(self, remote: str) -> RemoteStat | None:
        v2 = "stat_v2" in self.features()
        with self._service("sync:", f"stat {remote}") as sock, self._errors(f"stat {remote}"):
            st = adb_wire.stat(sock, remote, v2=v2)
            adb_wire.quit_sync(sock)
        if st.error in (errno.ENOENT, errno.ENOTDIR) or (st.error == 0 and st.mode == 0):
            return None
        if st.error:
            raise errors.RemoteFileError(f"stat {remote}: {os.strerror(st.error)}",
                                         uri=self.uri, path=remote)
        return RemoteStat(remote, st.size, st.mode, float(st.mtime),
                          stat_mod.S_ISDIR(st.mode))

    def _write(self, remote: str, data: bytes, mode: int = 0o100644) -> None:
        with self._service("sync:", f"push {remote}") as sock, self._errors(f"push {remote}"):
            adb_wire.send_file(sock, io.BytesIO(data), remote, mode, int(time.time()),
                               len(data))
            adb_wire.quit_sync(sock)

    def remote_sha256(self, remote: str) -> str:
        out = self.check(["sha256sum", remote]).decode(errors="replace").split()
        if not out or len(out[0]) != 64:
            raise errors.RemoteFileError(f"sha256sum {remote}: unexpected output {out!r}",
                                         uri=self.uri, path=remote)
        return out[0].lower()

    def push(self, local: Path, remote: str, *, resume: bool = True,
             progress: ProgressCallback | None = None) -> TransferResult:
        """Sync ``SEND`` into this push's own partial file (``<remote>.part``, or
        ``<remote>.<n>.part`` while another push of it runs: :mod:`fleet.transports._parts`),
        size and sha256 checked on the phone, then ``mv`` into place: two pushes of one
        file never write one file. adb sync cannot resume a partial file (adbd deletes
        it), so ``resume`` means: skip a complete, identical copy already there (a retried
        push after a drop costs one checksum)."""
        local = Path(local)
        started = time.monotonic()
        if not local.is_file():
            raise errors.NotFoundError(f"nothing to push: {local} is not a file",
                                       path=str(local))
        size = local.stat().st_size
        digest = sha256_file(local)
        # a planted link at the destination is removed (rm never follows), never pushed
        # through: stat below would follow it into a folder outside the agent's root
        self.check(["sh", "-c", 'if [ -L "$1" ]; then rm -f -- "$1"; fi', "sh", remote])
        existing = self.stat(remote)
        if existing is not None and existing.is_dir:
            remote = f"{remote.rstrip('/')}/{local.name}"
            existing = self.stat(remote)
        if resume and existing is not None and existing.size == size \
                and self.remote_sha256(remote) == digest:
            return TransferResult(str(local), remote, size, 0, size, digest,
                                  time.monotonic() - started)
        with part_slot(self.options.home, self.uri, remote) as part:
            # the partial file: whatever sits there (a planted link too) is removed first;
            # adbd then creates a new file, never writing through a link
            self.check(["rm", "-f", "--", part])
            sent = self._send(local, part, size, digest, progress)
            self.check(["sh", "-c", '[ -L "$1" ] && exit 6; if [ -L "$2" ]; then rm -f -- '
                        '"$2"; fi; [ -d "$2" ] && exit 6; mv -f -- "$1" "$2"', "sh", part,
                        remote])
        return TransferResult(str(local), remote, size, sent, 0, digest,
                              time.monotonic() - started)

    def _send(self, local: Path, part: str, size: int, digest: str,
              progress: ProgressCallback | None) -> int:
        """``local`` into ``part`` on the phone, checked by size and sha256; bytes sent."""
        mode = stat_mod.S_IFREG | (stat_mod.S_IMODE(local.stat().st_mode) or 0o644)
        with self._service("sync:", f"push {part}") as sock, \
                self._errors(f"push {local.name} to {part}"), open(local, "rb") as f:
            sent = adb_wire.send_file(sock, f, part, mode, int(local.stat().st_mtime), size,
                                      progress)
            adb_wire.quit_sync(sock)
        after = self.stat(part)
        if after is None or after.size != size:
            raise errors.RemoteFileError(
                f"push {part}: phone has {after.size if after else 'no'} bytes, sent {size}",
                uri=self.uri, path=part, expected=size)
        remote_digest = self.remote_sha256(part)
        if remote_digest != digest:
            self._shell(["rm", "-f", part], timeout=30)
            raise errors.RemoteFileError(f"push {part}: sha256 on the phone differs",
                                         uri=self.uri, path=part, expected=digest,
                                         actual=remote_digest)
        return sent

    def _read(self, remote: str) -> bytes:
        buf = io.BytesIO()
        with self._service("sync:", f"pull {remote}") as sock, self._errors(f"pull {remote}"):
            adb_wire.recv_file(sock, remote, buf)
            adb_wire.quit_sync(sock)
        return buf.getvalue()

    def pull(self, remote: str, local: Path) -> TransferResult:
        local = Path(local)
        started = time.monotonic()
        local.parent.mkdir(parents=True, exist_ok=True)

        def fill(f: Any) -> int:
            with self._service("sync:", f"pull {remote}") as sock, \
                    self._errors(f"pull {remote}"):
                got = adb_wire.recv_file(sock, remote, f)
                adb_wire.quit_sync(sock)
            return got

        size = adb_wire.write_atomic(local, fill)
        return TransferResult(str(local), remote, size, size, 0, sha256_file(local),
                              time.monotonic() - started)

    # -- app agent: the mailbox -------------------------------------------------------------
    def _mailbox(self) -> Mailbox:
        assert self.package is not None
        if not self._app_checked:
            if not self._shell(["pm", "path", self.package], timeout=30).ok:
                raise errors.AppNotInstalledError(
                    f"app {self.package} is not installed on {self.serial}",
                    uri=self.uri, package=self.package)
            self._app_checked = True
        package = self.package

        def wake() -> None:
            self.check(["am", "broadcast", "-a", f"{package}.FLEET_WAKE", "-p", package])

        return Mailbox(_AdbMailboxIO(self), f"/sdcard/Android/data/{package}/files/fleet",
                       credentials=self.options.mailbox, wake=wake,
                       where=f"phone {self.serial} app {package}")

    def run_probe(self, *, timeout: float = 120.0) -> dict[str, Any]:
        """Push the native ``fleet-probe`` and run it: capabilities without Python."""
        import json

        exe = probe_executable()
        if exe is None:
            raise errors.UsageError(
                "fleet-probe is not built on this machine (make native); probing without "
                "Python is skipped", uri=self.uri)
        remote = "/data/local/tmp/fleet-probe"
        self.push(exe, remote)
        self.check(["chmod", "755", remote])
        out = self.check([remote, "--compact"], timeout=timeout)
        doc: dict[str, Any] = json.loads(out)
        return doc

    def close(self) -> None:
        """Every operation opens its own server connection; nothing stays open."""


class _AdbMailboxIO:
    """The mailbox's file operations over sync and ``adb shell``."""

    def __init__(self, transport: AdbTransport) -> None:
        self.t = transport

    def write_bytes(self, remote: str, data: bytes) -> None:
        self.t._write(remote, data)

    def read_bytes(self, remote: str) -> bytes | None:
        if self.t.stat(remote) is None:
            return None
        return self.t._read(remote)

    def rename(self, src: str, dst: str) -> None:
        self.t.check(["mv", "-f", src, dst])

    def remove(self, remote: str) -> None:
        self.t.check(["rm", "-f", remote])
