"""An emulated adbd: the device side of the ADB wire protocol over TCP.

A real ``adb`` server (Debian's, version 1.0.41 / 29.0.6) connects to it with
``adb connect 127.0.0.1:PORT`` and sees a phone. What is implemented, after AOSP's
``protocol.txt``:

- messages: 24-byte header ``<command, arg0, arg1, length, checksum, magic>`` (little endian,
  ``magic == command ^ 0xffffffff``) followed by the payload;
- ``CNXN`` in both directions; the device banner is
  ``device::ro.product.name=..;ro.product.model=..;ro.product.device=..;features=..``;
- ``AUTH``: the phone sends a 20-byte ``TOKEN``; a ``SIGNATURE`` is checked (RSA PKCS#1 v1.5,
  SHA-1 digest info over the raw token, as adb signs it) against the keys in the phone's
  ``/data/misc/adb/adb_keys``; after ``RSAPUBLICKEY`` the phone either "taps Allow" (the key
  is appended to ``adb_keys``, so the next connection authenticates by signature) or, in
  ``unauthorized`` mode, records the key and never answers, like an unattended phone;
- streams: ``OPEN`` / ``OKAY`` / ``WRTE`` / ``CLSE`` with the classic flow control of this
  adb version: one unacknowledged ``WRTE`` per stream and direction (no ``delayed_ack``
  feature is advertised, so the server never uses windows). Incoming data is acknowledged
  when the service consumes it, which gives back-pressure.

Services live in :mod:`fleet.lab.adbd_services`. Faults for tests: :meth:`Phone.set_online`
(False closes every connection and the listening socket: ``ECONNREFUSED`` like a phone that
left the network) and :meth:`Phone.drop_after` (go offline once N more bytes were pushed).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import logging
import os
import queue
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

__all__ = [
    "A_AUTH", "A_CLSE", "A_CNXN", "A_OKAY", "A_OPEN", "A_VERSION", "A_WRTE",
    "DEVICE_FEATURES", "Phone", "PhoneConfig", "Stream", "parse_android_pubkey",
]

log = logging.getLogger("fleet.lab.adbd")

A_CNXN = 0x4E584E43
A_AUTH = 0x48545541
A_OPEN = 0x4E45504F
A_OKAY = 0x59414B4F
A_CLSE = 0x45534C43
A_WRTE = 0x45545257
A_VERSION = 0x01000001  #: the version that skips payload checksums
MAX_PAYLOAD = 1024 * 1024
AUTH_TOKEN, AUTH_SIGNATURE, AUTH_RSAPUBLICKEY = 1, 2, 3
TOKEN_SIZE = 20
_HEADER = struct.Struct("<6I")

#: What this phone really implements (no ``delayed_ack``, no ``sendrecv_v2``).
DEVICE_FEATURES = ("shell_v2", "cmd", "stat_v2", "ls_v2", "fixed_push_mkdir",
                   "fixed_push_symlink_timestamp")

AUTH_MODES = ("allow", "unauthorized", "off")


def parse_android_pubkey(text: str) -> rsa.RSAPublicKey:
    """Decode adb's public key format: base64 of ``RSAPublicKey`` (len, n0inv, n[], rr[], e),
    modulus little-endian 32-bit words, optionally followed by `` user@host``."""
    blob = base64.b64decode(text.strip().split()[0])
    (words,) = struct.unpack_from("<I", blob, 0)
    modulus = int.from_bytes(blob[8:8 + 4 * words], "little")
    (exponent,) = struct.unpack_from("<I", blob, 8 + 8 * words)
    return rsa.RSAPublicNumbers(exponent, modulus).public_key()


def _verify(key_line: str, token: bytes, signature: bytes) -> bool:
    try:
        parse_android_pubkey(key_line).verify(
            signature, token, padding.PKCS1v15(), Prehashed(hashes.SHA1()))
        return True
    except (InvalidSignature, ValueError, struct.error):
        return False


@dataclass
class PhoneConfig:
    """One emulated phone: identity, properties and its sandbox folder on the host."""

    name: str
    port: int
    sandbox: Path
    serial: str = ""
    model: str = "Fleet_Lab_Phone"
    product: str = "fleetlab"
    device: str = "fleetlab"
    auth: str = "allow"  #: allow | unauthorized | off
    props: dict[str, str] = field(default_factory=dict)

    def banner(self) -> bytes:
        return (f"device::ro.product.name={self.product};ro.product.model={self.model};"
                f"ro.product.device={self.device};features={','.join(DEVICE_FEATURES)}"
                ).encode()


class Stream:
    """One adb stream as a service sees it: blocking ``recv`` / ``send`` / ``close``."""

    def __init__(self, conn: _Connection, local_id: int, remote_id: int) -> None:
        self.conn = conn
        self.local_id = local_id
        self.remote_id = remote_id
        self._inbox: queue.Queue[bytes | None] = queue.Queue()
        self._acked = threading.Semaphore(0)
        self.closed = False

    # called by the connection's reader thread
    def _deliver(self, data: bytes) -> None:
        self._inbox.put(data)

    def _peer_closed(self) -> None:
        self.closed = True
        self._inbox.put(None)
        self._acked.release()

    def recv(self) -> bytes:
        """Next chunk from the host; ``b""`` at end of stream. Acknowledges on consumption."""
        data = self._inbox.get()
        if data is None:
            self._inbox.put(None)  # stay at EOF for later callers
            return b""
        if not self.closed:
            self.conn.send_packet(A_OKAY, self.local_id, self.remote_id)
        return data

    def send(self, data: bytes) -> None:
        """Write to the host, one ``WRTE`` at a time, each waiting for its ``OKAY``."""
        view = memoryview(data)
        step = self.conn.max_payload
        for start in range(0, len(view), step):
            if self.closed:
                raise BrokenPipeError("stream closed by the host")
            self.conn.send_packet(A_WRTE, self.local_id, self.remote_id,
                                  bytes(view[start:start + step]))
            self._acked.acquire()
            if self.closed:
                raise BrokenPipeError("stream closed by the host")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                self.conn.send_packet(A_CLSE, self.local_id, self.remote_id)
        self.conn.forget(self.local_id)


ServiceFn = Callable[["Phone", Stream, str], None]


class _Connection:
    """One TCP connection from an adb server: handshake, then stream multiplexing."""

    _ids = itertools.count(1)

    def __init__(self, phone: Phone, sock: socket.socket) -> None:
        self.phone = phone
        self.sock = sock
        self.max_payload = MAX_PAYLOAD
        self.online = False
        self._wlock = threading.Lock()
        self._streams: dict[int, Stream] = {}
        self._token = b""

    def send_packet(self, cmd: int, arg0: int, arg1: int, data: bytes = b"") -> None:
        header = _HEADER.pack(cmd, arg0, arg1, len(data), sum(data) & 0xFFFFFFFF,
                              cmd ^ 0xFFFFFFFF)
        with self._wlock:
            self.sock.sendall(header + data)

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionResetError("adb server closed the connection")
            buf += chunk
        return bytes(buf)

    def forget(self, local_id: int) -> None:
        self._streams.pop(local_id, None)

    def serve(self) -> None:
        try:
            while True:
                cmd, arg0, arg1, length, _check, magic = _HEADER.unpack(self._recv_exact(24))
                if magic != cmd ^ 0xFFFFFFFF or length > MAX_PAYLOAD:
                    log.warning("%s: bad packet header, dropping connection", self.phone.name)
                    return
                data = self._recv_exact(length) if length else b""
                self._handle(cmd, arg0, arg1, data)
        except OSError:
            pass
        finally:
            for stream in list(self._streams.values()):
                stream._peer_closed()
            self._streams.clear()
            with contextlib.suppress(OSError):
                self.sock.close()
            self.phone._forget(self)

    # -- handshake ----------------------------------------------------------------------
    def _send_token(self) -> None:
        self._token = os.urandom(TOKEN_SIZE)
        self.send_packet(A_AUTH, AUTH_TOKEN, 0, self._token)

    def _go_online(self) -> None:
        self.online = True
        self.send_packet(A_CNXN, A_VERSION, MAX_PAYLOAD, self.phone.config.banner())

    def _handle(self, cmd: int, arg0: int, arg1: int, data: bytes) -> None:
        phone = self.phone
        if cmd == A_CNXN:
            self.max_payload = max(4096, min(arg1, MAX_PAYLOAD))
            self.online = False
            if phone.config.auth == "off":
                self._go_online()
            else:
                self._send_token()
        elif cmd == A_AUTH:
            if arg0 == AUTH_SIGNATURE:
                if any(_verify(k, self._token, data) for k in phone.authorized_keys()):
                    self._go_online()
                else:
                    self._send_token()
            elif arg0 == AUTH_RSAPUBLICKEY:
                key = data.rstrip(b"\0").decode(errors="replace")
                phone.record_key(key)
                if phone.config.auth == "allow":
                    phone.authorize_key(key)
                    self._go_online()
                # "unauthorized": the prompt is never answered; the server waits.
        elif not self.online:
            log.info("%s: packet %08x before authentication ignored", phone.name, cmd)
        elif cmd == A_OPEN:
            self._open(arg0, data.rstrip(b"\0").decode(errors="replace"))
        elif cmd == A_OKAY:
            stream = self._streams.get(arg1)
            if stream is not None:
                stream.remote_id = arg0
                stream._acked.release()
        elif cmd == A_WRTE:
            stream = self._streams.get(arg1)
            if stream is not None:
                stream._deliver(data)
        elif cmd == A_CLSE:
            stream = self._streams.pop(arg1, None)
            if stream is not None:
                stream._peer_closed()

    def _open(self, remote_id: int, service: str) -> None:
        from fleet.lab.adbd_services import find_service

        handler = find_service(service)
        if handler is None:
            log.info("%s: unknown service %r refused", self.phone.name, service)
            self.send_packet(A_CLSE, 0, remote_id)
            return
        stream = Stream(self, next(self._ids), remote_id)
        self._streams[stream.local_id] = stream
        self.send_packet(A_OKAY, stream.local_id, remote_id)
        threading.Thread(target=self._run_service, args=(handler, stream, service),
                         name=f"{self.phone.name}:{service[:20]}", daemon=True).start()

    def _run_service(self, handler: ServiceFn, stream: Stream, service: str) -> None:
        try:
            handler(self.phone, stream, service)
        except OSError as exc:
            log.info("%s: service %r ended: %s", self.phone.name, service, exc)
        except Exception:
            log.exception("%s: service %r failed", self.phone.name, service)
        finally:
            stream.close()

    def drop(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class Phone:
    """One emulated phone: its listening socket, live connections and fault switches."""

    def __init__(self, config: PhoneConfig) -> None:
        self.config = config
        self.name = config.name
        self._lock = threading.Lock()
        self._conns: set[_Connection] = set()
        self._listener: socket.socket | None = None
        self._drop_budget: int | None = None
        self.bytes_received = 0

    # -- filesystem facts the services need ---------------------------------------------
    @property
    def sandbox(self) -> Path:
        return self.config.sandbox

    @property
    def adb_keys(self) -> Path:
        return self.sandbox / "data" / "misc" / "adb" / "adb_keys"

    def authorized_keys(self) -> list[str]:
        try:
            return [ln for ln in self.adb_keys.read_text().splitlines() if ln.strip()]
        except FileNotFoundError:
            return []

    def authorize_key(self, key: str) -> None:
        if key in self.authorized_keys():
            return
        self.adb_keys.parent.mkdir(parents=True, exist_ok=True)
        with open(self.adb_keys, "a") as f:
            f.write(key.strip() + "\n")

    def record_key(self, key: str) -> None:
        """Every key offered to the phone is kept, accepted or not (the audit trail)."""
        seen = self.adb_keys.parent / "offered_keys"
        seen.parent.mkdir(parents=True, exist_ok=True)
        with open(seen, "a") as f:
            f.write(key.strip() + "\n")

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self.config.port))
            sock.listen(8)
            self._listener = sock
        threading.Thread(target=self._accept_loop, args=(sock,), name=f"{self.name}:accept",
                         daemon=True).start()

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(self, sock)
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=conn.serve, name=f"{self.name}:conn", daemon=True).start()

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._conns.discard(conn)

    @property
    def online(self) -> bool:
        return self._listener is not None

    def set_online(self, online: bool) -> None:
        """Offline: stop listening and cut every connection, as a phone leaving Wi-Fi."""
        if online:
            self.start()
            return
        with self._lock:
            listener, self._listener = self._listener, None
            conns = list(self._conns)
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for conn in conns:
            conn.drop()

    def set_auth(self, mode: str) -> None:
        """Change the authorization policy and drop connections, so the server meets it on
        its next handshake. ``unauthorized`` also revokes every authorization (Developer
        options: "Revoke USB debugging authorizations")."""
        if mode not in AUTH_MODES:
            raise ValueError(f"auth mode must be one of {AUTH_MODES}")
        self.config.auth = mode
        if mode == "unauthorized":
            self.adb_keys.unlink(missing_ok=True)
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.drop()

    def drop_after(self, nbytes: int | None) -> None:
        """Go offline once ``nbytes`` more bytes of file data have been pushed."""
        self._drop_budget = nbytes

    def count_received(self, nbytes: int) -> None:
        """Sync calls this for every ``DATA`` block, so a fault can strike mid-push."""
        self.bytes_received += nbytes
        if self._drop_budget is not None:
            self._drop_budget -= nbytes
            if self._drop_budget <= 0:
                self._drop_budget = None
                log.info("%s: injected fault: going offline mid-transfer", self.name)
                self.set_online(False)
                raise ConnectionAbortedError("phone went offline (injected fault)")

    def status(self) -> dict[str, object]:
        with self._lock:
            conns = len(self._conns)
        return {"name": self.name, "port": self.config.port, "online": self.online,
                "connections": conns, "auth": self.config.auth,
                "drop_after": self._drop_budget,
                "bytes_received": self.bytes_received}
