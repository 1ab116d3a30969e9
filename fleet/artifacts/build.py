"""Controller side: build a package from files, read a package's manifest back.

Two passes over the plaintext: the first hashes it (the digests go into the signed
manifest, and the manifest's digest into every chunk), the second encrypts it. Memory
stays at two chunk buffers; the files are checked for changes between the passes.

The data key reaches each recipient in a per-device key envelope (format 2), written
together into the bundle ``OUT.fpkg.envelopes`` beside the package: the package itself,
and what every device downloads, do not grow with the number of recipients. The first
form (format 1: every wrapped key inside the signed manifest, ~150 bytes per recipient)
is still built on request (``envelopes=False``), for the test vectors and the scale bench.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import secrets
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.asymmetric import ed25519

from fleet.core import errors
from fleet.core.package.bundle import bundle_path, encode_bundle
from fleet.core.package.canonical import parse_canonical
from fleet.core.package.chunks import encrypt_chunks
from fleet.core.package.envelope import key_commitment, seal_envelope
from fleet.core.package.keyid import fingerprint_public_key
from fleet.core.package.layout import (
    FORMAT_INLINE,
    FORMAT_VERSION,
    encode_header,
    parse_header,
    read_header_bytes,
)
from fleet.core.package.limits import DEFAULT_CHUNK_SIZE, Limits
from fleet.core.package.manifest import FileEntry, Manifest
from fleet.core.package.orders import default_sequence
from fleet.core.package.recipients import Recipient, wrap_data_key
from fleet.core.package.trust import format_time
from fleet.core.package.verify import Signers, verify_manifest

__all__ = ["DEFAULT_PACKAGE_TTL", "base_binding", "build_package", "read_manifest"]

#: how long a package stays valid on devices unless the caller says otherwise (the
#: product's paths take it from ``FLEET_PACKAGE_EXPIRES_DAYS``: fleet.artifacts.trust)
DEFAULT_PACKAGE_TTL = timedelta(days=90)

_HASH_BLOCK = 1 << 20


def _hash_into(path: str | os.PathLike[str], hashers: Sequence[Any],
               progress: Callable[[int], None] | None) -> None:
    buf = bytearray(_HASH_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            for h in hashers:
                h.update(view[:n])
            if progress is not None:
                progress(n)


class _Concat:
    """The payload as one stream: the files back to back (readinto only)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self._paths = list(paths)
        self._cur: BinaryIO | None = None

    def readinto(self, view: memoryview) -> int:
        while self._paths or self._cur is not None:
            if self._cur is None:
                self._cur = open(self._paths.pop(0), "rb", buffering=0)  # noqa: SIM115
            n = self._cur.readinto(view)  # type: ignore[attr-defined]
            if n:
                return int(n)
            self._cur.close()
            self._cur = None
        return 0

    def close(self) -> None:
        if self._cur is not None:
            self._cur.close()


