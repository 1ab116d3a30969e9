"""One packaging path, step 2: a prepared payload signed and encrypted for devices.

``build(home, reg, payload, devices)`` reuses a package of the same payload (same name,
files and digests, entry, kind and signer) already made for these devices, else builds one
into ``$FLEET_HOME/artifacts`` and records it in the registry. The version is claimed
atomically before anything is built (:mod:`fleet.registry.versions`): the one the registry
holds for this name and payload digest (the same payload is the same version, so a re-run
sends nothing), else one more than the highest; ``--version N`` takes N, and refuses it
when ``name@N`` holds another digest. ``use_package`` takes a ready ``.fpkg`` instead
(``fleet deploy x.fpkg``), under the same rule. A full or read-only package cache raises
the registry's RegistryFullError / RegistryReadOnlyError, not a bare OSError.

Recipients: a format-2 package's devices are those of its envelope bundle
(``PACKAGE.fpkg.envelopes``, :mod:`fleet.artifacts.envelopes`), which travels with the
package file wherever it is moved or copied; a format-1 package's are in its manifest.
"""

from __future__ import annotations

import hashlib
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlmodel import select

from fleet.artifacts import sources
from fleet.artifacts.build import build_package, read_manifest
from fleet.artifacts.envelopes import move_package, package_recipients, remove_package
from fleet.artifacts.keys import load_signing_key
from fleet.artifacts.prepare import PreparedPayload
from fleet.artifacts.recipients import recipients_of, require_enrolled
from fleet.artifacts.trust import next_sequence, package_ttl, trusted_keys
from fleet.core import errors
from fleet.core.fsutil import sha256_file
from fleet.core.package.keyid import fingerprint_public_key
from fleet.core.package.manifest import Manifest
from fleet.core.package.trust import parse_time
from fleet.home import FleetHome
from fleet.registry import Artifact, Device, Registry
from fleet.registry.faults import os_error_for
from fleet.registry.versions import claim_version, record_package

__all__ = ["BuiltPackage", "build", "prepared_cache_dir", "use_package"]


@dataclass(frozen=True)
class BuiltPackage:
    """A signed package on disk and its registry row."""

    name: str
    version: int
    kind: str
    path: Path
    package_sha256: str
    digest: str  #: sha256 of the plaintext payload (the manifest's)
    size: int  #: bytes of the package file
    artifact_id: uuid.UUID | None
    manifest: dict[str, Any]
    reused: bool = False


def prepared_cache_dir(home: FleetHome) -> Path:
    """Where converted payloads are kept (:mod:`fleet.artifacts.prepcache`)."""
    return home.path / "cache" / "prepared"


def _layout(payload: PreparedPayload) -> tuple[str, list[tuple[str, str]]]:
    """(payload digest as the manifest computes it, [(path, sha256)] per file)."""
    per = [(rel, sha256_file(p)) for rel, p in payload.files]
    if len(per) == 1:
        return per[0][1], per
    h = hashlib.sha256()
    for _, p in payload.files:
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest(), per


def _same_payload(art: Artifact, payload: PreparedPayload, files: list[tuple[str, str]],
                  signer: str) -> bool:
    m = art.manifest or {}
    got = [(f.get("path"), f.get("sha256")) for f in m.get("files") or []]
    return (got == files and art.kind == payload.kind and m.get("entry") == payload.entry
            and m.get("signer") == signer and m.get("base") == payload.base
            and Path(art.path).is_file())


def _rows(reg: Registry, name: str, digest: str) -> list[Artifact]:
    with reg.session() as s:
        return list(s.exec(select(Artifact).where(Artifact.name == name)
                           .where(Artifact.digest == digest)).all())


@contextmanager
def _cache_faults(where: Path) -> Iterator[None]:
    """A full or read-only package cache as the registry error it is (one clear line)."""
    try:
        yield
    except OSError as exc:
        mapped = os_error_for(exc, where)
        if mapped is None:
            raise
        raise mapped from exc


def _fresh(art: Artifact, margin: timedelta = timedelta(days=1)) -> bool:
    """Reusable only while devices accept it for a while yet (its signed ``expires``)."""
    exp = (art.manifest or {}).get("expires")
    return isinstance(exp, str) and parse_time(exp) > datetime.now(UTC) + margin


