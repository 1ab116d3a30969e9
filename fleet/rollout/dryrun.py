"""``--dry-run``: everything a deploy, rollback or LoRA push checks, and nothing it writes.

The model goes through the real packaging path's first step (:mod:`fleet.artifacts.prepare`:
conversion, the conversion check, golden data) in a temporary folder without the prepared
cache; the version is the one the registry *would* allocate, read without claiming it
(the rules of :mod:`fleet.registry.versions`); the package is not built, so its size is
the ready package's (a ``.fpkg``, or a package of this payload the registry already has)
or an estimate from the payload (``size_estimated``). The registry is only read (plain
``BEGIN`` on SQLite: no write lock, no write-ahead log entries), no device is contacted,
and the per-device decisions are the pure ones of :mod:`fleet.rollout.plan`, from what
each device last reported.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlmodel import col, select

from fleet.core import errors
from fleet.core.fsutil import sha256_file
from fleet.core.package.limits import DEFAULT_CHUNK_SIZE
from fleet.home import FleetHome
from fleet.registry import Artifact, Device, Registry
from fleet.registry.models import ArtifactVersion
from fleet.rollout.plan import Plan, plan_deploy, plan_lora_push, plan_rollback

__all__ = ["DeployRequest", "peek_version", "preview_deploy", "preview_lora_push",
           "preview_rollback"]

#: bytes a package adds to its payload besides the per-chunk tags (header, signed
#: manifest, file table): an upper bound for the estimate
_OVERHEAD = 8192
_PER_RECIPIENT = 512
_TAG = 16


@dataclass(frozen=True)
class DeployRequest:
    """What ``fleet deploy`` was asked (the options that shape the package)."""

    model: Path
    name: str | None = None
    version: int | None = None
    variant: str | None = None
    golden: Path | None = None
    entry: str | None = None
    input_shape: tuple[str, ...] = ()
    inputs: Path | None = None
    activate: bool = True
    waves: str | None = None


def payload_digest(files: Sequence[tuple[str, Path]]) -> str:
    """The payload digest as the manifest computes it: one file's sha256, or the sha256
    of the files' bytes in payload order."""
    if len(files) == 1:
        return sha256_file(files[0][1])
    h = hashlib.sha256()
    for _, p in files:
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def peek_version(reg: Registry, *, name: str, kind: str, digest: str,
                 version: int | None) -> tuple[int, bool]:
    """(the version a build of ``digest`` would get, whether it exists already), read
    only. Raises what a real claim raises: UsageError (version < 1), DuplicateError
    (``name@version`` holds another digest or kind)."""
    with reg.reading() as s:
        rows = list(s.exec(select(ArtifactVersion).where(col(ArtifactVersion.name) == name)))
    if version is not None and version < 1:
        raise errors.UsageError(f"version {version} of {name}: versions start at 1",
                                name=name, version=version)
    hit = ([r for r in rows if r.version == version] if version is not None else
           sorted((r for r in rows if r.digest == digest), key=lambda r: r.version)[-1:])
    for r in hit:
        if r.digest != digest:
            raise errors.DuplicateError(
                f"{name}@{r.version} exists with another digest ({r.digest[:12]}, this build "
                f"is {digest[:12]}): give another --version, or leave --version out to get "
                "the next one", name=name, version=r.version)
        if r.kind != kind:
            raise errors.DuplicateError(f"{name}@{r.version} exists as a {r.kind}, not a "
                                        f"{kind}: choose another name", name=name)
        return r.version, True
    if version is not None:
        return version, False
    return max((r.version for r in rows), default=0) + 1, False


def _known_size(reg: Registry, name: str, version: int, digest: str) -> int | None:
    """The size of a package of this payload the registry already has (the real run
    reuses one made for the same devices), else None."""
    with reg.reading() as s:
        rows = list(s.exec(select(Artifact).where(col(Artifact.name) == name)
                           .where(col(Artifact.version) == version)
                           .where(col(Artifact.digest) == digest)
                           .order_by(col(Artifact.created_at).desc())))
    return next((r.size for r in rows if Path(r.path).is_file()), None)


def estimate_size(payload_bytes: int, recipients: int) -> int:
    """An upper estimate of a package's bytes: payload, one tag per chunk, header."""
    chunks = max(1, math.ceil(payload_bytes / DEFAULT_CHUNK_SIZE))
    return payload_bytes + chunks * _TAG + _OVERHEAD + recipients * _PER_RECIPIENT


