"""Key fingerprints, shared by controller and agent: ``SHA256:<base64, no padding>`` of the
DER SubjectPublicKeyInfo (the same shape OpenSSH prints for host keys)."""

from __future__ import annotations

import base64
import hashlib

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from fleet.core import errors

__all__ = ["fingerprint_der", "fingerprint_public_key", "load_trusted_public_key"]


def fingerprint_der(spki_der: bytes) -> str:
    digest = hashlib.sha256(spki_der).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def fingerprint_public_key(key: PublicKeyTypes) -> str:
    der = key.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return fingerprint_der(der)


def load_trusted_public_key(pem: str | bytes) -> ed25519.Ed25519PublicKey:
    """The controller's public key as a device pins it (PEM SubjectPublicKeyInfo)."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise errors.KeyMaterialError("pinned controller key is not a valid PEM key") from exc
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise errors.KeyMaterialError("pinned controller key is not an Ed25519 key")
    return key
