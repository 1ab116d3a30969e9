"""The byte layout of a ``.fpkg`` file (``docs/package-format.md`` has the picture).

::

    0       8   magic  89 46 50 4B 47 0D 0A 1A   ("\\x89FPKG\\r\\n\\x1a")
    8       2   format version, uint16 big-endian (1: inline key wraps, 2: envelopes)
    10      2   flags, uint16 (0; anything else is refused)
    12      4   M = manifest length, uint32 big-endian
    16      M   manifest: canonical JSON, UTF-8
    16+M    2   signature algorithm, uint16 (0 = none, 1 = Ed25519)
    18+M    2   S = signature length, uint16 (0 or 64)
    20+M    S   signature over the M manifest bytes
    20+M+S  ..  payload: AES-256-GCM chunks (see chunks.py)

The *header* is every byte before the payload; its SHA-256, the header digest, is bound
into every chunk's nonce and AAD. Parsing here is pure: bytes in, ``Header`` out.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import BinaryIO

from fleet.core import errors
from fleet.core.package.limits import Limits

__all__ = ["FORMAT_INLINE", "FORMAT_VERSION", "FORMAT_VERSIONS", "MAGIC", "SIG_ED25519",
           "SIG_NONE", "Header", "encode_header", "parse_header", "read_header_bytes"]

MAGIC = b"\x89FPKG\r\n\x1a"
#: what the controller writes: the data key travels in per-device envelopes
FORMAT_VERSION = 2
#: the first form, every recipient's wrapped key in the signed manifest (still read:
#: packages stored before format 2, and ``.fpkg`` files made then)
FORMAT_INLINE = 1
FORMAT_VERSIONS = (FORMAT_INLINE, FORMAT_VERSION)
SIG_NONE = 0
SIG_ED25519 = 1
_FIXED = struct.Struct(">8sHHI")  # magic, version, flags, manifest length
_SIG = struct.Struct(">HH")  # algorithm, length


@dataclass(frozen=True)
class Header:
    manifest_bytes: bytes
    sig_alg: int
    signature: bytes
    header_digest: bytes  # SHA-256 of every byte before the payload
    payload_offset: int
    version: int = FORMAT_VERSION  # 1: inline key wraps, 2: per-device envelopes


def encode_header(manifest_bytes: bytes, signature: bytes | None,
                  version: int = FORMAT_VERSION) -> bytes:
    """The header bytes for a manifest and its Ed25519 signature (None: unsigned)."""
    if version not in FORMAT_VERSIONS:
        raise ValueError(f"unknown package format version {version}")
    alg = SIG_NONE if not signature else SIG_ED25519
    sig = signature or b""
    return (_FIXED.pack(MAGIC, version, 0, len(manifest_bytes)) + manifest_bytes
            + _SIG.pack(alg, len(sig)) + sig)


def _fixed(data: bytes, limits: Limits) -> tuple[int, int]:
    if len(data) < _FIXED.size:
        raise errors.FormatError("file too short to be a package", size=len(data))
    magic, version, flags, mlen = _FIXED.unpack_from(data)
    if magic != MAGIC:
        raise errors.FormatError("not a fleet package (bad magic)")
    if version not in FORMAT_VERSIONS:
        raise errors.FormatError(f"package format version {version} is not supported",
                                 version=version)
    if flags != 0:
        raise errors.FormatError(f"unknown package flags {flags:#x}", flags=flags)
    if mlen == 0:
        raise errors.FormatError("empty manifest")
    if mlen > limits.max_manifest_bytes:
        raise errors.SizeLimitError(f"manifest of {mlen} bytes exceeds the limit",
                                    size=mlen, limit=limits.max_manifest_bytes)
    return int(mlen), int(version)


def parse_header(data: bytes, limits: Limits | None = None) -> Header:
    """Parse the header at the start of ``data`` (extra bytes after it are ignored)."""
    limits = limits or Limits()
    mlen, version = _fixed(data, limits)
    sig_at = _FIXED.size + mlen
    if len(data) < sig_at + _SIG.size:
        raise errors.FormatError("package header is truncated")
    alg, slen = _SIG.unpack_from(data, sig_at)
    if alg not in (SIG_NONE, SIG_ED25519):
        raise errors.FormatError(f"unknown signature algorithm {alg}", alg=alg)
    if (alg == SIG_NONE) != (slen == 0) or slen not in (0, 64):
        raise errors.FormatError(f"bad signature block (alg {alg}, length {slen})",
                                 alg=alg, length=slen)
    end = sig_at + _SIG.size + slen
    if len(data) < end:
        raise errors.FormatError("package header is truncated")
    return Header(manifest_bytes=bytes(data[_FIXED.size:sig_at]), sig_alg=alg,
                  signature=bytes(data[sig_at + _SIG.size:end]),
                  header_digest=hashlib.sha256(data[:end]).digest(), payload_offset=end,
                  version=version)


def _read_exact(f: BinaryIO, n: int) -> bytes:
    buf = f.read(n)
    if len(buf) != n:
        raise errors.FormatError("package header is truncated")
    return buf


def read_header_bytes(f: BinaryIO, limits: Limits | None = None) -> bytes:
    """Read exactly the header from a stream (the only I/O in this module)."""
    limits = limits or Limits()
    fixed = _read_exact(f, _FIXED.size)
    mlen, _ = _fixed(fixed, limits)
    body = _read_exact(f, mlen + _SIG.size)
    _, slen = _SIG.unpack_from(body, mlen)
    if slen > 64:
        raise errors.FormatError(f"bad signature length {slen}", length=slen)
    return fixed + body + _read_exact(f, slen)
