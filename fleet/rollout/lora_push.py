"""Controller side of LoRA delta packs: build a pack bound to its base, push it, swap the
adapter a device serves, roll back, and keep the registry's record of who serves what.

A pack is a package of kind ``lora`` holding ``lora.mnn`` (entry) and ``reference.json``
(the prompt ids and expected greedy tokens the adapter must reproduce on the device); its
manifest's ``base`` binds the digests of the base's ``llm.mnn`` and ``llm.mnn.weight`` and
the weight quantization (bits, block). It is signed and encrypted like a model package.
Device side: the agent's ``lora_packs`` and ``serve`` modules. Reference: ``docs/lora.md``.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlmodel import col, select

from fleet.artifacts import base_binding, build_package, read_manifest
from fleet.core import errors
from fleet.core.fsutil import sha256_file
from fleet.core.lora_reference import LORA_FILE, REFERENCE_FILE, Reference
from fleet.core.package import Recipient
from fleet.home import FleetHome
from fleet.registry import Artifact, Device, Registry
from fleet.registry import history as hist

__all__ = [
    "build_lora_pack",
    "find_artifact",
    "lora_fanout",
    "lora_state",
    "parse_ref",
]



def parse_ref(text: str) -> tuple[str, int | None]:
    """``NAME@VERSION`` (or ``NAME``: the newest version)."""
    name, sep, ver = text.partition("@")
    if not name or (sep and not ver.isdigit()):
        raise errors.UsageError(f"expected NAME@VERSION, got {text!r}")
    return name, int(ver) if sep else None


def find_artifact(reg: Registry, name: str, version: int | None, kind: str | None = None
                  ) -> Artifact:
    with reg.session() as s:
        stmt = select(Artifact).where(Artifact.name == name)
        if version is not None:
            stmt = stmt.where(Artifact.version == version)
        if kind is not None:
            stmt = stmt.where(Artifact.kind == kind)
        row = s.exec(stmt.order_by(col(Artifact.version).desc(),
                                   col(Artifact.created_at).desc())).first()
    if row is None:
        what = f"{name}@{version}" if version is not None else name
        raise errors.NotFoundError(f"no package {what} in the registry (fleet package it "
                                   "first)", name=name, version=version)
    return row


def _lora_facts(lora: Path) -> dict[str, Any]:
    from fleet.artifacts.mnninfo import inspect_weights

    info = inspect_weights(lora)
    bits, blocks = info.get("bits") or [], info.get("blocks") or []
    return {"format": "mnn-llm-lora", "lora_layers": info.get("float_layers", 0),
            "quant_bits": bits[0] if len(bits) == 1 else (bits or None),
            "quant_block": blocks[0] if len(blocks) == 1 else (blocks or None)}


def _check_export(binding: dict[str, Any], facts: dict[str, Any], ref: dict[str, Any]) -> None:
    """The adapter's own export settings must be the base's: a split LoRA carries the base
    graph with the base's quantization; a reference made for other settings is refused."""
    mism: dict[str, Any] = {}
    for key in ("quant_bits", "quant_block"):
        if binding.get(key) is not None and facts.get(key) is not None \
                and binding[key] != facts[key]:
            mism[key] = [binding[key], facts[key]]
    export = ref.get("export") or {}
    for key, ref_key in (("quant_bits", "quant_bit"), ("quant_block", "quant_block")):
        if binding.get(key) is not None and export.get(ref_key) is not None \
                and binding[key] != export[ref_key]:
            mism[f"reference.{ref_key}"] = [binding[key], export[ref_key]]
    if facts.get("lora_layers", 0) == 0:
        raise errors.InvalidModelError("the file holds no LoRA layers (is it a split LoRA "
                                       "export?)")
    if mism:
        raise errors.BaseMismatchError("the adapter was exported with other quantization "
                                       "settings than the base", mismatches=mism)


