"""Package format, keys, signing, encryption and MNN model inspection.

Controller: :func:`build_package`, :func:`read_manifest`, :mod:`.keys`, :mod:`.mnninfo`.
Device: :func:`verify_manifest`, :func:`decrypt_package`, :func:`check_version`,
:func:`check_base_binding`, :func:`verify_rollback_order` (pure, apart from the file read
in ``decrypt_package``). Format and threats: ``docs/package-format.md``.
"""

from __future__ import annotations

from fleet.artifacts.build import base_binding, build_package, file_sha256, read_manifest
from fleet.artifacts.chunks import decrypt_chunks, encrypt_chunks, payload_length
from fleet.artifacts.keyid import fingerprint_der, fingerprint_public_key
from fleet.artifacts.keys import (
    SigningKeyInfo,
    init_signing_key,
    load_signing_key,
    load_trusted_public_key,
)
from fleet.artifacts.layout import MAGIC, Header, encode_header, parse_header, read_header_bytes
from fleet.artifacts.limits import DEFAULT_CHUNK_SIZE, Limits
from fleet.artifacts.manifest import FileEntry, Manifest, WrappedKey
from fleet.artifacts.orders import RollbackOrder, sign_rollback_order, verify_rollback_order
from fleet.artifacts.payload import OpenedHeader, PayloadChecker, decrypt_package, open_header
from fleet.artifacts.recipients import Recipient, unwrap_data_key, wrap_data_key
from fleet.artifacts.verify import (
    ModelState,
    RollbackAllowance,
    check_base_binding,
    check_version,
    verify_manifest,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MAGIC",
    "FileEntry",
    "Header",
    "Limits",
    "Manifest",
    "ModelState",
    "OpenedHeader",
    "PayloadChecker",
    "Recipient",
    "RollbackAllowance",
    "RollbackOrder",
    "SigningKeyInfo",
    "WrappedKey",
    "base_binding",
    "build_package",
    "check_base_binding",
    "check_version",
    "decrypt_chunks",
    "decrypt_package",
    "encode_header",
    "encrypt_chunks",
    "file_sha256",
    "fingerprint_der",
    "fingerprint_public_key",
    "init_signing_key",
    "load_signing_key",
    "load_trusted_public_key",
    "open_header",
    "parse_header",
    "payload_length",
    "read_header_bytes",
    "read_manifest",
    "sign_rollback_order",
    "unwrap_data_key",
    "verify_manifest",
    "verify_rollback_order",
    "wrap_data_key",
]
