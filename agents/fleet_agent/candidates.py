"""Which runtime configurations are worth measuring on this device, and why not the others.

A candidate must be *usable on this hardware* (the probe found the GPU API and a device)
*and present in this MNN build* (:mod:`fleet_agent.backends`). Variants are kept to the
ones that can change something (FIELD-NOTES 5):
- ``precision: low`` only where fp16 arithmetic exists for that backend: Arm CPUs with
  ``asimdhp``/``fphp`` *and* an MNN that runs fp16 there (ARM82 kernels in the library and
  ``fp16:1`` in its load-time CPU line, :func:`fleet_agent.mnn_cpu.cpu_fp16`); OpenCL
  devices with ``cl_khr_fp16``; Vulkan devices with the fp16 extension; Metal always. On
  x86 the CPU backend ignores it. Whether fp16 is correct enough for a model is the golden
  check's call, per candidate, not this module's.
- ``memory: low`` only for a weight-quantized model (it keeps int8/int4 weights packed);
  on a float model it changes nothing.
- threads: 1 and the usable core count (bounded), for the CPU only; GPU backends read
  ``numThread`` as a mode mask and get MNN's default, 4.

Every candidate not measured is listed with the reason, so a report shows what was not
tried as plainly as what was.

The probe document is ``docs/probe.md`` (``fleet.probe/1``); this module reads only a small
part of it through the ``probe_*`` helpers, tolerant of sections that are missing.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fleet.core.mnn.session import GPU_BACKENDS, RuntimeConfig

__all__ = [
    "GPU_THREADS",
    "MAX_THREADS",
    "Candidate",
    "Skipped",
    "enumerate_candidates",
    "fp16_arith",
    "hardware_backends",
    "probe_cores",
    "probe_cpu_features",
    "probe_gpu_devices",
]

MAX_THREADS = 8
GPU_THREADS = 4
_FOUND = ("found", "ok", "usable", "available")
_ARM_FP16 = ("asimdhp", "fphp", "fp16")


@dataclass(frozen=True)
class Candidate:
    config: RuntimeConfig
    why: str

    def to_dict(self) -> dict[str, Any]:
        return {**self.config.to_dict(), "why": self.why}


@dataclass(frozen=True)
class Skipped:
    backend: str
    variant: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "variant": self.variant, "reason": self.reason}


def probe_cpu_features(probe: Mapping[str, Any]) -> set[str]:
    """Feature flags that are on, whether the probe gives a dict of booleans or a list."""
    feats = (probe.get("cpu") or {}).get("features") or {}
    if isinstance(feats, Mapping):
        return {str(k).lower() for k, v in feats.items() if v}
    if isinstance(feats, Iterable) and not isinstance(feats, str | bytes):
        return {str(k).lower() for k in feats}
    return set()


def probe_cores(probe: Mapping[str, Any]) -> int:
    cpu = probe.get("cpu") or {}
    for key in ("usable_cores", "online_cores", "logical_cores", "cores"):
        value = cpu.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return os.cpu_count() or 1


def _arch(probe: Mapping[str, Any]) -> str:
    return str((probe.get("cpu") or {}).get("arch") or "").lower()


def probe_gpu_devices(probe: Mapping[str, Any], api: str) -> list[dict[str, Any]]:
    """Devices of one GPU API (OpenCL's are nested under platforms) when its status is found."""
    section = (probe.get("gpu") or {}).get(api) or {}
    if not isinstance(section, Mapping):
        return []
    status = str(section.get("status", "found")).lower()
    if status not in _FOUND:
        return []
    devices = [dict(d) for d in section.get("devices") or [] if isinstance(d, Mapping)]
    for platform in section.get("platforms") or []:
        if isinstance(platform, Mapping):
            devices.extend(dict(d) for d in platform.get("devices") or []
                           if isinstance(d, Mapping))
    return devices


def hardware_backends(probe: Mapping[str, Any]) -> dict[str, str]:
    """GPU backends whose API and at least one device the probe found, with a reason."""
    found: dict[str, str] = {}
    for api in GPU_BACKENDS:
        devices = probe_gpu_devices(probe, api)
        if devices:
            names = ", ".join(str(d.get("name", "?")) for d in devices[:3])
            found[api] = f"probe found {len(devices)} {api} device(s): {names}"
    return found


def fp16_arith(probe: Mapping[str, Any], backend: str,
               build: Mapping[str, Any] | None = None) -> bool:
    """Whether ``precision: low`` can mean fp16 compute on ``backend`` here. For the CPU,
    ``build`` (the build facts of :mod:`fleet_agent.backends`) adds MNN's side: no ARM82
    kernels, or MNN's own ``fp16:0``, means no."""
    if backend == "cpu" and build:
        from fleet_agent.mnn_cpu import cpu_fp16

        verdict, _ = cpu_fp16(probe, build)
        if verdict is not None:
            return verdict
    if backend == "cpu":
        if (probe.get("cpu") or {}).get("fp16_arith") is True:
            return True
        arch = _arch(probe)
        arm = arch.startswith(("arm", "aarch64"))
        return arm and bool(probe_cpu_features(probe) & set(_ARM_FP16))
    if backend == "metal":
        return bool(probe_gpu_devices(probe, "metal"))
    devices = probe_gpu_devices(probe, backend)
    return any(d.get("fp16") or d.get("fp16_extension") for d in devices)


def _thread_choices(probe: Mapping[str, Any], thread_options: Sequence[int] | None
                    ) -> list[int]:
    cores = probe_cores(probe)
    wanted = ({int(t) for t in thread_options if int(t) >= 1} if thread_options
              else {1, cores})
    return sorted({max(1, min(t, cores, MAX_THREADS)) for t in wanted} or {1})


def enumerate_candidates(
    probe: Mapping[str, Any],
    build_backends: Mapping[str, bool],
    *,
    weight_quantized: bool,
    thread_options: Sequence[int] | None = None,
    backends: Sequence[str] | None = None,
    build: Mapping[str, Any] | None = None,
) -> tuple[list[Candidate], list[Skipped]]:
    """The configurations to measure, and the ones left out with the reason.

    ``build``: the build facts (``cpu_kernels``, ``cpu_runtime``) that say whether this
    MNN computes fp16 on the CPU; without them the CPU's fp16 arithmetic alone decides.

    ``backends`` forces a list of backends (an operator's request, or the configured one)
    even when the build or the probe says no: measuring them is how a silent fallback is
    caught (FIELD-NOTES 2), and the health check marks such a candidate as fallen back.
    """
    hw = hardware_backends(probe)
    forced = [b.lower() for b in backends] if backends else []
    chosen: list[tuple[str, str]] = [("cpu", "the CPU backend is always present")]
    skipped: list[Skipped] = []
    for api in GPU_BACKENDS:
        built = bool(build_backends.get(api))
        if api in forced:
            chosen.append((api, "requested explicitly" + (
                "" if built and api in hw else
                f" (probe: {'usable' if api in hw else 'not found'}, "
                f"build: {'has it' if built else 'lacks it'}; measured to see the fallback)")))
        elif api in hw and built:
            chosen.append((api, f"{hw[api]}; this MNN build runs it"))
        elif api in hw:
            skipped.append(Skipped(api, "*", f"{hw[api]}, but this MNN build lacks the "
                                             f"{api} backend (it would fall back to CPU)"))
        elif built:
            skipped.append(Skipped(api, "*", f"this MNN build has {api} but the probe "
                                             "found no usable device"))
    candidates: list[Candidate] = []
    for backend, why in chosen:
        threads = (_thread_choices(probe, thread_options) if backend == "cpu"
                   else [GPU_THREADS])
        precisions = ["normal"]
        if fp16_arith(probe, backend, build):
            precisions.append("low")
        elif backend == "cpu":
            from fleet_agent.mnn_cpu import cpu_fp16

            skipped.append(Skipped(backend, "precision=low",
                                   f"{cpu_fp16(probe, build)[1]}; precision low would "
                                   "change nothing"))
        else:
            skipped.append(Skipped(backend, "precision=low",
                                   "no fp16 arithmetic for this backend on this hardware; "
                                   "precision low would change nothing"))
        memories = ["normal"]
        if weight_quantized:
            memories.append("low")
        else:
            skipped.append(Skipped(backend, "memory=low",
                                   "float model: memory low only matters for "
                                   "weight-quantized weights"))
        for t in threads:
            for p in precisions:
                for m in memories:
                    cfg = RuntimeConfig(backend=backend, precision=p, memory=m, threads=t)
                    candidates.append(Candidate(cfg, why))
    return candidates, skipped
