"""Controller side of LoRA delta packs: build a pack bound to its base, push it, swap the
adapter a device serves, roll back, and keep the registry's record of who serves what.

A pack is a package of kind ``lora`` holding ``lora.mnn`` (entry) and ``reference.json``
(the prompt ids and expected greedy tokens the adapter must reproduce on the device); its
manifest's ``base`` binds the digests of the base's ``llm.mnn`` and ``llm.mnn.weight`` and
the weight quantization (bits, block). It is signed and encrypted like a model package.
Device side: the agent's ``lora_packs`` and ``serve`` modules. Reference: ``docs/lora.md``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlmodel import col, select

from fleet.artifacts import read_manifest
from fleet.artifacts.envelopes import copy_package, envelope_for, package_recipients
from fleet.connect import device_session
from fleet.core import errors
from fleet.core.fsutil import sha256_file
from fleet.core.package.envelope import envelope_to_text
from fleet.home import FleetHome
from fleet.registry import Artifact, Device, Registry
from fleet.registry import history as hist
from fleet.rollout.deploy import Opener
from fleet.rollout.fanout import FleetResult, Remote, TaskContext, call_each
from fleet.worker.dispatch import dispatcher_for

__all__ = [
    "build_lora_pack",
    "find_artifact",
    "lora_fanout",
    "lora_state",
    "lora_task",
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


def build_lora_pack(home: FleetHome, reg: Registry, lora: Path, *, base: str,
                    reference: Path | None, out: Path, name: str | None = None,
                    version: int | None = None, targets: list[str] | None = None,
                    devices: list[Device] | None = None) -> dict[str, Any]:
    """Sign and encrypt ``lora`` as a pack bound to base package ``base`` (NAME@VERSION),
    through the one packaging path (:mod:`fleet.artifacts.prepare`, whose LoRA step
    checks the adapter's export settings against the base's, then
    :mod:`fleet.artifacts.publish`).

    Recipients: ``devices`` (the CLI's -g/-d/-l), else the devices named by ``targets``
    (groups or devices), else the base package's recipients that the registry knows.
    Without ``reference`` the pack is still built, and every device refuses it (no
    adapter serves unchecked)."""
    from fleet.artifacts import load_signing_key
    from fleet.artifacts.keys import public_pem
    from fleet.artifacts.prepare import PrepareOptions, prepare
    from fleet.artifacts.publish import build
    from fleet.artifacts.recipients import resolve_recipients
    from fleet.core.package.keyid import load_trusted_public_key

    if not lora.is_file():
        raise errors.ModelError(f"no LoRA file at {lora}", path=str(lora))
    base_name, base_ver = parse_ref(base)
    art = find_artifact(reg, base_name, base_ver, kind="model")
    pub = load_trusted_public_key(public_pem(load_signing_key(home).public_key()))
    base_m = read_manifest(art.path, pub)
    if devices is not None:
        from fleet.artifacts.recipients import require_enrolled

        require_enrolled(devices)
    elif targets:
        devices = resolve_recipients(reg, targets)
    else:
        fps = package_recipients(art.path, base_m.to_dict()) or set()
        devices = [d for d in reg.list_devices() if d.fingerprint in fps and d.public_key]
        if not devices:
            raise errors.UsageError("none of the base package's recipients is registered; "
                                    "name the targets (-g/-d/-l)")
    with tempfile.TemporaryDirectory(prefix="fleet-lora-") as tmp:
        payload = prepare(lora, PrepareOptions(work_dir=Path(tmp), name=name, kind="lora",
                                               reference=reference, base=base_m))
        built = build(home, reg, payload, devices, version=version, exact_recipients=True)
    if out.resolve() != built.path.resolve():
        copy_package(built.path, out)  # with its key envelope bundle, OUT.envelopes
    return {"path": str(out), "name": built.name, "version": built.version, "kind": "lora",
            "package_sha256": built.package_sha256, "base": payload.base,
            "mnn": payload.facts, "reference": payload.golden is not None,
            "recipients": [d.name for d in devices]}


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


def lora_task(home: FleetHome, reg: Registry, verb: str, args: dict[str, Any], *,
              pack: Path | None = None, pack_sha256: str | None = None,
              opener: Opener | None = None) -> Callable[[Device, TaskContext], dict[str, Any]]:
    """One device's LoRA verb (pushing ``pack`` first when given): its table row's fields
    (a farm worker runs the same task, kind ``lora``)."""
    pkg_sha = pack_sha256 or (sha256_file(pack) if pack is not None else None)
    sub = verb.removeprefix("lora ")

    def task(dev: Device, ctx: TaskContext) -> dict[str, Any]:
        with (opener(dev, ctx) if opener else device_session(home, dev, ctx)) as agent:
            call_args = dict(args)
            row: dict[str, Any] = {}
            if pack is not None and pkg_sha is not None:
                envelope = envelope_for(pack, dev.fingerprint, dev.name)  # before any push
                ctx.state("pushing")
                up = agent.upload(pack, pkg_sha, progress=ctx.bytes)
                call_args["path"] = up.remote
                if envelope is not None:
                    call_args["envelope"] = envelope_to_text(envelope)
                row["bytes_sent"] = up.transfer.bytes_sent
            ctx.state(verb)
            answer = agent.lora(sub, call_args, timeout=ctx.deadline.remaining(30))
            if sub == "add":
                row["staged"] = answer.get("staged")
            if sub == "list":
                row["list"] = {k: answer.get(k) for k in ("packs", "daemon")}
            if sub == "serve":
                row["started"] = answer.get("started")
                row["adapter"] = (answer.get("status") or {}).get("adapter")
            if sub == "generate":
                row["adapter"] = answer.get("adapter")
                row["outputs"] = answer.get("outputs")
            if sub in ("swap", "remove") or answer.get("swap"):
                row.update(_record(reg, dev, answer))
            return row

    return task


def lora_fanout(home: FleetHome, reg: Registry, devices: list[Device], verb: str,
                args: dict[str, Any], *, pack: Path | None = None, workers: int = 8,
                deadline_s: float = 600.0,
                on_state: Callable[[str, str], None] | None = None
                ) -> FleetResult[dict[str, Any]]:
    """Run agent verb ``verb`` (``"lora swap"``, ...) on every device, pushing ``pack``
    first when given; each device's result is its table row's fields (adapter, previous,
    swap_ms, staged, outputs, ...), failures are outcomes like any fan-out's. Devices
    behind a farm host run it on its worker (the pack through the artifact location)."""
    pkg_sha = sha256_file(pack) if pack is not None else None
    task = lora_task(home, reg, verb, args, pack=pack, pack_sha256=pkg_sha)
    disp = dispatcher_for(home, reg) if any(d.via for d in devices) else None
    remote = None
    if disp is not None:
        key = disp.publish(pack, pkg_sha) if pack is not None and pkg_sha else None
        remote = Remote("lora", {"verb": verb, "args": args, "pack": key,
                                 "pack_sha256": pkg_sha})
    return call_each(devices, task, workers=workers, deadline_s=deadline_s, retries=1,
                     on_state=on_state, remote=remote, dispatcher=disp)


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
