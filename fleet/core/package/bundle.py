"""Envelope bundles: every recipient's key envelope of one package, in one file beside it.

The controller writes ``PACKAGE.fpkg.envelopes`` when it builds a format-2 package and
sends each device only its own 181-byte record (:mod:`.envelope`). A device handed a
package file with its bundle beside it (``fleet package -o`` output copied by hand) finds
its record the same way. Records are sorted by key id, so a lookup reads about
``log2(N)`` records, never the whole file (18 MB at 100,000 devices)::

    0    8   magic  89 46 45 4E 42 0D 0A 1A   ("\\x89FENB\\r\\n\\x1a")
    8    2   bundle version (1)
    10   2   record size (181)
    12   4   N: number of records
    16   32  manifest digest (every record names it too)
    48   N * 181   envelopes, sorted by key id (bytes 44..76 of each), no duplicates

A bundle is not trusted any more than an envelope: whatever it holds is checked by
:func:`fleet.core.package.envelope.check_envelope` and :func:`open_envelope`.
"""

from __future__ import annotations

import itertools
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from fleet.core import errors
from fleet.core.package.envelope import (
    ENVELOPE_SIZE,
    Envelope,
    fingerprint_of_key_id,
    key_id_of,
)

__all__ = ["BUNDLE_MAGIC", "BUNDLE_SUFFIX", "bundle_fingerprints", "bundle_path",
           "encode_bundle", "find_envelope", "read_bundle_head"]

BUNDLE_MAGIC = b"\x89FENB\r\n\x1a"
BUNDLE_SUFFIX = ".envelopes"
_HEAD = struct.Struct(">8sHHI32s")
_KEY_AT = 44  # offset of the key id inside a record


def bundle_path(package: str | os.PathLike[str]) -> Path:
    """Where a package's bundle lives: ``PACKAGE.fpkg.envelopes``."""
    p = Path(package)
    return p.with_name(p.name + BUNDLE_SUFFIX)


def encode_bundle(manifest_digest: bytes, envelopes: Iterable[Envelope]) -> bytes:
    """The bundle bytes (records sorted by key id; a duplicate key id is a ValueError)."""
    recs = sorted((e.to_bytes() for e in envelopes), key=lambda r: r[_KEY_AT:_KEY_AT + 32])
    for a, b in itertools.pairwise(recs):
        if a[_KEY_AT:_KEY_AT + 32] == b[_KEY_AT:_KEY_AT + 32]:
            raise ValueError("two envelopes for one device key")
    return _HEAD.pack(BUNDLE_MAGIC, 1, ENVELOPE_SIZE, len(recs), manifest_digest) \
        + b"".join(recs)


def read_bundle_head(f: BinaryIO) -> tuple[int, bytes]:
    """(record count, manifest digest); EnvelopeFormatError unless the file's length is
    exactly the header plus ``count`` records."""
    f.seek(0)
    head = f.read(_HEAD.size)
    if len(head) != _HEAD.size:
        raise errors.EnvelopeFormatError("envelope bundle is truncated")
    magic, version, rsize, count, digest = _HEAD.unpack(head)
    if magic != BUNDLE_MAGIC or version != 1 or rsize != ENVELOPE_SIZE:
        raise errors.EnvelopeFormatError("not an envelope bundle (magic, version, size)")
    size = os.fstat(f.fileno()).st_size
    if size != _HEAD.size + count * ENVELOPE_SIZE:
        raise errors.EnvelopeFormatError(
            f"envelope bundle is {size} bytes, its header says {count} records",
            size=size, records=count)
    return count, digest


def _key_at(f: BinaryIO, i: int) -> bytes:
    f.seek(_HEAD.size + i * ENVELOPE_SIZE + _KEY_AT)
    return f.read(32)


def find_envelope(bundle: str | os.PathLike[str], fingerprint: str) -> bytes | None:
    """The envelope record for ``fingerprint`` (binary search), or None when the bundle
    has none; a missing bundle file is None too."""
    want = key_id_of(fingerprint)
    try:
        f = open(bundle, "rb")  # noqa: SIM115
    except FileNotFoundError:
        return None
    with f:
        count, _ = read_bundle_head(f)
        lo, hi = 0, count
        while lo < hi:
            mid = (lo + hi) // 2
            if _key_at(f, mid) < want:
                lo = mid + 1
            else:
                hi = mid
        if lo == count or _key_at(f, lo) != want:
            return None
        f.seek(_HEAD.size + lo * ENVELOPE_SIZE)
        return f.read(ENVELOPE_SIZE)


def bundle_fingerprints(bundle: str | os.PathLike[str]) -> list[str]:
    """Every recipient's fingerprint in the bundle, in key-id order (one sequential read)."""
    with open(bundle, "rb") as f:
        count, _ = read_bundle_head(f)
        body = f.read(count * ENVELOPE_SIZE)
    return [fingerprint_of_key_id(body[i + _KEY_AT:i + _KEY_AT + 32])
            for i in range(0, len(body), ENVELOPE_SIZE)]