def build(home: FleetHome, reg: Registry, payload: PreparedPayload, devices: Sequence[Device],
          *, version: int | None = None, exact_recipients: bool = False,
          progress: Callable[[int], None] | None = None,
          say: Callable[[str], None] = lambda _m: None) -> BuiltPackage:
    """The package of ``payload`` for ``devices`` (reused or built; see module docstring).

    ``exact_recipients``: reuse only a package made for exactly these devices (``fleet
    package``); otherwise one made for a superset will do (``fleet deploy``). Raises
    KeyMaterialError for a device without a key, UsageError for a bad name/version,
    DuplicateError when ``version`` holds another digest, RegistryFullError /
    RegistryReadOnlyError when the package cache cannot be written."""
    require_enrolled(devices)
    signing_key = load_signing_key(home)
    signer = fingerprint_public_key(signing_key.public_key())
    digest, files = _layout(payload)
    same = [a for a in _rows(reg, payload.name, digest)
            if _same_payload(a, payload, files, signer)]
    ver = claim_version(reg, name=payload.name, kind=payload.kind, digest=digest,
                        version=version).version
    want = {d.fingerprint for d in devices}
    for art in sorted(same, key=lambda a: a.created_at, reverse=True):
        if art.version != ver or not _fresh(art):
            continue
        have = package_recipients(art.path, art.manifest or {})
        if have is not None and (have == want if exact_recipients else want <= have):
            say(f"reusing package {Path(art.path).name} ({payload.name}@{ver})")
            return BuiltPackage(art.name, art.version, art.kind, Path(art.path),
                                art.package_sha256, art.digest, art.size, art.id,
                                art.manifest, reused=True)
    say(f"packaging {payload.name}@{ver} ({len(payload.files)} file(s)) for "
        f"{len(devices)} device(s)")
    with _cache_faults(home.artifacts_dir):
        home.artifacts_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="fleet-pkg-", dir=home.artifacts_dir) as tmp:
            out = Path(tmp) / "out.fpkg"
            m = build_package(list(payload.files), out, name=payload.name, version=ver,
                              kind=payload.kind, recipients=recipients_of(devices),
                              signing_key=signing_key, entry=payload.entry,
                              mnn_facts=payload.facts, base=payload.base,
                              golden=payload.golden, progress=progress,
                              sequence=next_sequence(reg), expires_in=package_ttl())
            pkg_sha = sha256_file(out)
            final = home.artifacts_dir / f"{payload.name}-{ver}-{pkg_sha[:12]}.fpkg"
            move_package(out, final)
    manifest = m.to_dict()
    try:
        art, _ = record_package(reg, name=payload.name, kind=payload.kind, version=ver,
                                digest=m.sha256, package_sha256=pkg_sha,
                                size=final.stat().st_size, path=str(final),
                                manifest=manifest)
    except BaseException:
        remove_package(final)  # not recorded: no orphan file in the cache
        raise
    return BuiltPackage(payload.name, ver, payload.kind, final, pkg_sha, m.sha256,
                        final.stat().st_size, art.id, manifest)


def use_package(home: FleetHome, reg: Registry, source: Path, devices: Sequence[Device]
                ) -> BuiltPackage:
    """A ready ``.fpkg``: its recipients must include every device (NotRecipientError; a
    format-2 package's are in ``SOURCE.envelopes`` beside it, MissingEnvelopeError when that
    is gone), and its ``name@version`` must not hold another digest in the registry
    (DuplicateError)."""
    manifest: Manifest = read_manifest(sources.regular_file(source, "package"),
                                       trusted_keys(home))
    have = package_recipients(source, manifest.to_dict())
    if have is None:
        raise errors.MissingEnvelopeError(
            f"package {source.name} came without its key envelopes ({source.name}.envelopes "
            "beside it); copy both files, or package the model again", path=str(source))
    not_for = [d.name for d in devices if d.fingerprint not in have]
    if not_for:
        raise errors.NotRecipientError(
            f"package {source.name} was not made for: {', '.join(not_for)}; package the model "
            "again for these devices", devices=not_for)
    pkg_sha = sha256_file(source)
    art, _ = record_package(reg, name=manifest.name, kind=manifest.kind,
                            version=manifest.version, digest=manifest.sha256,
                            package_sha256=pkg_sha, size=source.stat().st_size,
                            path=str(source.resolve()), manifest=manifest.to_dict())
    return BuiltPackage(manifest.name, manifest.version, manifest.kind, source, pkg_sha,
                        manifest.sha256, source.stat().st_size, art.id, manifest.to_dict())
