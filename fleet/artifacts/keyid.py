"""Key fingerprints, shared by controller and agent: ``SHA256:<base64, no padding>`` of the
DER SubjectPublicKeyInfo (the same shape OpenSSH prints for host keys)."""

from __future__ import annotations

import base64
import hashlib

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

__all__ = ["fingerprint_der", "fingerprint_public_key"]


def fingerprint_der(spki_der: bytes) -> str:
    digest = hashlib.sha256(spki_der).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def fingerprint_public_key(key: PublicKeyTypes) -> str:
    der = key.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return fingerprint_der(der)
