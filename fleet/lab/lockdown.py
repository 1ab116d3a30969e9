"""Emulated lockdownd (port 62078 behind usbmuxd) and the pairing material it trusts.

Why it exists: the iOS transport and libimobiledevice must run their real client code
against the lab, so this speaks lockdownd's wire protocol: 4-byte big-endian length +
XML plist per message, ``QueryType``, ``GetValue`` (a few keys without a session, all
keys and domains within one), ``StartSession`` that checks the ``HostID`` against the
hosts this phone trusts and then upgrades the same connection to TLS, with the client
certificate verified against that host's root certificate, ``StartService`` that hands
out a one-shot port, ``StopSession`` that drops back to plaintext.

Pairing material is made here with real X.509 certificates (``cryptography``) in the
shape a real pairing leaves behind: a host root CA, a host certificate, and a device
certificate over the phone's own public key, all signed by the host root; the host keeps
a pair record (``HostID``, ``SystemBUID``, ``HostCertificate``, ``HostPrivateKey``,
``RootCertificate``, ``RootPrivateKey``, ``DeviceCertificate``, ...) and the phone keeps
``HostID -> RootCertificate``. Pairing *new* hosts is refused (``UserDeniedPairing``):
there is nobody in the lab to tap "Trust".
"""

from __future__ import annotations

import datetime as dt
import os
import plistlib
import socket
import ssl
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

__all__ = [
    "LOCKDOWN_PORT",
    "DeviceFacts",
    "HostIdentity",
    "LockdownServer",
    "make_device_key",
    "make_host_identity",
    "make_pair_record",
    "recv_plist",
    "send_plist",
]

LOCKDOWN_PORT = 62078
_MAX_PLIST = 4 << 20
#: Keys a real lockdownd answers before a session exists.
_PUBLIC_KEYS = frozenset({
    "ProductVersion", "ProductType", "BuildVersion", "DeviceClass", "UniqueDeviceID",
    "DeviceName", "DevicePublicKey", "ProductName", "SerialNumber", "CPUArchitecture",
    "HardwareModel", "ActivationState", "WiFiAddress", "UniqueChipID",
})


