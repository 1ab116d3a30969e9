"""Per-device key envelopes (package format 2): one device's wrapped data key, apart from
the package, so the signed manifest stays the same size for 1 or 100,000 devices.

An envelope is 181 bytes, all integers big-endian (``docs/package-format.md``)::

    0    8   magic  89 46 45 4E 56 0D 0A 1A   ("\\x89FENV\\r\\n\\x1a")
    8    2   envelope version (1)
    10   2   flags (0)
    12   32  manifest digest: SHA-256 of the package's canonical manifest (its content)
    44   32  recipient key id: SHA-256 of the device key's DER SubjectPublicKeyInfo
             (the fingerprint ``SHA256:<base64>`` as raw bytes)
    76   65  epk: an ephemeral P-256 public key, X9.62 uncompressed
    141  40  the data key, AES key wrapped (RFC 3394)

The wrap is format 1's with its own label: ``Z = ECDH(e, device key)``, ``KEK =
HKDF-SHA256(Z, salt = manifest digest, info = "fleet.kek/2" 00 fingerprint 00 epk)``. The
salt and info bind the wrap to this package and this device, so an envelope lifted to
another device or package does not open; the named digest and key id are checked first so
the refusal says which (:class:`EnvelopeMismatchError`, :class:`NotRecipientError`).

Envelopes are not signed and need not be: the signed manifest commits to the data key
(``key_commitment`` = SHA-256("fleet.key-commitment/2" 00 data key)), so an envelope that
anyone made with the device's public key and a key of their own opens to a key that
matches no commitment (:class:`KeyCommitmentError`), before a byte of payload is read; and
even without the commitment every chunk is authenticated under the real data key and the
plaintext hashed against the signed digests. The only valid envelope is one for the real
data key, i.e. what the controller made (or a fellow recipient, who already knows it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from fleet.core import errors
from fleet.core.package.manifest import Manifest
from fleet.core.package.recipients import Recipient

__all__ = ["ENVELOPE_MAGIC", "ENVELOPE_SIZE", "Envelope", "check_envelope", "derive_kek2",
           "envelope_from_text", "envelope_to_text", "fingerprint_of_key_id",
           "key_commitment", "key_id_of", "open_envelope", "seal_envelope"]

ENVELOPE_MAGIC = b"\x89FENV\r\n\x1a"
ENVELOPE_VERSION = 1
_LAYOUT = struct.Struct(">8sHH32s32s65s40s")
ENVELOPE_SIZE = _LAYOUT.size  # 181
_KEK_LABEL = b"fleet.kek/2"
_COMMIT_LABEL = b"fleet.key-commitment/2"


def key_id_of(fingerprint: str) -> bytes:
    """The 32 raw bytes behind ``SHA256:<base64, no padding>``."""
    try:
        raw = base64.b64decode(fingerprint.removeprefix("SHA256:") + "=", validate=True)
    except (binascii.Error, ValueError) as exc:
        raise errors.KeyMaterialError(f"bad key fingerprint {fingerprint!r}") from exc
    if len(raw) != 32 or not fingerprint.startswith("SHA256:"):
        raise errors.KeyMaterialError(f"bad key fingerprint {fingerprint!r}")
    return raw


def fingerprint_of_key_id(key_id: bytes) -> str:
    return "SHA256:" + base64.b64encode(key_id).decode().rstrip("=")


def key_commitment(data_key: bytes) -> str:
    """What the signed manifest says about its data key (64 hex): SHA-256 of a label and
    the key. One-way, so it reveals nothing of a random 256-bit key."""
    return hashlib.sha256(_COMMIT_LABEL + b"\x00" + data_key).hexdigest()


def derive_kek2(shared: bytes, manifest_digest: bytes, fingerprint: str, epk: bytes
                ) -> bytes:
    info = _KEK_LABEL + b"\x00" + fingerprint.encode("ascii") + b"\x00" + epk
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=manifest_digest,
                info=info).derive(shared)


@dataclass(frozen=True)
class Envelope:
    """One device's key envelope; :meth:`to_bytes` / :meth:`parse` are the wire form."""

    manifest_digest: bytes  #: 32 bytes
    key_id: bytes  #: 32 bytes, SHA-256 of the device's SubjectPublicKeyInfo
    epk: bytes  #: 65 bytes, X9.62 uncompressed P-256 point
    wrapped: bytes  #: 40 bytes, RFC 3394

    @property
    def fingerprint(self) -> str:
        """The recipient device's fingerprint (``SHA256:…``)."""
        return fingerprint_of_key_id(self.key_id)

    def to_bytes(self) -> bytes:
        return _LAYOUT.pack(ENVELOPE_MAGIC, ENVELOPE_VERSION, 0, self.manifest_digest,
                            self.key_id, self.epk, self.wrapped)

    @classmethod
    def parse(cls, data: bytes) -> Envelope:
        """EnvelopeFormatError unless ``data`` is exactly one well-formed envelope."""
        if len(data) != ENVELOPE_SIZE:
            raise errors.EnvelopeFormatError(
                f"key envelope is {len(data)} bytes, not {ENVELOPE_SIZE} (truncated or "
                "padded)", size=len(data), expected=ENVELOPE_SIZE)
        magic, version, flags, digest, key_id, epk, wrapped = _LAYOUT.unpack(data)
        if magic != ENVELOPE_MAGIC:
            raise errors.EnvelopeFormatError("not a key envelope (bad magic)")
        if version != ENVELOPE_VERSION or flags != 0:
            raise errors.EnvelopeFormatError(
                f"key envelope version {version} flags {flags:#x} are not supported",
                version=version, flags=flags)
        if epk[0] != 4:
            raise errors.EnvelopeFormatError("key envelope: epk is not an uncompressed point")
        return cls(digest, key_id, epk, wrapped)