def _ready_package(home: FleetHome, path: Path) -> tuple[Any, set[str] | None]:
    from fleet.artifacts import read_manifest, sources
    from fleet.artifacts.envelopes import package_recipients
    from fleet.artifacts.trust import trusted_keys

    manifest = read_manifest(sources.regular_file(path, "package"), trusted_keys(home))
    return manifest, package_recipients(path, manifest.to_dict())


def preview_deploy(home: FleetHome, reg: Registry, req: DeployRequest,
                   devices: Sequence[Device], *, say: Callable[[str], None] = lambda _m: None
                   ) -> Plan:
    """The plan of ``fleet deploy`` for ``devices`` (see the module docstring). Raises what
    the real run raises before it touches a device: ModelError, ConversionError,
    UsageError, DuplicateError, NotRecipientError is a per-device refusal instead."""
    model = req.model
    if model.suffix.lower() == ".fpkg" and not model.is_dir():
        manifest, recipients = _ready_package(home, model)
        version, exists = peek_version(reg, name=manifest.name, kind=manifest.kind,
                                       digest=manifest.sha256, version=manifest.version)
        plan = plan_deploy(devices, name=manifest.name, version=version,
                           digest=manifest.sha256, size=model.stat().st_size,
                           activate=req.activate, waves=req.waves,
                           recipients=recipients if recipients is not None else set())
        plan.kind = manifest.kind
        plan.extra["package"] = {"source": str(model), "digest": manifest.sha256,
                                 "size": model.stat().st_size, "size_estimated": False,
                                 "version_exists": exists, "ready": True}
        return plan
    from fleet.artifacts.inputs import parse_input_shapes
    from fleet.artifacts.prepare import PrepareOptions, prepare

    with tempfile.TemporaryDirectory(prefix="fleet-dryrun-") as tmp:
        payload = prepare(model, PrepareOptions(
            work_dir=Path(tmp), name=req.name, variant=req.variant, golden=req.golden,
            entry=req.entry, input_shapes=parse_input_shapes(list(req.input_shape)) or None,
            inputs=req.inputs, cache_dir=None, say=say))
        digest = payload_digest(payload.files)
        version, exists = peek_version(reg, name=payload.name, kind=payload.kind,
                                       digest=digest, version=req.version)
        known = _known_size(reg, payload.name, version, digest) if exists else None
        size = known if known is not None else estimate_size(payload.size, len(devices))
        plan = plan_deploy(devices, name=payload.name, version=version, digest=digest,
                           size=size, activate=req.activate, waves=req.waves)
        plan.kind = payload.kind
        plan.extra["package"] = {"source": str(model), "digest": digest, "size": size,
                                 "size_estimated": known is None, "version_exists": exists,
                                 "payload_bytes": payload.size, "variant": payload.variant,
                                 "files": [rel for rel, _ in payload.files],
                                 "golden": payload.golden, "ready": False}
    return plan


def preview_rollback(home: FleetHome, reg: Registry, name: str, devices: Sequence[Device],
                     *, to: int | None) -> Plan:
    """The plan of ``fleet rollback NAME [--to V]``; with ``--to`` the signing key must
    load (the real run signs an order with it). Raises KeyMaterialError."""
    if to is not None:
        from fleet.artifacts import load_signing_key

        load_signing_key(home)
    return plan_rollback(devices, name=name, to=to)


def preview_lora_push(home: FleetHome, pack: Path, devices: Sequence[Device]) -> Plan:
    """The plan of ``fleet lora push PACK``: the pack's signature checked, its recipients
    and base binding compared with what each device last reported."""
    manifest, recipients = _ready_package(home, pack)
    if manifest.kind != "lora":
        raise errors.UsageError(f"{pack.name} is a {manifest.kind} package, not a LoRA pack "
                                "(fleet deploy sends models)", path=str(pack))
    base = manifest.base or {}
    binding = (str(base["name"]), base.get("version")) if base.get("name") else None
    size = pack.stat().st_size
    plan = plan_lora_push(devices, name=manifest.name, version=manifest.version, size=size,
                          base=binding, recipients=recipients or set())
    plan.extra["package"] = {"source": str(pack), "digest": manifest.sha256, "size": size,
                             "size_estimated": False, "base": base}
    return plan
