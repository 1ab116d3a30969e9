"""Resumable package downloads, verified as the bytes arrive (pull mode).

The package goes to ``incoming/<sha256>.fpkg.part`` (0600, ``O_NOFOLLOW``), exactly the
bytes the server sent, encrypted as they are in the store. Every byte passes through the
package verifier on its way: the header (signature by an online key of this device's
root, addressed to this device's key envelope, key commitment) as soon as it is complete,
then each chunk's AES-GCM tag and the signed plaintext digests, so a tampered or
truncated package is refused at the chunk where it goes wrong, not after the whole file
(:func:`fleet.core.package.open_header`, :func:`decrypt_chunks`, :class:`PayloadChecker`).
Plaintext exists only in the two chunk buffers in memory; it is never written anywhere.

Resume: a ``.part`` left by a dropped connection (or a server restarted mid-download) is
read back through the verifier first, then the rest is asked for with
``Range: bytes=<length>-``; a server that answers the whole file instead (200) means
starting over. The finished file is renamed to ``incoming/<sha256>.fpkg``, where
``stage`` takes it (and checks everything once more, as for a pushed package).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, cast

from cryptography.hazmat.primitives.asymmetric import ec

from fleet.core import errors
from fleet.core.package import (
    Limits,
    PayloadChecker,
    decrypt_chunks,
    open_header,
    payload_length,
)
from fleet.core.package.envelope import envelope_from_text
from fleet.core.package.verify import Signers

__all__ = ["Downloaded", "Fetch", "download_verified"]

#: ``fetch(offset)`` -> (HTTP status, iterator of body bytes) for ``bytes=offset-``
Fetch = Callable[[int], "tuple[int, Iterator[bytes]]"]


class _Throttle(Protocol):
    def __call__(self, n: int) -> None: ...


@dataclass(frozen=True)
class Downloaded:
    path: Path
    size: int
    resumed_from: int  #: bytes already on disk when this download started
    received: int  #: bytes that came over the network this time


class _Tee:
    """A read stream over the ``.part`` file's bytes, then the network's (each new byte
    appended to the file before it is handed on), hashing everything."""

    def __init__(self, part: BinaryIO, have: int, fetch: Fetch, limit: int,
                 throttle: _Throttle | None) -> None:
        self.part, self.have, self.fetch, self.limit = part, have, fetch, limit
        self.throttle = throttle
        self.pos = 0
        self.sha = hashlib.sha256()
        self.received = 0
        self._net: Iterator[bytes] | None = None
        self._buf = b""

    def _more(self) -> bytes:
        if self._net is None:
            status, body = self.fetch(self.have)
            if self.have and status != 206:
                raise errors.ConnectionLostError(
                    f"the server ignored the Range request (HTTP {status}); starting over",
                    restart=True)
            self._net = body
        for block in self._net:
            if block:
                if self.have + len(block) > self.limit:
                    raise errors.TrailingDataError("the server sent more than the package's "
                                                   "size", limit=self.limit)
                self.part.write(block)
                self.have += len(block)
                self.received += len(block)
                if self.throttle is not None:
                    self.throttle(len(block))
                return block
        return b""

    def readinto(self, view: Any) -> int:
        out = memoryview(view).cast("B")
        n = self.read_some(len(out))
        out[:len(n)] = n
        return len(n)

    def read_some(self, size: int) -> bytes:
        if not self._buf:
            if self.pos < self.have and self._net is None:
                self.part.seek(self.pos)
                self._buf = self.part.read(min(size, self.have - self.pos, 1 << 20))
                self.part.seek(0, os.SEEK_END)
            if not self._buf:
                self._buf = self._more()
        chunk, self._buf = self._buf[:size], self._buf[size:]
        self.pos += len(chunk)
        self.sha.update(chunk)
        return chunk

    def read(self, size: int = -1) -> bytes:
        want = self.limit - self.pos + 1 if size < 0 else size
        parts = []
        while want > 0:
            got = self.read_some(want)
            if not got:
                break
            parts.append(got)
            want -= len(got)
        return b"".join(parts)


def _open_part(path: Path) -> BinaryIO:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    return os.fdopen(fd, "a+b")


def download_verified(fetch: Fetch, incoming: Path, *, package_sha256: str, size: int,
                      trusted: Signers, device_key: ec.EllipticCurvePrivateKey,
                      envelope: str | None, limits: Limits | None = None,
                      max_rate: float | None = None) -> Downloaded:
    """Fetch the package ``package_sha256`` (``size`` bytes) into ``incoming/``, verifying
    it as it arrives (see the module docstring); returns where it is. A refused package
    (its :class:`PackageError`) deletes the ``.part``; a dropped connection keeps it for
    the next attempt (raises the transport error). ``max_rate``: bytes per second at most
    (a cellular link's budget)."""
    final = incoming / f"{package_sha256}.fpkg"
    part = incoming / f"{package_sha256}.fpkg.part"
    if final.exists() and final.stat().st_size == size:
        return Downloaded(final, size, size, 0)
    started = time.monotonic()

    def throttle(n: int) -> None:
        if max_rate:
            ahead = tee.received / max_rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)

    with _open_part(part) as f:
        have = f.seek(0, os.SEEK_END)
        if have > size:
            f.truncate(0)
            have = 0
        tee = _Tee(f, have, fetch, size, throttle if max_rate else None)
        try:
            opened = open_header(cast(BinaryIO, tee), trusted, device_key,
                                 envelope=envelope_from_text(envelope),
                                 limits=limits)
            m = opened.manifest
            if opened.payload_offset + payload_length(m.size, m.chunk_size) != size:
                raise errors.TruncatedPayloadError(
                    "the package's length differs from what the desired state says",
                    expected=size)
            assert opened.data_key is not None
            checker = PayloadChecker(m)  # plaintext is hashed and dropped, never written
            for view in decrypt_chunks(tee, opened.data_key, opened.header_digest, m.size,
                                       m.chunk_size, check_end=False):
                checker.feed(view)
            checker.finish()
            if tee.sha.hexdigest() != package_sha256:
                raise errors.DigestMismatchError(
                    "the package file's SHA-256 differs from the desired state's",
                    expected=package_sha256, actual=tee.sha.hexdigest())
            f.flush()
            os.fsync(f.fileno())
        except errors.PackageError:
            with contextlib.suppress(OSError):
                part.unlink()
            raise
        except errors.ConnectionLostError as exc:
            if exc.details.get("restart"):
                with contextlib.suppress(OSError):
                    part.unlink()
            raise
    os.replace(part, final)
    return Downloaded(final, size, have, tee.received)
