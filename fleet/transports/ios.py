"""``ios://UDID?bundle=APP_ID``: an iPhone app's container, over tidevice.

Why it looks like this: iOS has no shell and no general file access. Files go into the
app's sandbox through lockdownd -> ``com.apple.mobile.house_arrest`` -> AFC (remote paths
are relative to the container, e.g. ``Documents/fleet/agent/...``); commands go through
the mailbox (:mod:`fleet.mailbox`): a request signed by the controller in
``Documents/fleet/inbox``, the app's answer, signed by the device key, awaited in
``Documents/fleet/outbox`` until a deadline (keys: ``TransportOptions.mailbox``), an
unanswered request raised as :class:`fleet.core.errors.MailboxPendingError`, never
reported as success.

tidevice does the wire work (usbmuxd, lockdown plists, TLS, AFC packets); this module
adds what a fleet needs on top: it never pairs on its own (a missing or refused pair
record is an :class:`~fleet.core.errors.AuthError`: pairing needs a person to tap "Trust"),
never falls back to mounting a DeveloperDiskImage (tidevice's ``start_service`` would
try to download one), keeps the TLS key file private (0600, removed on close), and maps
every tidevice exception to a :class:`~fleet.core.errors.TransportError`. tidevice does not
fully support iOS 17+ (RemoteXPC/tunnels); a pymobiledevice3 transport can sit beside this
one behind the same :class:`~fleet.transports.base.Transport` protocol.

URI query: ``bundle`` (required), ``vend`` (``documents``, the default, works for any app
with ``UIFileSharingEnabled``; ``container`` needs a development-signed app), ``usbmux``
(the usbmuxd socket; else ``TransportOptions.usbmux_socket``, else
``$USBMUXD_SOCKET_ADDRESS``, else tidevice's default ``/var/run/usbmuxd``).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import ssl
import struct
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

from tidevice import Device as _TiDevice
from tidevice import Usbmux
from tidevice._proto import AFC, PROGRAM_NAME, AFCMode, AFCStatus
from tidevice._safe_socket import PlistSocketProxy
from tidevice._sync import Sync
from tidevice.exceptions import MuxError, MuxReplyError, MuxServiceError, SocketError
from tidevice.session import Session

from fleet.core import errors
from fleet.core.fsutil import sha256_file
from fleet.mailbox import Mailbox
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

__all__ = ["HOUSE_ARREST", "MAILBOX_BASE", "IosTransport", "container_path"]

HOUSE_ARREST = "com.apple.mobile.house_arrest"
MAILBOX_BASE = "Documents/fleet"
_CHUNK = 1 << 20
_AFC_ERRORS: dict[int, type[errors.TransportError]] = {
    AFCStatus.ST_OBJECT_NOT_FOUND: errors.RemoteFileError,
    AFCStatus.ST_PERM_DENIED: errors.RemoteFileError,
    AFCStatus.ST_OBJECT_IS_DIR: errors.RemoteFileError,
    AFCStatus.ST_NO_SPACE_LEFT: errors.RemoteDiskFullError,
}


def container_path(remote: str, uri: str = "") -> str:
    """``remote`` as an AFC path inside the app's container (``/`` is the container's root).

    Refused (:class:`~fleet.core.errors.RemoteFileError`) before anything is sent: a
    ``..`` component anywhere in the path as given (normalising first would fold
    ``a/../../x`` into ``/x`` and hide the escape), a NUL or backslash, an empty path. A
    leading ``/`` means the container's root, as AFC reads it, never the phone's."""
    if not isinstance(remote, str) or not remote.strip("/") or "\0" in remote \
            or "\\" in remote:
        raise errors.RemoteFileError(f"not a container path: {remote!r}", uri=uri,
                                     path=str(remote))
    if ".." in remote.split("/"):
        raise errors.RemoteFileError(f"path escapes the container: {remote!r}", uri=uri,
                                     path=remote)
    norm = posixpath.normpath("/" + remote.lstrip("/"))
    if not norm.startswith("/") or norm.startswith("//") or ".." in norm.split("/"):
        raise errors.RemoteFileError(f"path escapes the container: {remote!r}", uri=uri,
                                     path=remote)
    return norm


class _Device(_TiDevice):
    """tidevice's device, minus the behaviours a fleet controller must not have."""

    def __init__(self, udid: str, usbmux: Usbmux, uri: str) -> None:
        super().__init__(udid, usbmux)
        self._fleet_uri = uri
        self._pem_dir = Path(tempfile.mkdtemp(prefix="fleet-ios-"))
        self._pem_digest = ""

    def handshake(self) -> None:
        """Read the pair record from usbmuxd; never start a pairing."""
        try:
            self._pair_record = self._read_pair_record()
        except MuxReplyError as exc:
            raise errors.AuthError(
                f"no pair record for iPhone {self.udid}: pair it with this host first "
                "(unlock it, tap Trust; `idevicepair pair`)", uri=self._fleet_uri) from exc

    @property
    def ssl_pemfile_path(self) -> str:
        record = self.pair_record
        data = bytes(record["HostPrivateKey"]) + b"\n" + bytes(record["HostCertificate"])
        path = self._pem_dir / "host.pem"
        digest = hashlib.sha256(data).hexdigest()
        if digest != self._pem_digest:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            self._pem_digest = digest
        return str(path)

    def create_session(self) -> Session:
        """tidevice's session, without its automatic re-pairing on InvalidHostID."""
        s = self.create_inner_connection()
        data = s.send_recv_packet({"Request": "QueryType"})
        if data.get("Type") != "com.apple.mobile.lockdown":
            s.close()
            raise errors.ConnectError(f"port 62078 of {self.udid} is not lockdownd",
                                      uri=self._fleet_uri)
        record = self.pair_record
        data = s.send_recv_packet({"Request": "StartSession", "HostID": record["HostID"],
                                   "SystemBUID": record["SystemBUID"],
                                   "ProgName": PROGRAM_NAME})
        if "Error" in data:
            s.close()
            raise errors.AuthError(
                f"iPhone {self.udid} refused the session: {data['Error']} (the pair record "
                "is not one this phone trusts; re-pair it)", uri=self._fleet_uri,
                lockdown_error=data["Error"])
        if data.get("EnableSessionSSL"):
            try:
                s.psock.switch_to_ssl(self.ssl_pemfile_path)
            except (ssl.SSLError, OSError) as exc:
                s.close()
                raise errors.AuthError(
                    f"iPhone {self.udid} refused this host's certificate in the TLS "
                    f"handshake ({exc}); the pair record is stale or foreign: re-pair it",
                    uri=self._fleet_uri) from exc
        return Session(s, data["SessionID"])

    def cleanup(self) -> None:
        shutil.rmtree(self._pem_dir, ignore_errors=True)


