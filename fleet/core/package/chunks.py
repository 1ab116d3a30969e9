"""The payload: AES-256-GCM over fixed-size chunks, streamed both ways.

Chunk ``i`` of ``n`` (``last`` = ``i == n-1``) is sealed with

    nonce_i = header_digest[0:7] || uint32_be(i) || uint8(last)          (12 bytes)
    aad_i   = header_digest || uint64_be(i) || uint8(last)                (41 bytes)

and stored as ciphertext || 16-byte tag. This is the STREAM construction (Hoang, Reyhanitabar,
Rogaway, Vizár 2015), as in Tink and age: the index stops reordering, the last flag stops
truncation at a chunk boundary, the header digest stops splicing between packages (and the
data key is random per package anyway). Every size is signed, so a reader also knows where
the payload must end and refuses bytes after it.

Diagnostics: a chunk that fails at its own position is tried at the other positions, so a
moved chunk is reported as ``ChunkOrderError`` (it is genuine, but misplaced); one that
opens nowhere is ``ChunkAuthError`` with ``reason="spliced_or_corrupt"``: a flipped bit and
a chunk from another package are the same thing to AES-GCM, and we say so rather than guess.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fleet.core import errors
from fleet.core.package.manifest import chunk_count

__all__ = ["TAG_SIZE", "chunk_aad", "chunk_nonce", "decrypt_chunks", "encrypt_chunks",
           "payload_length"]

class ReadInto(Protocol):
    def readinto(self, buffer: Any, /) -> int | None: ...


class ReadStream(ReadInto, Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


TAG_SIZE = 16
#: how many other positions a failing chunk is tried at before calling it corrupt
MAX_ORDER_PROBES = 1024


def chunk_nonce(header_digest: bytes, index: int, last: bool) -> bytes:
    return header_digest[:7] + struct.pack(">IB", index, 1 if last else 0)


def chunk_aad(header_digest: bytes, index: int, last: bool) -> bytes:
    return header_digest + struct.pack(">QB", index, 1 if last else 0)


def payload_length(size: int, chunk_size: int) -> int:
    """Bytes of ciphertext (tags included) that a payload of ``size`` must occupy."""
    return size + TAG_SIZE * chunk_count(size, chunk_size)


def _plain_len(i: int, n: int, size: int, chunk_size: int) -> int:
    return chunk_size if i < n - 1 else size - (n - 1) * chunk_size


def _read_full(f: ReadInto, view: memoryview) -> int:
    got = 0
    while got < len(view):
        r = f.readinto(view[got:])
        if not r:
            break
        got += r
    return got


def encrypt_chunks(src: ReadInto, dst: BinaryIO, key: bytes, header_digest: bytes, size: int,
                   chunk_size: int, progress: Callable[[int], None] | None = None) -> None:
    """Read ``size`` plaintext bytes from ``src``, write the sealed chunks to ``dst``.

    Two buffers of one chunk each are reused, so memory does not grow with the payload."""
    if len(key) != 32:
        raise ValueError("data key must be 32 bytes")
    aead = AESGCM(key)
    n = chunk_count(size, chunk_size)
    inbuf = bytearray(chunk_size)
    outbuf = bytearray(chunk_size + TAG_SIZE)
    inview, outview = memoryview(inbuf), memoryview(outbuf)
    for i in range(n):
        plen = _plain_len(i, n, size, chunk_size)
        if _read_full(src, inview[:plen]) != plen:
            raise errors.FormatError("plaintext ended before its declared size",
                                     chunk=i, expected=plen)
        last = i == n - 1
        aead.encrypt_into(chunk_nonce(header_digest, i, last), inview[:plen],
                          chunk_aad(header_digest, i, last), outview[:plen + TAG_SIZE])
        dst.write(outview[:plen + TAG_SIZE])
        if progress is not None:
            progress(plen)


def _diagnose(aead: AESGCM, ct: memoryview, index: int, n: int, header_digest: bytes,
              scratch: memoryview) -> errors.PackageError:
    """Why chunk ``index`` failed: does it belong at another position?"""
    probes = 0
    for dist in range(1, n):
        for j in (index - dist, index + dist):
            if not 0 <= j < n:
                continue
            if probes >= MAX_ORDER_PROBES:
                return errors.ChunkAuthError(
                    f"chunk {index} fails authentication", chunk=index,
                    reason="spliced_or_corrupt", probed=probes, probe_limit_hit=True)
            probes += 1
            last = j == n - 1
            try:
                aead.decrypt_into(chunk_nonce(header_digest, j, last), ct,
                                  chunk_aad(header_digest, j, last), scratch[:len(ct) - TAG_SIZE])
            except (InvalidTag, ValueError):
                continue
            return errors.ChunkOrderError(
                f"chunk at position {index} is chunk {j} of this package (reordered)",
                chunk=index, found=j)
    return errors.ChunkAuthError(
        f"chunk {index} fails authentication at every position: corrupt, or spliced in "
        "from another package", chunk=index, reason="spliced_or_corrupt", probed=probes)


def decrypt_chunks(src: ReadStream, key: bytes, header_digest: bytes, size: int,
                   chunk_size: int, *, on_ciphertext: Callable[[memoryview], None] | None = None,
                   check_end: bool = True) -> Iterator[memoryview]:
    """Yield the authenticated plaintext of each chunk, in order.

    Each yielded view is only valid until the next one is requested (the buffer is
    reused). ``on_ciphertext`` sees each chunk's ciphertext as read (the store uses it to
    keep the encrypted package while checking it). With ``check_end`` the stream must end
    right after the last chunk: one more byte is ``TrailingDataError``.
    """
    aead = AESGCM(key)
    n = chunk_count(size, chunk_size)
    inbuf = bytearray(chunk_size + TAG_SIZE)
    outbuf = bytearray(chunk_size)
    inview, outview = memoryview(inbuf), memoryview(outbuf)
    for i in range(n):
        plen = _plain_len(i, n, size, chunk_size)
        clen = plen + TAG_SIZE
        got = _read_full(src, inview[:clen])
        if got != clen:
            raise errors.TruncatedPayloadError(
                f"payload ends inside chunk {i} of {n} ({got} of {clen} bytes)",
                chunk=i, chunks=n, expected=clen, got=got)
        ct = inview[:clen]
        if on_ciphertext is not None:
            on_ciphertext(ct)
        last = i == n - 1
        try:
            aead.decrypt_into(chunk_nonce(header_digest, i, last), ct,
                              chunk_aad(header_digest, i, last), outview[:plen])
        except InvalidTag:
            raise _diagnose(aead, ct, i, n, header_digest, outview) from None
        yield outview[:plen]
    if check_end and src.read(1):
        raise errors.TrailingDataError("bytes follow the last chunk of the payload",
                                       chunks=n)
