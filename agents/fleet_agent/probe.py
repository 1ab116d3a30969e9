"""The capability probe as the agent uses it (document: ``docs/probe.md``, ``fleet.probe/1``).

The probe itself is native (``runtime/``): the same C++ core answers in-process through
``fleet_agent._native`` and out-of-process through the ``fleet-probe`` executable, and the
two print the same document. Each GPU API is probed in a forked child by default, so a
driver that crashes or hangs shows up as ``{"status": "failed"}`` instead of killing the
agent.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fleet.core import errors
from fleet_agent.context import AgentContext

__all__ = [
    "PROBE_SCHEMA",
    "VOLATILE_FIELDS",
    "emulated",
    "mnn_backend_hints",
    "probe",
    "probe_executable",
    "probe_verb",
    "probe_via_executable",
    "stable_view",
]

PROBE_SCHEMA = "fleet.probe/1"

#: Fields that change from one probe to the next on the same machine (dotted paths).
#: Compare documents with :func:`stable_view`, which drops them.
VOLATILE_FIELDS: tuple[str, ...] = ("elapsed_ms", "memory.available_bytes")

_EXE_NAME = "fleet-probe"
_FOUND = "found"


def _parse(text: str, source: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise errors.DeviceError(f"{source} printed no JSON document", source=source) from e
    schema = doc.get("schema") if isinstance(doc, dict) else None
    if not isinstance(doc, dict) or schema != PROBE_SCHEMA:
        raise errors.DeviceError(f"{source} printed an unknown document (schema {schema!r})",
                                 source=source, schema=schema)
    return doc


def probe(*, isolate: bool = True, timeout_s: float = 10.0) -> dict[str, Any]:
    """The probe document, from the native module (or ``fleet-probe`` where it is missing).

    ``timeout_s`` bounds each isolated GPU API probe; ``isolate=False`` probes the drivers
    in this process (faster, but a broken driver can then crash it).
    """
    if timeout_s <= 0:
        raise errors.UsageError("timeout_s must be positive", timeout_s=timeout_s)
    timeout_ms = max(1, int(timeout_s * 1000))
    try:
        from fleet_agent import native
    except ImportError:
        # A pure-Python install of the agent (no compiled module): the executable may
        # still be there, installed beside it or on PATH.
        return probe_via_executable(isolate=isolate, timeout_s=timeout_s + 30.0)
    try:
        text = native.probe_json(isolate=isolate, timeout_ms=timeout_ms, indent=-1)
    except native.ProbeError as e:
        raise errors.DeviceError(f"capability probe failed: {e}", stage="probe") from e
    return _parse(text, "fleet_agent._native")


def probe_executable() -> Path | None:
    """Where ``fleet-probe`` is: ``$FLEET_PROBE``, the package's ``bin/``, or ``PATH``.

    With the editable install the executable lands in site-packages
    (``fleet_agent/bin/fleet-probe``) while the Python sources stay in the repository, so
    every ``sys.path`` entry is searched, not only this file's folder.
    """
    explicit = os.environ.get("FLEET_PROBE")
    candidates: list[Path] = [Path(explicit)] if explicit else []
    candidates.append(Path(__file__).resolve().parent / "bin" / _EXE_NAME)
    for entry in sys.path:
        if entry:
            candidates.append(Path(entry) / "fleet_agent" / "bin" / _EXE_NAME)
    on_path = shutil.which(_EXE_NAME)
    if on_path:
        candidates.append(Path(on_path))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


def probe_via_executable(exe: Path | None = None, *, isolate: bool = True,
                         timeout_s: float = 40.0,
                         env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run ``fleet-probe`` and parse its document: what an agent without Python does."""
    path = exe or probe_executable()
    if path is None:
        raise errors.DeviceError("fleet-probe executable not found (no native runtime)",
                                 stage="probe")
    argv = [str(path), "--compact"]
    if not isolate:
        argv.append("--no-isolate")
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s,
                              env=dict(env) if env is not None else None, check=False)
    except subprocess.TimeoutExpired as e:
        raise errors.DeviceError(f"fleet-probe ran past {timeout_s} s", stage="probe",
                                 exe=str(path)) from e
    except OSError as e:
        raise errors.DeviceError(f"cannot run fleet-probe: {e}", stage="probe",
                                 exe=str(path)) from e
    if proc.returncode != 0:
        raise errors.DeviceError(f"fleet-probe exited with status {proc.returncode}",
                                 stage="probe", exe=str(path), stderr=proc.stderr[-2000:])
    return _parse(proc.stdout, str(path))


def stable_view(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``doc`` without :data:`VOLATILE_FIELDS`: equal on the same machine."""
    out: dict[str, Any] = copy.deepcopy(dict(doc))
    for dotted in VOLATILE_FIELDS:
        *parents, leaf = dotted.split(".")
        node: Any = out
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def _devices(doc: Mapping[str, Any], api: str) -> list[Mapping[str, Any]]:
    section = (doc.get("gpu") or {}).get(api) or {}
    if section.get("status") != _FOUND:
        return []
    found = list(section.get("devices") or [])
    for platform in section.get("platforms") or []:
        found.extend(platform.get("devices") or [])
    return found


def mnn_backend_hints(doc: Mapping[str, Any]) -> list[str]:
    """MNN forward types the *hardware* could run (not what this MNN build has).

    ``CPU`` always; ``OPENCL``/``VULKAN``/``CUDA``/``METAL`` when the probe found that API
    with at least one device (software devices such as PoCL and lavapipe count: MNN can
    run on them); ``NN`` (NNAPI) on Android when ``libneuralnetworks.so`` is present.
    """
    hints = ["CPU"]
    for api, name in (("opencl", "OPENCL"), ("vulkan", "VULKAN"), ("cuda", "CUDA"),
                      ("metal", "METAL")):
        if _devices(doc, api):
            hints.append(name)
    is_android = (doc.get("os") or {}).get("name") == "android"
    if is_android and any(h.get("name") == "nnapi" for h in doc.get("npu_hints") or []):
        hints.append("NN")
    return hints


def emulated(doc: Mapping[str, Any]) -> str | None:
    """``"qemu"`` (or ``"rosetta"``, ``"unknown"``) when the probe found the CPU emulated,
    else None: timings measured there say nothing about real hardware."""
    value = (doc.get("cpu") or {}).get("emulated")
    return str(value) if value else None


def probe_verb(ctx: AgentContext, args: dict[str, Any]) -> dict[str, Any]:
    """Agent verb ``probe``: ``{"probe": <document>, "mnn_backend_hints": [...]}``.

    Arguments: ``isolate`` (default true), ``timeout_s`` (per GPU API, default 10),
    ``via``: ``"module"`` (default) or ``"executable"``.
    """
    isolate = bool(args.get("isolate", True))
    timeout_s = float(args.get("timeout_s", 10.0))
    via = str(args.get("via", "module"))
    if via == "module":
        doc = probe(isolate=isolate, timeout_s=timeout_s)
    elif via == "executable":
        if timeout_s <= 0:
            raise errors.UsageError("timeout_s must be positive", timeout_s=timeout_s)
        doc = probe_via_executable(isolate=isolate, timeout_s=timeout_s + 30.0)
    else:
        raise errors.UsageError(f"via must be 'module' or 'executable', not {via!r}", via=via)
    return {"probe": doc, "mnn_backend_hints": mnn_backend_hints(doc)}