def envelope_from_text(value: object) -> bytes | None:
    """An envelope as the agent protocol carries it (base64 text) -> bytes; None stays
    None; anything else is EnvelopeFormatError (the bytes are checked when used)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise errors.EnvelopeFormatError("key envelope must be base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise errors.EnvelopeFormatError("key envelope is not valid base64") from exc


def envelope_to_text(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def seal_envelope(data_key: bytes, recipient: Recipient, manifest_digest: bytes
                  ) -> Envelope:
    """Wrap ``data_key`` for ``recipient`` (a fresh ephemeral key per envelope)."""
    eph = ec.generate_private_key(ec.SECP256R1())
    epk = eph.public_key().public_bytes(serialization.Encoding.X962,
                                        serialization.PublicFormat.UncompressedPoint)
    shared = eph.exchange(ec.ECDH(), recipient.public_key)
    kek = derive_kek2(shared, manifest_digest, recipient.fingerprint, epk)
    return Envelope(manifest_digest, key_id_of(recipient.fingerprint), epk,
                    aes_key_wrap(kek, data_key))


def check_envelope(data: bytes | None, m: Manifest, device_fingerprint: str) -> Envelope:
    """The envelope of this device for this package, checked before any key work:
    MissingEnvelopeError (none came), EnvelopeFormatError (malformed),
    EnvelopeMismatchError (it names another package), NotRecipientError (another device)."""
    where = f"package {m.name} v{m.version}"
    if data is None:
        raise errors.MissingEnvelopeError(
            f"{where} came without this device's key envelope (format 2: the data key "
            "travels in a per-device envelope sent with the package, or in the bundle "
            "PACKAGE.envelopes beside it); not staged", name=m.name, version=m.version)
    env = Envelope.parse(data)
    digest = m.content_digest()
    if not hmac.compare_digest(env.manifest_digest, digest):
        raise errors.EnvelopeMismatchError(
            f"the key envelope belongs to another package than {where}",
            envelope_for=env.manifest_digest.hex(), manifest=digest.hex())
    if env.fingerprint != device_fingerprint:
        raise errors.NotRecipientError(
            f"the key envelope for {where} is addressed to another device",
            device=device_fingerprint, envelope_for=env.fingerprint)
    return env


def open_envelope(env: Envelope, device_key: ec.EllipticCurvePrivateKey, m: Manifest
                  ) -> bytes:
    """The data key: WrongKeyError when the wrap does not open with ``device_key`` (an
    edited envelope), KeyCommitmentError when it opens to a key the signed manifest does
    not commit to (an envelope made by someone else)."""
    try:
        peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), env.epk)
    except ValueError as exc:
        raise errors.EnvelopeFormatError("key envelope: epk is not a P-256 point") from exc
    shared = device_key.exchange(ec.ECDH(), peer)
    kek = derive_kek2(shared, env.manifest_digest, env.fingerprint, env.epk)
    try:
        data_key = aes_key_unwrap(kek, env.wrapped)
    except InvalidUnwrap as exc:
        raise errors.WrongKeyError(
            "the key envelope does not open with this device's key (altered, or wrapped "
            "for another key)", recipient=env.fingerprint) from exc
    if m.key_commitment is None or not hmac.compare_digest(
            key_commitment(data_key), m.key_commitment):
        raise errors.KeyCommitmentError(
            f"the key envelope opens to a data key that package {m.name} v{m.version} does "
            "not commit to (made by someone else than the signer)",
            recipient=env.fingerprint)
    return data_key
