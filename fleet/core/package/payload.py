"""Opening a package: header checks, key unwrap, streaming decryption, digest checks.

Shared by the controller (tests, test vectors) and the device (store staging, decrypt into
memfd). Memory is bounded by two chunk buffers whatever the payload size: plaintext goes
to a caller-supplied ``write(path, view)`` per file, or nowhere when only checking.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives.asymmetric import ec

from fleet.core import errors
from fleet.core.package.chunks import decrypt_chunks, payload_length
from fleet.core.package.envelope import check_envelope, open_envelope
from fleet.core.package.layout import parse_header, read_header_bytes
from fleet.core.package.limits import Limits
from fleet.core.package.manifest import Manifest
from fleet.core.package.recipients import unwrap_data_key
from fleet.core.package.verify import (
    ModelState,
    RollbackAllowance,
    Signers,
    verify_manifest,
)

__all__ = ["OpenedHeader", "PayloadChecker", "decrypt_package", "open_header"]

WriteFn = Callable[[str, memoryview], None]


class PayloadChecker:
    """Split plaintext chunks into the manifest's files, hashing each, and check digests.

    With one file the payload digest is that file's digest (same bytes), so each byte is
    hashed once; with several files the concatenation is hashed too."""

    def __init__(self, m: Manifest, write: WriteFn | None = None) -> None:
        self.m = m
        self.write = write
        self.total = hashlib.sha256() if len(m.files) > 1 else None
        self.hashes = [hashlib.sha256() for _ in m.files]
        self.pos = 0
        self.idx = 0

    def feed(self, view: memoryview) -> None:
        if self.total is not None:
            self.total.update(view)
        off = 0
        while off < len(view):
            while self.m.files[self.idx].offset + self.m.files[self.idx].size <= self.pos:
                self.idx += 1  # skip empty files and finished ones
            f = self.m.files[self.idx]
            take = min(len(view) - off, f.offset + f.size - self.pos)
            part = view[off:off + take]
            self.hashes[self.idx].update(part)
            if self.write is not None:
                self.write(f.path, part)
            off += take
            self.pos += take

    def finish(self) -> None:
        if self.pos != self.m.size:
            raise errors.TruncatedPayloadError("payload shorter than declared",
                                               expected=self.m.size, got=self.pos)
        for f, h in zip(self.m.files, self.hashes, strict=True):
            if h.hexdigest() != f.sha256:
                raise errors.DigestMismatchError(
                    f"{f.path}: plaintext digest differs from the signed one",
                    path=f.path, expected=f.sha256, actual=h.hexdigest())
        total = self.total.hexdigest() if self.total is not None else self.hashes[0].hexdigest()
        if total != self.m.sha256:
            raise errors.DigestMismatchError("payload digest differs from the signed one",
                                             expected=self.m.sha256, actual=total)


@dataclass(frozen=True)
class OpenedHeader:
    manifest: Manifest
    header_digest: bytes
    payload_offset: int
    data_key: bytes | None
    raw: bytes  # the verified header bytes, exactly as read


def open_header(f: BinaryIO, trusted_signer: Signers,
                device_key: ec.EllipticCurvePrivateKey | None, *,
                device_fingerprint: str | None = None,
                installed_state: Mapping[str, ModelState] | None = None,
                limits: Limits | None = None, allowance: RollbackAllowance | None = None,
                envelope: bytes | None = None) -> OpenedHeader:
    """Read and verify the header; unwrap the data key when a device key is given.

    ``envelope``: the device's key envelope, needed by a format-2 package whenever a
    device key or fingerprint is given (:mod:`.envelope`)."""
    from fleet.core.package.keyid import fingerprint_public_key

    limits = limits or Limits()
    if device_key is not None and device_fingerprint is None:
        device_fingerprint = fingerprint_public_key(device_key.public_key())
    raw = read_header_bytes(f, limits)
    m = verify_manifest(raw, trusted_signer, device_fingerprint, installed_state,
                        limits=limits, allowance=allowance, envelope=envelope)
    header = parse_header(raw, limits)
    key = None
    if device_key is not None and device_fingerprint is not None:
        if m.uses_envelopes:
            env = check_envelope(envelope, m, device_fingerprint)
            key = open_envelope(env, device_key, m)
        else:
            key = unwrap_data_key(m.recipients[device_fingerprint], device_key,
                                  device_fingerprint, m.content_digest())
    return OpenedHeader(m, header.header_digest, header.payload_offset, key, raw)


def decrypt_package(path: str | os.PathLike[str], trusted_signer: Signers,
                    device_key: ec.EllipticCurvePrivateKey, *,
                    installed_state: Mapping[str, ModelState] | None = None,
                    write: WriteFn | None = None,
                    on_ciphertext: Callable[[memoryview], None] | None = None,
                    on_header: Callable[[bytes], None] | None = None,
                    limits: Limits | None = None,
                    allowance: RollbackAllowance | None = None,
                    check_manifest: Callable[[Manifest], None] | None = None,
                    envelope: bytes | None = None) -> Manifest:
    """Verify a whole package file; plaintext goes only to ``write`` (if given).

    ``on_header``/``on_ciphertext`` see the raw bytes as they are read (the store keeps
    exactly the bytes it checked). ``check_manifest`` runs extra policy (e.g. the LoRA
    base binding) after the header is trusted and before any payload is read.
    ``envelope``: this device's key envelope (format 2 packages); without one, the
    bundle ``PATH.envelopes`` beside the package is searched for this key's."""
    p = Path(path)
    if envelope is None:
        from fleet.core.package.bundle import bundle_path, find_envelope
        from fleet.core.package.keyid import fingerprint_public_key

        envelope = find_envelope(bundle_path(p), fingerprint_public_key(device_key.public_key()))
    with p.open("rb") as f:
        opened = open_header(f, trusted_signer, device_key, installed_state=installed_state,
                             limits=limits, allowance=allowance, envelope=envelope)
        m = opened.manifest
        if check_manifest is not None:
            check_manifest(m)
        want = opened.payload_offset + payload_length(m.size, m.chunk_size)
        have = os.fstat(f.fileno()).st_size
        if have < want:
            raise errors.TruncatedPayloadError(
                f"package is {want - have} bytes shorter than its manifest says",
                expected=want, size=have)
        if have > want:
            raise errors.TrailingDataError(
                f"{have - want} bytes follow the declared payload", expected=want, size=have)
        if on_header is not None:
            on_header(opened.raw)  # the bytes verified, not a second read of the file
        assert opened.data_key is not None
        checker = PayloadChecker(m, write)
        for view in decrypt_chunks(f, opened.data_key, opened.header_digest, m.size,
                                   m.chunk_size, on_ciphertext=on_ciphertext):
            checker.feed(view)
        checker.finish()
    return m
