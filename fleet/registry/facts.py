"""A device's facts: what selectors (``-l hw.arch=arm64``) match, kept flat on its row.

``devices.facts`` is one JSON object whose keys are the selector keys themselves, so a
selector is one JSON lookup in SQL (:mod:`fleet.registry.selectors`), whatever the fleet
size. It is refreshed in the transaction that records what it comes from:

- ``hw.*``: the latest capability probe (``fleet.probe/1``, ``docs/probe.md``), from an
  activation report or ``fleet device probe`` (:func:`note_probe`); a new probe replaces
  every ``hw.*`` key. A device never probed has none, and matches no ``hw.*`` selector.
- ``model.NAME``: the version of model NAME active on the device, and ``disk.free_gb``:
  the free space of the agent's root, as the controller last heard them (the agent's
  ``status`` at each deploy, an activation, ``fleet rollback``).

Keys starting with ``_`` are detail for the planner (``fleet deploy --dry-run``), never
selector keys: ``_installed`` (per model: active, previous, versions, digest),
``_disk_free`` (bytes), ``_probed_at`` and ``_status_at`` (ISO 8601 UTC). Values are
never null: a fact that is unknown is absent.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from sqlmodel import Session

from fleet.core import errors
from fleet.registry.api import Registry
from fleet.registry.models import Device
from fleet.registry.types import utcnow

__all__ = ["HW_FACTS", "FactKind", "HwFact", "activation_change", "hw_facts",
           "note_activation", "note_probe", "note_rollback", "note_status", "probe_change",
           "record_rollback", "record_status", "set_facts", "status_change"]

FactKind = Literal["str", "bool", "num"]
Doc = Mapping[str, Any]


@dataclass(frozen=True)
class HwFact:
    """One ``hw.*`` key: its type, what it means, and how it is read from a probe."""

    kind: FactKind
    help: str
    read: Callable[[Doc], Any]


def _get(doc: Doc, *path: str) -> Any:
    cur: Any = doc
    for p in path:
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(p)
    return cur


def _feature(*names: str) -> Callable[[Doc], Any]:
    """True when the CPU has any of ``names``; False when the probe lists features but not
    these (each architecture has its own fixed keys: an x86 CPU has no ``sve``)."""
    def read(doc: Doc) -> Any:
        feats = _get(doc, "cpu", "features")
        if not isinstance(feats, Mapping):
            return None
        return any(bool(feats.get(n)) for n in names)
    return read


def _gpu(api: str) -> Callable[[Doc], Any]:
    def read(doc: Doc) -> Any:
        status = _get(doc, "gpu", api, "status")
        return None if status is None else status == "found"
    return read


def _gib(doc: Doc) -> Any:
    total = _get(doc, "memory", "total_bytes")
    return round(total / 2**30, 2) if isinstance(total, int | float) else None


def _npu(doc: Doc) -> Any:
    hints = doc.get("npu_hints")
    return bool(hints) if isinstance(hints, list) else None


#: every ``hw.*`` selector key (docs/selectors.md lists them; a test keeps the two equal)
HW_FACTS: dict[str, HwFact] = {
    "hw.arch": HwFact("str", "CPU architecture: x86_64, x86, arm64, arm, riscv64",
                      lambda d: _get(d, "cpu", "arch")),
    "hw.cpu.vendor": HwFact("str", "CPU vendor (GenuineIntel, AuthenticAMD, ARM, Qualcomm)",
                            lambda d: _get(d, "cpu", "vendor")),
    "hw.cores": HwFact("num", "logical CPUs", lambda d: _get(d, "cpu", "logical_cores")),
    "hw.fp16": HwFact("bool", "native fp16 arithmetic (Arm asimdhp, x86 avx512_fp16): what "
                      "precision low needs", lambda d: _get(d, "cpu", "fp16_arith")),
    "hw.dotprod": HwFact("bool", "int8 dot product (Arm asimddp, x86 VNNI)",
                         lambda d: _get(d, "cpu", "int8_dot")),
    "hw.i8mm": HwFact("bool", "Arm int8 matrix multiply (FEAT_I8MM)", _feature("i8mm")),
    "hw.bf16": HwFact("bool", "bf16 instructions (Arm bf16, x86 avx512_bf16)",
                      _feature("bf16", "avx512_bf16")),
    "hw.sve": HwFact("bool", "Arm SVE", _feature("sve")),
    "hw.sve2": HwFact("bool", "Arm SVE2", _feature("sve2")),
    "hw.sme": HwFact("bool", "Arm SME", _feature("sme")),
    "hw.neon": HwFact("bool", "Arm NEON (asimd)", _feature("asimd", "neon")),
    "hw.avx2": HwFact("bool", "x86 AVX2", _feature("avx2")),
    "hw.avx512": HwFact("bool", "x86 AVX-512F", _feature("avx512f")),
    "hw.ram_gb": HwFact("num", "memory in GiB (MemTotal: a little under the size on the box)",
                        _gib),
    "hw.os": HwFact("str", "linux, android, macos, ios", lambda d: _get(d, "os", "name")),
    "hw.model": HwFact("str", "device model (Android ro.product.model, DMI, device tree)",
                       lambda d: _get(d, "os", "device_model")),
    "hw.android.sdk": HwFact("num", "Android API level",
                             lambda d: _get(d, "os", "android", "sdk")),
    "hw.gpu.opencl": HwFact("bool", "an OpenCL device was found", _gpu("opencl")),
    "hw.gpu.vulkan": HwFact("bool", "a Vulkan device was found", _gpu("vulkan")),
    "hw.gpu.cuda": HwFact("bool", "a CUDA device was found", _gpu("cuda")),
    "hw.gpu.metal": HwFact("bool", "a Metal device was found", _gpu("metal")),
    "hw.npu": HwFact("bool", "an NPU runtime library is present (npu_hints)", _npu),
}

_TYPES: dict[FactKind, tuple[type, ...]] = {"str": (str,), "bool": (bool,),
                                            "num": (int, float)}


def hw_facts(probe: Doc) -> dict[str, Any]:
    """The ``hw.*`` facts of one probe document (unknown values left out; a value of the
    wrong type is left out too, so SQL casts never meet one)."""
    out: dict[str, Any] = {}
    for key, fact in HW_FACTS.items():
        value = fact.read(probe)
        if value is None or not isinstance(value, _TYPES[fact.kind]):
            continue
        if fact.kind == "num" and isinstance(value, bool):
            continue
        out[key] = value
    return out


def _now() -> str:
    return utcnow().isoformat(timespec="seconds")


def _device(s: Session, device_id: uuid.UUID) -> Device:
    dev = s.get(Device, device_id)
    if dev is None:
        raise errors.NotFoundError(f"no device {device_id}", kind="device", id=str(device_id))
    return dev


def set_facts(s: Session, device_id: uuid.UUID, change: Callable[[dict[str, Any]], None]
              ) -> dict[str, Any]:
    """Apply ``change`` to a copy of the device's facts and store it (in ``s``'s
    transaction). Returns the new facts."""
    dev = _device(s, device_id)
    facts = dict(dev.facts or {})
    change(facts)
    dev.facts = {k: v for k, v in facts.items() if v is not None}  # a new object: dirty
    s.add(dev)
    return dev.facts


def probe_change(probe: Doc) -> Callable[[dict[str, Any]], None]:
    """What :func:`note_probe` does to a copy of the facts (pure)."""
    def change(f: dict[str, Any]) -> None:
        for k in [k for k in f if k.startswith("hw.")]:
            del f[k]
        f.update(hw_facts(probe))
        f["_probed_at"] = _now()
    return change


def note_probe(s: Session, device_id: uuid.UUID, probe: Doc) -> None:
    """A new capability probe: every ``hw.*`` fact replaced by this probe's."""
    set_facts(s, device_id, probe_change(probe))


