"""The ``.fpkg`` package format: the half both sides need.

Read, verify and decrypt (what a device does), the root of trust (:mod:`.trust`), plus
the symmetric halves that share their constants with it (the STREAM chunk construction,
the key wrap KDF and the per-device key envelopes (:mod:`.envelope`, :mod:`.bundle`), the
canonical JSON and the rollback-order form). Building and signing
packages is the controller's job (:mod:`fleet.artifacts`). Format and threats:
``docs/package-format.md``.

Pure functions over bytes and state, apart from the file read in :func:`decrypt_package`.
"""

from __future__ import annotations

from fleet.core.package.bundle import bundle_path, encode_bundle, find_envelope
from fleet.core.package.chunks import decrypt_chunks, encrypt_chunks, payload_length
from fleet.core.package.envelope import (
    ENVELOPE_SIZE,
    Envelope,
    check_envelope,
    key_commitment,
    open_envelope,
    seal_envelope,
)
from fleet.core.package.keyid import (
    fingerprint_der,
    fingerprint_public_key,
    load_trusted_public_key,
)
from fleet.core.package.layout import (
    MAGIC,
    Header,
    encode_header,
    parse_header,
    read_header_bytes,
)
from fleet.core.package.limits import DEFAULT_CHUNK_SIZE, Limits
from fleet.core.package.manifest import FileEntry, Manifest, WrappedKey
from fleet.core.package.orders import RollbackOrder, verify_rollback_order
from fleet.core.package.payload import (
    OpenedHeader,
    PayloadChecker,
    decrypt_package,
    open_header,
)
from fleet.core.package.recipients import Recipient, unwrap_data_key, wrap_data_key
from fleet.core.package.trust import (
    ClockReading,
    KeyRing,
    apply_root_chain,
    check_freshness,
    online_keys,
    parse_root,
    verify_root_update,
)
from fleet.core.package.verify import (
    ModelState,
    RollbackAllowance,
    check_base_binding,
    check_version,
    verify_manifest,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "ENVELOPE_SIZE",
    "MAGIC",
    "ClockReading",
    "Envelope",
    "FileEntry",
    "Header",
    "KeyRing",
    "Limits",
    "Manifest",
    "ModelState",
    "OpenedHeader",
    "PayloadChecker",
    "Recipient",
    "RollbackAllowance",
    "RollbackOrder",
    "WrappedKey",
    "apply_root_chain",
    "bundle_path",
    "check_base_binding",
    "check_envelope",
    "check_freshness",
    "check_version",
    "decrypt_chunks",
    "decrypt_package",
    "encode_bundle",
    "encode_header",
    "encrypt_chunks",
    "find_envelope",
    "fingerprint_der",
    "fingerprint_public_key",
    "key_commitment",
    "load_trusted_public_key",
    "online_keys",
    "open_envelope",
    "open_header",
    "parse_header",
    "parse_root",
    "payload_length",
    "read_header_bytes",
    "seal_envelope",
    "unwrap_data_key",
    "verify_manifest",
    "verify_rollback_order",
    "verify_root_update",
    "wrap_data_key",
]
