"""``fleet server init-tls``: a private CA and a server certificate under the controller home.

Devices pin the fleet CA (``fleet-agent pull --ca ca.pem``) rather than trusting the
system's CAs: a fleet server is addressed by whatever IP or name the devices reach it at,
and nobody outside the fleet should be able to issue a certificate devices accept.
Keys are P-256, written 0600; certificates are public. The server certificate names
``localhost``, ``127.0.0.1``, ``::1``, this host's name and every ``--san`` given
(IP addresses or DNS names, e.g. the lab's ``10.77.0.1``).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleet.core import errors
from fleet.home import FleetHome

__all__ = ["TlsPaths", "init_tls", "tls_paths"]

CA_DAYS = 3650
SERVER_DAYS = 825


@dataclass(frozen=True)
class TlsPaths:
    ca_cert: Path
    ca_key: Path
    cert: Path
    key: Path

    def to_dict(self) -> dict[str, str]:
        return {"ca": str(self.ca_cert), "ca_key": str(self.ca_key), "cert": str(self.cert),
                "key": str(self.key)}


def tls_paths(home: FleetHome) -> TlsPaths:
    d = home.path / "tls"
    return TlsPaths(d / "ca.pem", d / "ca.key", d / "server.pem", d / "server.key")


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _names(extra: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    seen: set[str] = set()
    for name in ["localhost", "127.0.0.1", "::1", socket.gethostname(), *extra]:
        if not name or name in seen:
            continue
        seen.add(name)
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            if any(c.isspace() or c == "/" for c in name):
                raise errors.UsageError(f"--san {name!r} is neither an IP address nor a "
                                        "DNS name") from None
            out.append(x509.DNSName(name))
    return out


def init_tls(home: FleetHome, *, san: list[str] | None = None, force: bool = False,
             now: datetime | None = None) -> TlsPaths:
    """Make the CA (kept when it exists, unless ``force``) and a new server certificate
    signed by it; returns the paths. Raises UsageError for a malformed ``san``."""
    p = tls_paths(home)
    p.ca_cert.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    t = (now or datetime.now(UTC)) - timedelta(minutes=5)  # a device clock a bit behind
    if force or not (p.ca_cert.exists() and p.ca_key.exists()):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mnn-fleet CA"),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mnn-fleet")])
        ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
              .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(t).not_valid_after(t + timedelta(days=CA_DAYS))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                           crl_sign=True, content_commitment=False,
                                           key_encipherment=False, data_encipherment=False,
                                           key_agreement=False, encipher_only=False,
                                           decipher_only=False), critical=True)
              .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                             critical=False)
              .sign(ca_key, hashes.SHA256()))
        _write(p.ca_key, _key_pem(ca_key), 0o600)
        _write(p.ca_cert, ca.public_bytes(serialization.Encoding.PEM), 0o644)
    ca_key_loaded = serialization.load_pem_private_key(p.ca_key.read_bytes(), None)
    if not isinstance(ca_key_loaded, ec.EllipticCurvePrivateKey):
        raise errors.KeyMaterialError(f"{p.ca_key} is not a P-256 key", path=str(p.ca_key))
    ca_cert = x509.load_pem_x509_certificate(p.ca_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleet server")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(t).not_valid_after(t + timedelta(days=SERVER_DAYS))
            .add_extension(x509.SubjectAlternativeName(_names(list(san or []))),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key_loaded.public_key()), critical=False)
            .sign(ca_key_loaded, hashes.SHA256()))
    _write(p.key, _key_pem(key), 0o600)
    _write(p.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return p