# -- wire ------------------------------------------------------------------------------
def recv_exact(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            raise EOFError("peer closed")
        buf += chunk
    return bytes(buf)


def recv_plist(sock: socket.socket) -> Any:
    """One lockdown-framed plist; ``EOFError`` when the peer closed between messages."""
    (size,) = struct.unpack(">I", recv_exact(sock, 4))
    if size > _MAX_PLIST:
        raise ValueError(f"plist of {size} bytes refused")
    return plistlib.loads(recv_exact(sock, size))


def send_plist(sock: socket.socket, value: Any) -> None:
    body = plistlib.dumps(value, fmt=plistlib.FMT_XML)
    sock.sendall(struct.pack(">I", len(body)) + body)


# -- pairing material ------------------------------------------------------------------
def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _cert(subject_cn: str, public_key: Any, issuer_key: rsa.RSAPrivateKey,
          issuer_cn: str, *, ca: bool) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_cn)]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_device_key() -> rsa.RSAPrivateKey:
    """The phone's own key pair (a real phone makes it once, at activation)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass(frozen=True)
class HostIdentity:
    """What one controller host holds for pairing: its root CA and host certificate."""

    host_id: str
    system_buid: str
    root_key_pem: bytes
    root_cert_pem: bytes
    host_key_pem: bytes
    host_cert_pem: bytes

    def to_dict(self) -> dict[str, str]:
        return {"host_id": self.host_id, "system_buid": self.system_buid,
                "root_key_pem": self.root_key_pem.decode(),
                "root_cert_pem": self.root_cert_pem.decode(),
                "host_key_pem": self.host_key_pem.decode(),
                "host_cert_pem": self.host_cert_pem.decode()}

    @classmethod
    def from_dict(cls, d: dict[str, str]) -> HostIdentity:
        return cls(d["host_id"], d["system_buid"], d["root_key_pem"].encode(),
                   d["root_cert_pem"].encode(), d["host_key_pem"].encode(),
                   d["host_cert_pem"].encode())


def make_host_identity(system_buid: str, host_id: str | None = None) -> HostIdentity:
    root_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    host_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    root = _cert("fleet lab root", root_key.public_key(), root_key, "fleet lab root", ca=True)
    host = _cert("fleet lab host", host_key.public_key(), root_key, "fleet lab root", ca=False)
    return HostIdentity(host_id or str(uuid.uuid4()).upper(), system_buid,
                        _pem_key(root_key), _pem_cert(root), _pem_key(host_key),
                        _pem_cert(host))


def make_pair_record(host: HostIdentity, device_key: rsa.RSAPrivateKey, *,
                     wifi_mac: str = "00:00:00:00:00:00") -> tuple[dict[str, Any], bytes]:
    """The host's pair record for one phone and the phone's certificate (PEM).

    Same keys as the records usbmuxd keeps in ``/var/lib/lockdown/<UDID>.plist`` and
    serves with ``ReadPairRecord`` (what tidevice and libimobiledevice read)."""
    root_key = serialization.load_pem_private_key(host.root_key_pem, None)
    assert isinstance(root_key, rsa.RSAPrivateKey)
    device_cert = _cert("fleet lab device", device_key.public_key(), root_key,
                        "fleet lab root", ca=False)
    pub_pem = device_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
    record = {
        "DeviceCertificate": _pem_cert(device_cert),
        "DevicePublicKey": pub_pem,
        "EscrowBag": os.urandom(32),
        "HostCertificate": host.host_cert_pem,
        "HostID": host.host_id,
        "HostPrivateKey": host.host_key_pem,
        "RootCertificate": host.root_cert_pem,
        "RootPrivateKey": host.root_key_pem,
        "SystemBUID": host.system_buid,
        "WiFiMACAddress": wifi_mac,
    }
    return record, _pem_cert(device_cert)


# -- the service -----------------------------------------------------------------------
@dataclass
class DeviceFacts:
    """What lockdownd knows about its phone; ``values`` is the global domain."""

    values: dict[str, Any]
    domains: dict[str, dict[str, Any]]
    trusted_hosts: dict[str, bytes]  #: HostID -> RootCertificate PEM
    cert_file: Path  #: the phone's certificate + private key (PEM), for the TLS server


#: ``start_service(name) -> port``, or ``None`` when the phone has no such service.
StartService = Callable[[str], "int | None"]


class LockdownServer:
    """One lockdownd connection: plaintext plist requests, TLS after ``StartSession``."""

    def __init__(self, facts: DeviceFacts, start_service: StartService) -> None:
        self.facts = facts
        self.start_service = start_service
        self.session_id: str | None = None

    def serve(self, sock: socket.socket) -> None:
        conn: socket.socket = sock
        while True:
            try:
                req = recv_plist(conn)
            except (EOFError, OSError, ValueError):
                return
            if not isinstance(req, dict):
                send_plist(conn, {"Error": "InvalidRequest"})
                continue
            name = req.get("Request")
            if name == "StartSession":
                try:
                    upgraded = self._start_session(conn, req)
                except ConnectionAbortedError:
                    return
                if upgraded is not None:
                    conn = upgraded
                continue
            if name == "StopSession":
                send_plist(conn, {"Request": "StopSession", "Result": "Success"})
                self.session_id = None
                if isinstance(conn, ssl.SSLSocket):
                    try:  # libimobiledevice sends close_notify; tidevice just hangs up
                        conn = conn.unwrap()
                    except (OSError, ValueError):
                        return
                continue
            if name == "Goodbye":
                send_plist(conn, {"Request": "Goodbye", "Result": "Success"})
                return
            send_plist(conn, self._answer(name, req))

    def _answer(self, name: Any, req: dict[str, Any]) -> dict[str, Any]:
        if name == "QueryType":
            return {"Request": "QueryType", "Type": "com.apple.mobile.lockdown"}
        if name == "GetValue":
            return self._get_value(req)
        if name == "StartService":
            return self._start_service(req)
        if name in ("Pair", "ValidatePair"):
            return {"Request": name, "Error": "UserDeniedPairing"}
        if name in ("SetValue", "RemoveValue", "EnterRecovery", "Unpair"):
            return {"Request": name, "Error": "NoRunningSession"
                    if self.session_id is None else "InvalidRequest"}
        return {"Request": str(name), "Error": "InvalidRequest"}

    def _get_value(self, req: dict[str, Any]) -> dict[str, Any]:
        key, domain = req.get("Key"), req.get("Domain")
        out: dict[str, Any] = {"Request": "GetValue"}
        if key is not None:
            out["Key"] = key
        if domain is not None:
            out["Domain"] = domain
        if self.session_id is None and (domain or key not in _PUBLIC_KEYS):
            out["Error"] = "NoRunningSession"
            return out
        table = self.facts.domains.get(domain) if domain else self.facts.values
        if table is None:
            out["Error"] = "MissingValue"
        elif key is None:
            out["Value"] = table
        elif key in table:
            out["Value"] = table[key]
        else:
            out["Error"] = "MissingValue"
        return out

    def _start_session(self, conn: socket.socket, req: dict[str, Any]
                       ) -> ssl.SSLSocket | None:
        host_id = req.get("HostID")
        root_pem = self.facts.trusted_hosts.get(str(host_id))
        if root_pem is None:
            send_plist(conn, {"Request": "StartSession", "Error": "InvalidHostID"})
            return None
        self.session_id = str(uuid.uuid4()).upper()
        send_plist(conn, {"Request": "StartSession", "SessionID": self.session_id,
                          "EnableSessionSSL": True})
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # as lockdownd; a refused client
        ctx.load_cert_chain(str(self.facts.cert_file))  # certificate fails in the handshake
        ctx.verify_mode = ssl.CERT_REQUIRED  # the host must prove it holds the pair record
        ctx.load_verify_locations(cadata=root_pem.decode())
        try:
            return ctx.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):
            self.session_id = None
            raise ConnectionAbortedError("TLS handshake refused") from None

    def _start_service(self, req: dict[str, Any]) -> dict[str, Any]:
        name = str(req.get("Service", ""))
        if self.session_id is None:
            return {"Request": "StartService", "Service": name, "Error": "NoRunningSession"}
        port = self.start_service(name)
        if port is None:
            return {"Request": "StartService", "Service": name, "Error": "InvalidService"}
        return {"Request": "StartService", "Service": name, "Port": port,
                "EnableServiceSSL": False}
