"""What MNN's CPU backend itself says about this CPU: its load-time line, and fp16.

``import MNN`` prints one line to fd 1 from C++ (``fleet.core.mnn.fdcapture`` explains why
the agent captures it): ``The device supports: i8sdot:0, fp16:0, i8mm: 0, sve2: 0, sme2: 0``.
The flags are MNN's own CPU detection (``MNNGetCPUInfo``), the same facts its CPU backend
uses to choose kernels: with ``fp16:1`` and a build that has the ARM82 kernels
(``Arm82`` symbols in the library, :func:`fleet_agent.backends.build_cpu_kernels`),
``precision: low`` runs in fp16; otherwise it changes nothing (FIELD-NOTES 5, "Arm under
emulation": ``fp16:1`` under ``QEMU_CPU=max``, ``fp16:0`` under ``cortex-a53``).

The line is read from a child ``python -c "import MNN"``: this process may have imported
MNN already, and the line is printed once per process. The answer depends on the CPU, so
:func:`cpu_key` (machine and the kernel's ``AT_HWCAP``/``AT_HWCAP2``) keys its cache.
"""

from __future__ import annotations

import platform
import re
import struct
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

__all__ = ["BANNER_PREFIX", "cpu_fp16", "cpu_key", "mnn_cpu_runtime", "parse_banner"]

BANNER_PREFIX = "The device supports:"
_FLAG = re.compile(r"([a-z0-9_]+):\s*(\d+)")
_AT_HWCAP, _AT_HWCAP2 = 16, 26


def parse_banner(text: str) -> dict[str, Any]:
    """``{"banner": line | None, "fp16": bool | None, "i8sdot": ..., ...}`` from the
    captured output of ``import MNN``; flags missing from it are None."""
    line = next((ln.strip() for ln in text.splitlines() if BANNER_PREFIX in ln), None)
    flags = {k: v == "1" for k, v in _FLAG.findall(line.split(":", 1)[1])} if line else {}
    return {"banner": line, **{k: flags.get(k) for k in ("fp16", "i8sdot", "i8mm", "sve2",
                                                         "sme2")}}


def mnn_cpu_runtime(timeout_s: float = 120.0) -> dict[str, Any]:
    """Import MNN in a child and parse its line (``error`` set when the child failed)."""
    try:
        proc = subprocess.run([sys.executable, "-c", "import MNN"], capture_output=True,
                              text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {**parse_banner(""), "error": str(exc)}
    doc = parse_banner(proc.stdout + "\n" + proc.stderr)
    if proc.returncode != 0:
        doc["error"] = f"import MNN exited {proc.returncode}: {proc.stderr.strip()[-300:]}"
    return doc


def cpu_key() -> str:
    """``aarch64:hwcap:hwcap2`` (hex) from ``/proc/self/auxv`` (qemu-user answers it with
    the emulated CPU's bits); just the machine where auxv cannot be read."""
    machine = platform.machine()
    try:
        with open("/proc/self/auxv", "rb") as fh:
            raw = fh.read()
    except OSError:
        return machine
    size = struct.calcsize("@L")
    vals: dict[int, int] = {}
    for off in range(0, len(raw) - 2 * size + 1, 2 * size):
        key, val = struct.unpack_from("@LL", raw, off)
        if key == 0:
            break
        vals[key] = val
    return f"{machine}:{vals.get(_AT_HWCAP, 0):x}:{vals.get(_AT_HWCAP2, 0):x}"


def cpu_fp16(probe: Mapping[str, Any], build: Mapping[str, Any] | None
             ) -> tuple[bool | None, str]:
    """Whether ``precision: low`` computes in fp16 on this CPU with this MNN, and why.

    True needs all three: the probe's fp16 arithmetic (``asimdhp``), ARM82 kernels in the
    MNN library and MNN's own ``fp16:1``. False names the first missing one. None: the
    hardware has fp16 but there are no build facts to tell (the caller decides).
    """
    cpu = probe.get("cpu") or {}
    feats = cpu.get("features") or {}
    names = ({str(k).lower() for k, v in feats.items() if v} if isinstance(feats, Mapping)
             else {str(k).lower() for k in feats or []})
    arm = str(cpu.get("arch") or "").lower().startswith(("arm", "aarch64"))
    hw = cpu.get("fp16_arith") is True or (arm and bool(names & {"asimdhp", "fphp", "fp16"}))
    if not hw:
        return False, "the CPU has no fp16 arithmetic (Arm asimdhp / FEAT_FP16)"
    kernels = (build or {}).get("cpu_kernels") or {}
    runtime = (build or {}).get("cpu_runtime") or {}
    if kernels.get("arm82_fp16") is False:
        return False, ("the CPU has fp16 arithmetic but this MNN build has no ARM82 (fp16) "
                       "CPU kernels")
    if runtime.get("fp16") is False:
        return False, (f"MNN's own CPU detection says fp16:0 ({runtime.get('banner')}): "
                       "its CPU backend will not run fp16 here")
    if kernels.get("arm82_fp16") and runtime.get("fp16"):
        return True, (f"asimdhp in the probe, ARM82 kernels in this MNN build, and MNN "
                      f"says fp16:1 ({runtime.get('banner')})")
    return None, "the CPU has fp16 arithmetic; this MNN build's fp16 support is unknown"
