"""The device's identity: a P-256 key pair made on the device, private part 0600, never
leaving it. The controller wraps each package's data key to its public part."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleet.core import errors
from fleet.core.package.keyid import fingerprint_public_key

__all__ = ["load_device_key", "load_or_create_device_key", "public_pem"]


def _write_private(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_device_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError as exc:
        raise errors.KeyMaterialError(f"device is not enrolled: no key at {path}",
                                      path=str(path)) from exc
    if mode & 0o077:
        raise errors.KeyMaterialError(
            f"device key {path} is readable by others (mode {mode:o}); chmod 600 it",
            path=str(path), mode=mode)
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise errors.KeyMaterialError(f"device key {path} is not a P-256 key", path=str(path))
    return key


def load_or_create_device_key(path: Path) -> tuple[ec.EllipticCurvePrivateKey, bool]:
    """Return the device key, making it on first use. The bool says whether it is new."""
    if path.exists():
        return load_device_key(path), False
    key = ec.generate_private_key(ec.SECP256R1())
    _write_private(path, key)
    return key, True


def public_pem(key: ec.EllipticCurvePrivateKey) -> tuple[str, str]:
    """(PEM of the public key, its fingerprint)."""
    pub = key.public_key()
    pem = pub.public_bytes(serialization.Encoding.PEM,
                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return pem, fingerprint_public_key(pub)
