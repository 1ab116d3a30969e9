"""Turn what the operator gave ``fleet deploy`` into a package for the target devices.

Accepts an ``.mnn`` (validated by loading it with MNN), an ONNX or TFLite model (converted
with MNN's converter, checked, optionally as a ``--variant``), or a ready ``.fpkg`` whose
recipients must include every target. Golden reference data (inputs and expected outputs
of the ORIGINAL model on CPU fp32) travel in the package, so the device checks the variant
it actually runs.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlmodel import select

from fleet.artifacts import build_package, load_signing_key, read_manifest
from fleet.core import errors
from fleet.core.fsutil import sha256_file
from fleet.core.package import Recipient
from fleet.home import FleetHome
from fleet.registry import Artifact, Device, Registry
from fleet.registry import history as hist
from fleet.rollout.deploy import DeployJob

__all__ = ["default_name", "prepare_job"]

_NAME_RE = re.compile(r"[^A-Za-z0-9._-]+")


def default_name(source: Path) -> str:
    return _NAME_RE.sub("-", source.stem).strip("-") or "model"


def _model_facts(path: Path) -> dict[str, Any]:
    """Validate an ``.mnn`` by loading it; return the facts the manifest records."""
    from fleet.artifacts.mnninfo import inspect_model

    facts: dict[str, Any] = inspect_model(path)
    return facts


def _reuse(reg: Registry, name: str, digest: str, devices: list[Device]) -> Artifact | None:
    """A package of this exact payload that already names every target as recipient."""
    with reg.session() as s:
        rows = s.exec(select(Artifact).where(Artifact.name == name)
                      .where(Artifact.digest == digest)).all()
    want = {d.fingerprint for d in devices}
    for art in sorted(rows, key=lambda a: a.created_at, reverse=True):
        if want <= set((art.manifest.get("recipients") or {}).keys()) and Path(art.path).exists():
            return art
    return None


def _version_for(reg: Registry, name: str, digest: str, requested: int | None) -> int:
    if requested is not None:
        return requested
    with reg.session() as s:
        same = s.exec(select(Artifact.version).where(Artifact.name == name)
                      .where(Artifact.digest == digest)).all()
    if same:
        return max(same)  # the same payload again is the same version (nothing to send)
    return hist.next_version(reg, name)


def _payload_digest(files: list[tuple[str, Path]]) -> str:
    if len(files) == 1:
        return sha256_file(files[0][1])
    h = hashlib.sha256()
    for _, p in files:
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def prepare_job(home: FleetHome, reg: Registry, source: Path, devices: list[Device], *,
                name: str | None = None, version: int | None = None,
                variant: str | None = None, golden: Path | None = None,
                progress: Callable[[str], None] | None = None,
                bench: dict[str, Any] | None = None, activate: bool = True) -> DeployJob:
    say = progress or (lambda _m: None)
    if not source.exists():
        raise errors.ModelError(f"no model file at {source}", path=str(source))
    missing = [d.name for d in devices if not d.public_key or not d.fingerprint]
    if missing:
        raise errors.KeyMaterialError(f"not enrolled: {', '.join(missing)}", devices=missing)
    if source.suffix.lower() == ".fpkg":
        return _job_from_package(home, reg, source, devices, bench or {}, activate)
    name = name or default_name(source)
    with tempfile.TemporaryDirectory(prefix="fleet-pkg-") as tmp:
        tmpdir = Path(tmp)
        suffix = source.suffix.lower()
        golden_bytes: bytes | None = None
        if source.is_dir():
            return _llm_job(home, reg, source, devices, name=name, version=version,
                            reference=golden, say=say, bench=bench or {}, activate=activate)
        if suffix in (".onnx", ".tflite"):
            from fleet.artifacts.convert import convert_model
            from fleet.artifacts.reference import make_golden
            model = tmpdir / f"{name}.mnn"
            say(f"converting {source.name} ({variant or 'fp32'})")
            convert_model(source, model, variant=variant)
            say("golden reference from the original model")
            golden_bytes = make_golden(source)
        elif suffix == ".mnn":
            if variant:
                raise errors.UsageError("--variant needs the original ONNX/TFLite model, not "
                                        "an .mnn", variant=variant)
            model = source
        else:
            raise errors.InvalidModelError(
                f"{source.name}: expected .mnn, .onnx, .tflite or .fpkg", path=str(source))
        facts = _model_facts(model)
        sibling = source.with_name(source.stem + ".golden.npz")
        if golden is not None:
            golden_bytes = golden.read_bytes()
        elif golden_bytes is None and sibling.is_file():
            say(f"using golden reference {sibling.name}")
            golden_bytes = sibling.read_bytes()
        files: list[tuple[str, Path]] = [(f"{name}.mnn", model)]
        if golden_bytes is not None:
            gpath = tmpdir / "golden.npz"
            gpath.write_bytes(golden_bytes)
            files.append(("golden.npz", gpath))
        return _build_or_reuse(home, reg, files, devices, name=name, version=version,
                               entry=f"{name}.mnn", facts=facts,
                               golden="golden.npz" if golden_bytes is not None else None,
                               say=say, bench=bench or {}, activate=activate)


def _build_or_reuse(home: FleetHome, reg: Registry, files: list[tuple[str, Path]],
                    devices: list[Device], *, name: str, version: int | None, entry: str,
                    facts: dict[str, Any], golden: str | None, say: Callable[[str], None],
                    bench: dict[str, Any], activate: bool) -> DeployJob:
    """Reuse a package of this exact payload made for these devices, or build, sign, store
    and record a new one."""
    digest = _payload_digest(files)
    ver = _version_for(reg, name, digest, version)
    art = _reuse(reg, name, digest, devices)
    if art is not None and art.version == ver:
        say(f"reusing package {Path(art.path).name}")
        return DeployJob(name, ver, art.kind, Path(art.path), art.package_sha256, art.digest,
                         art.size, art.id, bench, activate)
    recipients = [Recipient.from_pem(d.public_key or "", name=d.name, fingerprint=d.fingerprint)
                  for d in devices]
    home.artifacts_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fleet-pkg-") as tmp:
        out = Path(tmp) / "out.fpkg"
        say(f"packaging {name}@{ver} ({len(files)} file(s)) for {len(recipients)} devices")
        manifest = build_package(files, out, name=name, version=ver, kind="model",
                                 recipients=recipients, signing_key=load_signing_key(home),
                                 entry=entry, mnn_facts=facts, golden=golden)
        pkg_sha = sha256_file(out)
        final = home.artifacts_dir / f"{name}-{ver}-{pkg_sha[:12]}.fpkg"
        shutil.move(str(out), final)
    art = hist.record_artifact(reg, name=name, kind="model", version=ver,
                               digest=manifest.sha256, package_sha256=pkg_sha,
                               size=final.stat().st_size, path=str(final),
                               manifest=manifest.to_dict())
    return DeployJob(name, ver, "model", final, pkg_sha, manifest.sha256, final.stat().st_size,
                     art.id, bench, activate)


def _job_from_package(home: FleetHome, reg: Registry, source: Path, devices: list[Device],
                      bench: dict[str, Any], activate: bool) -> DeployJob:
    from fleet.connect import controller_public_pem
    from fleet.core.package import load_trusted_public_key

    pub = controller_public_pem(home)
    manifest = read_manifest(source, load_trusted_public_key(pub) if pub else None)
    not_for = [d.name for d in devices if d.fingerprint not in manifest.recipients]
    if not_for:
        raise errors.NotRecipientError(
            f"package {source.name} was not made for: {', '.join(not_for)}; package the model "
            "again for these devices", devices=not_for)
    pkg_sha = sha256_file(source)
    art = hist.record_artifact(reg, name=manifest.name, kind=manifest.kind,
                               version=manifest.version, digest=manifest.sha256,
                               package_sha256=pkg_sha, size=source.stat().st_size,
                               path=str(source.resolve()), manifest=manifest.to_dict())
    return DeployJob(manifest.name, manifest.version, manifest.kind, source, pkg_sha,
                     manifest.sha256, source.stat().st_size, art.id, bench, activate)


def _llm_job(home: FleetHome, reg: Registry, folder: Path, devices: list[Device], *,
             name: str, version: int | None, reference: Path | None,
             say: Callable[[str], None], bench: dict[str, Any], activate: bool) -> DeployJob:
    """An MNN-LLM export folder: every file in it, plus its reference outputs (prompt ids and
    the expected greedy tokens, ``<folder>.ref.json`` beside it unless given)."""
    from fleet.artifacts.mnninfo import inspect_llm_folder

    facts = inspect_llm_folder(folder)
    files = [(p.relative_to(folder).as_posix(), p)
             for p in sorted(folder.rglob("*")) if p.is_file()]
    if any("/" in rel for rel, _ in files):
        raise errors.InvalidModelError(f"{folder}: nested folders are not supported in an "
                                       "MNN-LLM package", path=str(folder))
    ref = reference or folder.with_name(folder.name + ".ref.json")
    golden_name = None
    if ref.is_file():
        say(f"using reference outputs {ref.name}")
        files.append(("reference.json", ref))
        golden_name = "reference.json"
    return _build_or_reuse(home, reg, files, devices, name=name, version=version,
                           entry="llm.mnn", facts=facts, golden=golden_name, say=say,
                           bench=bench, activate=activate)