def _usbmux_address() -> str | None:
    value = os.environ.get("USBMUXD_SOCKET_ADDRESS")
    if not value:
        return None
    return value[5:] if value.upper().startswith("UNIX:") else value


class IosTransport(Transport):
    scheme: ClassVar[str] = "ios"
    default_agent_root: ClassVar[str] = f"{MAILBOX_BASE}/agent"
    default_agent_cmd: ClassVar[tuple[str, ...]] = ("fleet-agent",)
    error_map = (
        (SocketError, errors.ConnectionLostError),
        (MuxReplyError, errors.ConnectError),
        (MuxServiceError, errors.TransportError),
        (ssl.SSLError, errors.AuthError),
        *Transport.error_map,
    )

    def __init__(self, uri: str, options: TransportOptions | None = None) -> None:
        super().__init__(uri, options)
        parsed = parse_uri(uri)
        self.udid = urlsplit(uri).netloc  # parse_uri lower-cases hosts; UDIDs keep case
        self.bundle = parsed.query["bundle"]
        vend = parsed.query.get("vend", "documents")
        if vend not in ("documents", "container"):
            raise errors.MalformedUriError(f"vend must be documents or container: {uri!r}",
                                           uri=uri)
        self.vend = "VendDocuments" if vend == "documents" else "VendContainer"
        self.socket = (parsed.query.get("usbmux") or self.options.usbmux_socket
                       or _usbmux_address())
        self._device: _Device | None = None
        self._afc: Sync | None = None

    # -- connection ------------------------------------------------------------------------
    def _open_device(self) -> _Device:
        if self._device is not None:
            return self._device
        where = self.socket or "/var/run/usbmuxd"
        mux = Usbmux(self.socket) if self.socket else Usbmux()
        try:
            listed = mux.device_list()
        except (MuxError, OSError) as exc:
            raise errors.ConnectError(f"cannot reach usbmuxd at {where}: {exc}",
                                      uri=self.uri, socket=where) from exc
        match = next((d for d in listed if d.udid.lower() == self.udid.lower()), None)
        if match is None:
            raise errors.ConnectError(
                f"iPhone {self.udid} is not attached (usbmuxd at {where} lists "
                f"{len(listed)} device(s))", uri=self.uri, socket=where)
        device = _Device(match.udid, mux, self.uri)
        device._info = match
        self._device = device
        return device

    def _sync(self) -> Sync:
        if self._afc is not None:
            return self._afc
        device = self._open_device()
        with self.mapped_errors(f"house_arrest {self.bundle}"):
            try:
                conn: PlistSocketProxy = device._unsafe_start_service(HOUSE_ARREST)
            except MuxServiceError as exc:
                raise errors.TransportError(
                    f"iPhone {self.udid} does not offer {HOUSE_ARREST}: {exc}",
                    uri=self.uri) from exc
            conn.send_packet({"Command": self.vend, "Identifier": self.bundle})
            answer = conn.recv_packet()
            if "Error" in answer:
                conn.close()
                if answer["Error"] == "ApplicationLookupFailed":
                    raise errors.AppNotInstalledError(
                        f"app {self.bundle} is not installed on iPhone {self.udid} "
                        f"(house_arrest: ApplicationLookupFailed); install the fleet agent "
                        "app", uri=self.uri, bundle=self.bundle)
                raise errors.TransportError(
                    f"house_arrest {self.vend} {self.bundle}: {answer['Error']}",
                    uri=self.uri, bundle=self.bundle)
            self._afc = Sync(conn)
        return self._afc

    def _ops(self, what: str) -> Any:
        """``mapped_errors`` that also forgets a broken AFC connection."""
        return _Guard(self, what)

    def close(self) -> None:
        if self._afc is not None:
            self._afc.close()
            self._afc = None
        if self._device is not None:
            self._device.cleanup()
            self._device = None

    # -- AFC helpers -------------------------------------------------------------------------
    def _path(self, remote: str) -> str:
        return container_path(remote, self.uri)

    def _check(self, status: int, what: str, remote: str) -> None:
        if status == AFCStatus.ST_SUCCESS:
            return
        name = AFCStatus(status).name if status in AFCStatus._value2member_map_ else status
        cls = _AFC_ERRORS.get(status, errors.RemoteFileError)
        raise cls(f"{what} {remote} on iPhone {self.udid}: AFC {name}", uri=self.uri,
                  path=remote, afc_status=int(status))

    def _stat(self, sync: Sync, path: str) -> Any:
        result, err = sync.stat(path, with_error=True)
        if err is not None:
            if err == AFCStatus.ST_OBJECT_NOT_FOUND:
                return None
            self._check(int(err), "stat", path)
        return result

    def _open(self, sync: Sync, path: str, mode: AFCMode) -> int:
        # tidevice's _file_open ignores the status and would take an error code for a handle
        pkg = sync._request(AFC.OP_FILE_OPEN, struct.pack("<Q", mode) + path.encode() + b"\0")
        self._check(int(pkg.status), "open", path)
        handle: int = struct.unpack("<Q", pkg.data)[0]
        return handle

    def _mkdir_parent(self, sync: Sync, path: str) -> None:
        parent = posixpath.dirname(path)
        if parent not in ("", "/"):
            self._check(int(sync.mkdir(parent)), "mkdir", parent)

    # -- MailboxIO ---------------------------------------------------------------------------
    def write_bytes(self, remote: str, data: bytes) -> None:
        with self._ops(f"write {remote}"):
            sync, path = self._sync(), self._path(remote)
            self._mkdir_parent(sync, path)
            fd = self._open(sync, path, AFCMode.O_WR)
            try:
                for i in range(0, len(data), _CHUNK):
                    sync._file_write(fd, data[i:i + _CHUNK])
            finally:
                self._check(int(sync._file_close(fd)), "close", path)

    def read_bytes(self, remote: str) -> bytes | None:
        with self._ops(f"read {remote}"):
            sync, path = self._sync(), self._path(remote)
            if self._stat(sync, path) is None:
                return None
            return bytes(sync.pull_content(path))

    def rename(self, src: str, dst: str) -> None:
        with self._ops(f"rename {src}"):
            sync = self._sync()
            self._check(int(sync.rename(self._path(src), self._path(dst))), "rename", src)

    def remove(self, remote: str) -> None:
        with self._ops(f"remove {remote}"):
            status = int(self._sync().remove(self._path(remote)))
            if status != AFCStatus.ST_OBJECT_NOT_FOUND:
                self._check(status, "remove", remote)

    # -- the contract ------------------------------------------------------------------------
    def run(self, argv: Sequence[str], *, timeout: float, stdin: bytes | None = None
            ) -> CommandResult:
        """Two deadlines: the app must *take* the request within
        ``options.mailbox_timeout`` (else it is withdrawn and reported pending: the app is
        not running, iOS suspends apps in the background), and answer within ``timeout``
        (a benchmark may run for minutes once taken)."""
        box = Mailbox(io=self, base=MAILBOX_BASE, credentials=self.options.mailbox,
                      where=f"iPhone {self.udid} app {self.bundle}")
        posted = box.post(argv, timeout=timeout, stdin=stdin)
        rid, started = posted.rid, posted.started
        pickup_by = started + min(timeout, self.options.mailbox_timeout)
        answer_by = started + timeout
        request, answer = posted.request_path, posted.answer_path
        taken, delay = False, box.poll_s
        while True:
            data = self.read_bytes(answer)
            if data is not None:
                return box.accept(posted, data)
            now = time.monotonic()
            if not taken:
                taken = self.stat(request) is None
            if not taken and now >= pickup_by:
                self.remove(request)  # withdrawn: the app must not run it later
                if self.read_bytes(answer) is None:
                    raise errors.MailboxPendingError(
                        f"iPhone {self.udid}: app {self.bundle} did not take request {rid} "
                        f"within {pickup_by - started:.1f}s (is it running in the "
                        "foreground?); withdrawn", uri=self.uri, request_id=rid,
                        inbox=box.inbox, picked_up=False, timeout_s=pickup_by - started)
                continue
            if now >= answer_by:
                raise errors.MailboxPendingError(
                    f"iPhone {self.udid}: app {self.bundle} took request {rid} but gave no "
                    f"answer within {timeout:.0f}s; it may still be running",
                    uri=self.uri, request_id=rid, inbox=box.inbox, picked_up=True,
                    timeout_s=timeout)
            time.sleep(min(delay, max(0.0, (answer_by if taken else pickup_by) - now)))
            delay = min(delay * 2, box.max_poll_s)

    def stat(self, remote: str) -> RemoteStat | None:
        with self._ops(f"stat {remote}"):
            st = self._stat(self._sync(), self._path(remote))
        if st is None:
            return None
        is_dir = bool(st.is_dir())
        return RemoteStat(path=remote, size=int(st.st_size), mode=0o040755 if is_dir
                          else 0o100644, mtime=st.st_mtime.timestamp(), is_dir=is_dir)

    def push(self, local: Path, remote: str, *, resume: bool = True,
             progress: ProgressCallback | None = None) -> TransferResult:
        """Write this push's own partial file (``<remote>.part``, or ``<remote>.<n>.part``
        while another push of it runs: :mod:`fleet.transports._parts`; resumable: a sidecar
        binds it to the source digest), check its size, rename it into place."""
        with part_slot(self.options.home, self.uri, remote) as part_remote:
            return self._push(local, remote, part_remote, resume, progress)

    def _push(self, local: Path, remote: str, part_remote: str, resume: bool,
              progress: ProgressCallback | None) -> TransferResult:
        started = time.monotonic()
        size = local.stat().st_size
        digest = sha256_file(local)
        with self._ops(f"push {local} -> {remote}"):
            sync, path = self._sync(), self._path(remote)
            part = self._path(part_remote)
            tag = part + ".sha256"
            self._mkdir_parent(sync, path)
            offset = 0
            if resume:
                st = self._stat(sync, part)
                owner = b""
                if st is not None and self._stat(sync, tag) is not None:
                    owner = bytes(sync.pull_content(tag))
                if st is not None and owner == digest.encode() and int(st.st_size) <= size:
                    offset = int(st.st_size)
            if offset == 0:
                sync.push_content(tag, digest.encode())
            fd = self._open(sync, part, AFCMode.O_APPEND if offset else AFCMode.O_WR)
            try:
                with open(local, "rb") as src:
                    src.seek(offset)
                    done = offset
                    while block := src.read(_CHUNK):
                        sync._file_write(fd, block)
                        done += len(block)
                        if progress is not None:
                            progress(done, size)
            finally:
                self._check(int(sync._file_close(fd)), "close", part)
            st = self._stat(sync, part)
            if st is None or int(st.st_size) != size:
                raise errors.RemoteFileError(
                    f"push {remote}: {0 if st is None else st.st_size} bytes on the phone, "
                    f"{size} sent", uri=self.uri, path=remote)
            self._check(int(sync.rename(part, path)), "rename", part)
            sync.remove(tag)
        return TransferResult(str(local), remote, size, size - offset, offset, digest,
                              time.monotonic() - started)

    def pull(self, remote: str, local: Path) -> TransferResult:
        started = time.monotonic()
        tmp = local.with_name(f".{local.name}.part")
        h = hashlib.sha256()
        with self._ops(f"pull {remote}"):
            sync, path = self._sync(), self._path(remote)
            st = self._stat(sync, path)
            if st is None:
                raise errors.RemoteFileError(f"{remote} does not exist on iPhone {self.udid}",
                                             uri=self.uri, path=remote)
            local.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                for chunk in sync.iter_content(path):
                    f.write(chunk)
                    h.update(chunk)
            if tmp.stat().st_size != int(st.st_size):
                tmp.unlink(missing_ok=True)
                raise errors.RemoteFileError(f"pull {remote}: short read", uri=self.uri,
                                             path=remote)
            os.replace(tmp, local)
        size = local.stat().st_size
        return TransferResult(str(local), remote, size, size, 0, h.hexdigest(),
                              time.monotonic() - started)


class _Guard:
    def __init__(self, transport: IosTransport, what: str) -> None:
        self.transport = transport
        self.cm = transport.mapped_errors(what)

    def __enter__(self) -> None:
        self.cm.__enter__()

    def __exit__(self, et: Any, ev: Any, tb: Any) -> bool:
        try:
            return bool(self.cm.__exit__(et, ev, tb))
        except (errors.ConnectionLostError, errors.ConnectError):
            if self.transport._afc is not None:  # the next call opens a fresh connection
                self.transport._afc.close()
                self.transport._afc = None
            raise
