"""Per-device wrapping of the package's data key: ECDH P-256 + HKDF-SHA256 + AES key wrap.

P-256 because Android Keystore and the Secure Enclave hold exactly that curve, so an app
can do the ECDH step with a key that never leaves the hardware. For each recipient:

    e        = fresh P-256 key pair (ephemeral, one per recipient)
    Z        = ECDH(e, device public key)            32-byte shared x coordinate
    salt     = SHA-256(canonical manifest content)   (the manifest minus "recipients")
    info     = "fleet.kek/1" 0x00 fingerprint 0x00 epk (65-byte uncompressed point)
    KEK      = HKDF-SHA256(Z, salt, info, 32 bytes)
    wrapped  = AES-KW(KEK, data key)                 RFC 3394, 40 bytes

Binding the content digest means a wrapped key lifted into another package does not open
there; binding the fingerprint and epk means it only opens for the device it names.

This is format 1's wrap, each one inside the signed manifest. Format 2 wraps the same way
(label ``fleet.kek/2``) into a per-device envelope instead: :mod:`.envelope`.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from fleet.core import errors
from fleet.core.package.keyid import fingerprint_public_key
from fleet.core.package.manifest import WrappedKey

__all__ = ["Recipient", "derive_kek", "unwrap_data_key", "wrap_data_key"]

_INFO_LABEL = b"fleet.kek/1"


@dataclass(frozen=True)
class Recipient:
    """A device that may open a package: its P-256 public key and fingerprint."""

    fingerprint: str
    public_key: ec.EllipticCurvePublicKey
    name: str | None = None

    @classmethod
    def from_public_key(cls, key: ec.EllipticCurvePublicKey, name: str | None = None
                        ) -> Recipient:
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            raise errors.KeyMaterialError("a recipient key must be a P-256 public key",
                                          name=name)
        return cls(fingerprint_public_key(key), key, name)

    @classmethod
    def from_pem(cls, pem: str | bytes, *, name: str | None = None,
                 fingerprint: str | None = None) -> Recipient:
        """Load a device public key; if ``fingerprint`` is given it must match."""
        data = pem.encode() if isinstance(pem, str) else pem
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as exc:
            raise errors.KeyMaterialError(f"bad public key for device {name}",
                                          name=name) from exc
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise errors.KeyMaterialError(f"device {name} key is not an EC key", name=name)
        r = cls.from_public_key(key, name)
        if fingerprint is not None and fingerprint != r.fingerprint:
            raise errors.KeyMaterialError(
                f"device {name}: recorded fingerprint does not match its public key",
                name=name, recorded=fingerprint, actual=r.fingerprint)
        return r


def derive_kek(shared: bytes, content_digest: bytes, fingerprint: str, epk: bytes) -> bytes:
    info = _INFO_LABEL + b"\x00" + fingerprint.encode("ascii") + b"\x00" + epk
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=content_digest,
                info=info).derive(shared)


def wrap_data_key(data_key: bytes, recipient: Recipient, content_digest: bytes
                  ) -> WrappedKey:
    eph = ec.generate_private_key(ec.SECP256R1())
    epk = eph.public_key().public_bytes(serialization.Encoding.X962,
                                        serialization.PublicFormat.UncompressedPoint)
    shared = eph.exchange(ec.ECDH(), recipient.public_key)
    kek = derive_kek(shared, content_digest, recipient.fingerprint, epk)
    return WrappedKey(epk=base64.b64encode(epk).decode(),
                      wrapped_key=base64.b64encode(aes_key_wrap(kek, data_key)).decode())


def unwrap_data_key(wrapped: WrappedKey, device_key: ec.EllipticCurvePrivateKey,
                    fingerprint: str, content_digest: bytes) -> bytes:
    """The data key, or WrongKeyError when this device key does not open the wrap."""
    try:
        epk = base64.b64decode(wrapped.epk, validate=True)
        blob = base64.b64decode(wrapped.wrapped_key, validate=True)
        peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), epk)
    except (binascii.Error, ValueError) as exc:
        raise errors.FormatError("malformed wrapped key", recipient=fingerprint) from exc
    if len(epk) != 65 or len(blob) != 40:
        raise errors.FormatError("malformed wrapped key", recipient=fingerprint)
    shared = device_key.exchange(ec.ECDH(), peer)
    kek = derive_kek(shared, content_digest, fingerprint, epk)
    try:
        return aes_key_unwrap(kek, blob)
    except InvalidUnwrap as exc:
        raise errors.WrongKeyError(
            "the wrapped data key does not open with this device's key",
            recipient=fingerprint) from exc