def _set_models(f: dict[str, Any], installed: Mapping[str, Any]) -> None:
    for k in [k for k in f if k.startswith("model.")]:
        del f[k]
    f["_installed"] = dict(installed)
    for name, row in installed.items():
        active = row.get("active") if isinstance(row, Mapping) else None
        if isinstance(active, int) and not isinstance(active, bool):
            f[f"model.{name}"] = active


def note_status(s: Session, device_id: uuid.UUID, status: Doc) -> None:
    """The agent's ``status`` answer: installed models (``model.NAME``) and free space."""
    set_facts(s, device_id, status_change(status))


def status_change(status: Doc) -> Callable[[dict[str, Any]], None]:
    """What :func:`note_status` does to a copy of the facts (pure)."""
    installed: dict[str, Any] = {}
    for name, row in (status.get("installed") or {}).items():
        if not isinstance(row, Mapping) or row.get("kind", "model") not in ("model", None):
            continue
        installed[str(name)] = {"active": row.get("active", row.get("version")),
                                "previous": row.get("previous"),
                                "versions": list(row.get("versions") or []),
                                "digest": row.get("digest")}
    free = (status.get("disk") or {}).get("free")

    def change(f: dict[str, Any]) -> None:
        _set_models(f, installed)
        if isinstance(free, int):
            f["_disk_free"] = free
            f["disk.free_gb"] = round(free / 2**30, 2)
        f["_status_at"] = _now()
    return change


def _switch(f: dict[str, Any], name: str, current: int | None, previous: int | None,
            digest: str | None = None) -> None:
    installed = {k: dict(v) for k, v in (f.get("_installed") or {}).items()}
    row = installed.setdefault(name, {"active": None, "previous": None, "versions": [],
                                      "digest": None})
    row["active"], row["previous"] = current, previous
    if current is not None and current not in row["versions"]:
        row["versions"] = sorted([*row["versions"], current])
    if digest is not None or current is None:
        row["digest"] = digest
    _set_models(f, installed)


def note_activation(s: Session, device_id: uuid.UUID, body: Doc) -> None:
    """An activation report: its probe (``hw.*``) and the model now active."""
    set_facts(s, device_id, activation_change(body))


def activation_change(body: Doc) -> Callable[[dict[str, Any]], None]:
    """What :func:`note_activation` does to a copy of the facts (pure)."""
    name, version = body.get("name"), body.get("version")
    probe = body.get("probe")
    prev = body.get("previous")

    def change(f: dict[str, Any]) -> None:
        if isinstance(probe, Mapping) and probe:
            probe_change(probe)(f)
        if not isinstance(name, str) or not isinstance(version, int):
            return
        old = (f.get("_installed") or {}).get(name) or {}
        previous = prev if isinstance(prev, int) else old.get("active")
        _switch(f, name, version, previous if previous != version else old.get("previous"),
                body.get("digest") if isinstance(body.get("digest"), str) else None)
    return change


def note_rollback(s: Session, device_id: uuid.UUID, name: str, current: int | None,
                  previous: int | None) -> None:
    """``fleet rollback`` switched ``name`` on the device to ``current``."""
    set_facts(s, device_id, lambda f: _switch(f, name, current, previous))


def record_status(reg: Registry, device_id: uuid.UUID, status: Doc) -> None:
    """:func:`note_status` in a transaction of its own."""
    with reg.session() as s:
        note_status(s, device_id, status)


def record_rollback(reg: Registry, device_id: uuid.UUID, name: str, current: int | None,
                    previous: int | None) -> None:
    """:func:`note_rollback` in a transaction of its own."""
    with reg.session() as s:
        note_rollback(s, device_id, name, current, previous)