def build_lora_pack(home: FleetHome, reg: Registry, lora: Path, *, base: str,
                    reference: Path | None, out: Path, name: str | None = None,
                    version: int | None = None, targets: list[str] | None = None
                    ) -> dict[str, Any]:
    """Sign and encrypt ``lora`` as a pack bound to base package ``base`` (NAME@VERSION).

    Recipients: the devices named by ``targets`` (groups or devices), else the base
    package's recipients that the registry knows. Without ``reference`` the pack is still
    built, and every device refuses it (no adapter serves unchecked)."""
    from fleet.artifacts import load_signing_key
    from fleet.artifacts.keys import public_pem
    from fleet.core.package.keyid import load_trusted_public_key

    if not lora.is_file():
        raise errors.ModelError(f"no LoRA file at {lora}", path=str(lora))
    signing_key = load_signing_key(home)
    base_name, base_ver = parse_ref(base)
    art = find_artifact(reg, base_name, base_ver, kind="model")
    pub = load_trusted_public_key(public_pem(signing_key.public_key()))
    base_m = read_manifest(art.path, pub)
    binding = base_binding(base_m)
    if not binding.get("llm_weight_sha256"):
        raise errors.InvalidModelError(f"base {base_m.name} v{base_m.version} has no "
                                       "llm.mnn.weight: not an MNN-LLM export")
    facts = _lora_facts(lora)
    ref_doc: dict[str, Any] = {}
    if reference is not None:
        raw = json.loads(reference.read_text())
        ref_doc = Reference.from_dict(raw).to_dict()
    _check_export(binding, facts, ref_doc)
    if targets:
        from fleet.cli.cmd_package import resolve_recipients

        devices = resolve_recipients(reg, targets)
    else:
        fps = set(base_m.recipients)
        devices = [d for d in reg.list_devices() if d.fingerprint in fps and d.public_key]
        if not devices:
            raise errors.UsageError("none of the base package's recipients is registered; "
                                    "pass --for")
    name = name or lora.stem
    ver = version if version is not None else hist.next_version(reg, name)
    recipients = [Recipient.from_pem(d.public_key or "", name=d.name,
                                     fingerprint=d.fingerprint) for d in devices]
    with tempfile.TemporaryDirectory(prefix="fleet-lora-") as tmp:
        files: list[tuple[str, Path]] = [(LORA_FILE, lora)]
        golden = None
        if ref_doc:
            rp = Path(tmp) / REFERENCE_FILE
            rp.write_text(json.dumps(ref_doc, sort_keys=True))
            files.append((REFERENCE_FILE, rp))
            golden = REFERENCE_FILE
        m = build_package(files, out, name=name, version=ver, kind="lora",
                          recipients=recipients, signing_key=signing_key, entry=LORA_FILE,
                          mnn_facts=facts, base=binding, golden=golden)
    pkg_sha = sha256_file(out)
    hist.record_artifact(reg, name=name, kind="lora", version=ver, digest=m.sha256,
                         package_sha256=pkg_sha, size=out.stat().st_size,
                         path=str(out.resolve()), manifest=m.to_dict())
    return {"path": str(out), "name": name, "version": ver, "kind": "lora",
            "package_sha256": pkg_sha, "base": binding, "mnn": facts,
            "reference": bool(ref_doc), "recipients": [d.name for d in devices]}


def _record(reg: Registry, dev: Device, answer: dict[str, Any]) -> dict[str, Any]:
    """Registry bookkeeping after a device answered a swap: who serves what, and a report."""
    swap = answer.get("swap", answer)
    label = swap.get("adapter")
    base = (swap.get("base") or {}).get("name") or "?"
    if isinstance(label, str):
        name, _, ver = label.partition("@")
        if label == "base":
            hist.set_lora_state(reg, dev, base, None, None)
        else:
            hist.set_lora_state(reg, dev, base, name, int(ver) if ver.isdigit() else None)
    hist.add_report(reg, dev, "lora", {"name": base, "lora": swap})
    return {"adapter": label, "previous": swap.get("previous"), "swap_ms": swap.get("swap_ms"),
            "base": base}


def lora_fanout(home: FleetHome, reg: Registry, devices: list[Device], verb: str,
                args: dict[str, Any], *, pack: Path | None = None, workers: int = 8,
                deadline_s: float = 600.0,
                on_state: Callable[[str, str], None] | None = None) -> list[dict[str, Any]]:
    """Run agent verb ``verb`` on every device (pushing ``pack`` first when given);
    one result row per device, failures included."""
    from fleet.connect import open_device
    from fleet.rollout.execute import FanOut, TaskContext

    pkg_sha = sha256_file(pack) if pack is not None else None

    def task(dev: Device, ctx: TaskContext) -> dict[str, Any]:
        transport, agent = open_device(home, dev)
        ctx.add_closer(transport.close)
        with transport:
            call_args = dict(args)
            row: dict[str, Any] = {"device": dev.name, "status": "ok"}
            if pack is not None:
                remote = f"{agent.root.rstrip('/')}/incoming/{pkg_sha}.fpkg"
                ctx.state("pushing")
                tr = transport.push(pack, remote, resume=True, progress=ctx.bytes)
                if tr.sha256 != pkg_sha:
                    raise errors.RemoteFileError(f"{dev.name}: pushed file digest differs",
                                                 device=dev.name)
                call_args["path"] = remote
                row["bytes_sent"] = tr.bytes_sent
            ctx.state(verb)
            answer = agent.call(verb, call_args, timeout=ctx.deadline.remaining(30))
            if verb == "lora add":
                row["staged"] = answer.get("staged")
            if verb == "lora list":
                row["list"] = {k: answer.get(k) for k in ("packs", "daemon")}
            if verb == "lora serve":
                row["started"] = answer.get("started")
                row["adapter"] = (answer.get("status") or {}).get("adapter")
            if verb == "lora generate":
                row["adapter"] = answer.get("adapter")
                row["outputs"] = answer.get("outputs")
            if verb in ("lora swap", "lora remove") or answer.get("swap"):
                row.update(_record(reg, dev, answer))
            return row

    fan = FanOut(workers=workers, deadline_s=deadline_s, retries=1, on_state=on_state)
    outcomes = fan.run({d.name: d for d in devices}, task)
    rows = []
    for d in devices:
        out = outcomes[d.name]
        if out.ok and out.result is not None:
            rows.append(out.result)
        else:
            e = out.error or errors.FleetError("unknown failure")
            rows.append({"device": d.name, "status": "failed", "error": e.to_dict()})
    return rows


def lora_state(reg: Registry, device: Device) -> dict[str, Any]:
    """What ``device`` serves, per base model, as the registry last heard it (for audit)."""
    out: dict[str, Any] = {}
    for row in hist.lora_states(reg, device):
        out[row.base_name] = {
            "adapter": (f"{row.adapter_name}@{row.adapter_version}" if row.adapter_name
                        else None),
            "adapter_name": row.adapter_name, "adapter_version": row.adapter_version,
            "previous": row.previous, "updated_at": row.updated_at.isoformat()
            if row.updated_at else None}
    return out