def _stamp(p: Path) -> tuple[int, int, int]:
    st = p.stat()
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def build_package(files: Sequence[tuple[str, Path]], out: Path, *, name: str, version: int,
                  kind: str, recipients: Sequence[Recipient],
                  signing_key: ed25519.Ed25519PrivateKey, entry: str,
                  mnn_facts: dict[str, Any] | None, base: dict[str, Any] | None = None,
                  golden: str | None = None, sequence: int | None = None,
                  chunk_size: int = DEFAULT_CHUNK_SIZE,
                  progress: Callable[[int], None] | None = None,
                  expires_in: timedelta = DEFAULT_PACKAGE_TTL,
                  now: datetime | None = None, envelopes: bool = True,
                  limits: Limits | None = None) -> Manifest:
    """Write ``out`` (a ``.fpkg``) holding ``files`` (payload path, local file) for
    ``recipients``, signed with ``signing_key``; returns the manifest.

    With ``envelopes`` (format 2, the default) each recipient's key envelope goes into
    ``OUT.fpkg.envelopes`` (:func:`fleet.core.package.bundle_path`); without, format 1:
    every wrapped key in the manifest, no bundle (refused with UsageError when that
    manifest outgrows what devices accept, ``limits``: about 4,600 recipients at 1 MiB).
    ``progress`` is called with byte counts, twice per payload byte (hash, encrypt).
    ``sequence`` should come from the registry's counter (``fleet.artifacts.trust``);
    without one this low-level API falls back to milliseconds since the epoch. The
    manifest expires ``expires_in`` after ``now`` (default: the clock)."""
    if not files:
        raise errors.UsageError("a package needs at least one file")
    if not recipients:
        raise errors.UsageError("a package needs at least one recipient device")
    if not Manifest.valid_name(name):
        raise errors.UsageError(f"bad package name {name!r} (letters, digits, . _ -)")
    lim = limits or Limits()
    if not lim.min_chunk_size <= chunk_size <= lim.max_chunk_size:
        raise errors.UsageError(f"chunk size {chunk_size} out of bounds")
    stamps = [_stamp(Path(p)) for _, p in files]
    entries: list[FileEntry] = []
    offset = 0
    total = hashlib.sha256() if len(files) > 1 else None
    for (rel, p), (size, _, _) in zip(files, stamps, strict=True):
        h = hashlib.sha256()
        _hash_into(p, [h] if total is None else [h, total], progress)
        entries.append(FileEntry(rel, size, h.hexdigest(), offset))
        offset += size
    by_fp = {r.fingerprint: r for r in recipients}
    created = now or datetime.now(UTC)
    data_key = os.urandom(32)
    fmt = FORMAT_VERSION if envelopes else FORMAT_INLINE
    m = Manifest(
        package_id=secrets.token_hex(16), name=name, kind=kind, version=version,
        sequence=default_sequence() if sequence is None else sequence,
        created=format_time(created), size=offset,
        sha256=total.hexdigest() if total is not None else entries[0].sha256,
        chunk_size=chunk_size, files=tuple(entries), entry=entry,
        signer=fingerprint_public_key(signing_key.public_key()), recipients={},
        mnn=mnn_facts, golden=golden, base=base, expires=format_time(created + expires_in),
        format=fmt, key_commitment=key_commitment(data_key) if envelopes else None)
    digest = m.content_digest()
    bundle: bytes | None = None
    if envelopes:
        bundle = encode_bundle(digest, (seal_envelope(data_key, r, digest)
                                        for r in by_fp.values()))
    else:
        m = dataclasses.replace(m, recipients={fp: wrap_data_key(data_key, r, digest)
                                               for fp, r in by_fp.items()})
    try:
        manifest_bytes = m.to_bytes()
        m = Manifest.from_dict(parse_canonical(manifest_bytes))  # same checks as a device
    except errors.FormatError as exc:
        raise errors.UsageError(f"cannot build package: {exc.message}", **exc.details) from exc
    if len(manifest_bytes) > lim.max_manifest_bytes:
        raise errors.UsageError(
            f"the manifest for {len(by_fp)} recipients is {len(manifest_bytes)} bytes, over "
            f"the {lim.max_manifest_bytes} devices accept (format 1 lists every wrapped key; "
            "build with key envelopes)", size=len(manifest_bytes),
            limit=lim.max_manifest_bytes, recipients=len(by_fp))
    header = encode_header(manifest_bytes, signing_key.sign(manifest_bytes), fmt)
    _write(Path(out), header, bundle, files, stamps, data_key, m, progress, lim)
    return m


def _write(out: Path, header: bytes, bundle: bytes | None,
           files: Sequence[tuple[str, Path]], stamps: list[tuple[int, int, int]],
           data_key: bytes, m: Manifest, progress: Callable[[int], None] | None,
           limits: Limits) -> None:
    """Write the package (and its bundle) under temp names, then rename both into place:
    the bundle first, so a package file never stands without its envelopes."""
    header_digest = parse_header(header, limits).header_digest
    tag = secrets.token_hex(4)
    tmp = out.with_name(f".{out.name}.{tag}.tmp")
    btmp = out.with_name(f".{out.name}.{tag}.envelopes.tmp")
    src = _Concat([Path(p) for _, p in files])
    try:
        with open(tmp, "wb") as dst:
            dst.write(header)
            encrypt_chunks(src, dst, data_key, header_digest, m.size, m.chunk_size, progress)
            dst.flush()
            os.fsync(dst.fileno())
        if [_stamp(Path(p)) for _, p in files] != stamps:
            raise errors.UsageError("an input file changed while it was being packaged")
        if bundle is not None:
            with open(btmp, "wb") as b:
                b.write(bundle)
                b.flush()
                os.fsync(b.fileno())
            os.replace(btmp, bundle_path(out))
        else:
            bundle_path(out).unlink(missing_ok=True)  # a format-1 package has none
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        btmp.unlink(missing_ok=True)
        raise
    finally:
        src.close()


def read_manifest(path: str | os.PathLike[str],
                  trusted_signer: Signers | None = None) -> Manifest:
    """The manifest of a package file, no key needed; with ``trusted_signer`` the signature
    is checked too (the controller's own bookkeeping)."""
    with open(path, "rb") as f:
        raw = read_header_bytes(f)
    if trusted_signer is not None:
        return verify_manifest(raw, trusted_signer, None, None)
    header = parse_header(raw)
    return Manifest.from_dict(parse_canonical(header.manifest_bytes))


def base_binding(base: Manifest) -> dict[str, Any]:
    """The ``base`` field for a LoRA package bound to the model in package ``base``."""
    by_name = {f.path.rsplit("/", 1)[-1]: f.sha256 for f in base.files}
    facts = base.mnn or {}
    return {"name": base.name, "version": base.version,
            "llm_mnn_sha256": by_name.get("llm.mnn", base.file(base.entry).sha256),
            "llm_weight_sha256": by_name.get("llm.mnn.weight"),
            "quant_bits": facts.get("quant_bits"), "quant_block": facts.get("quant_block")}
