"""Audit rules FA001+: field problems (FIELD-NOTES) turned into findings for one model.

Each rule has an id, a severity, a one-line title and a fix; a finding adds the message
for this device and the evidence. The rules read only data: the last health report
(``HealthReport.to_dict()``), the probe document, the runtime config in force
(``read_runtime_config``), the build facts and the GPU cache folder. ``docs/audit-rules.md``
lists them; ``tests/test_audit_rules.py`` reproduces each one.

Not a rule: timing without a sync. The health benchmark reads every output back inside
the timed loop, so an unsynced figure cannot be produced here.

Arm (FIELD-NOTES 5, "Arm under emulation"): FA004 also fires on an Arm CPU with fp16
arithmetic when this MNN cannot use it (no ARM82 kernels, or MNN's own ``fp16:0``);
FA012 and FA013 judge fp16 by the golden check of the measured ``precision: low``
candidate; FA014 says the CPU is emulated, and FA011 (a speed comparison) is then not
raised.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet.core.mnn.session import GPU_BACKENDS
from fleet_agent.candidates import fp16_arith, hardware_backends, probe_cpu_features
from fleet_agent.gpucache import scan_caches
from fleet_agent.mnn_cpu import cpu_fp16
from fleet_agent.probe import emulated

__all__ = ["RULES", "Finding", "Rule", "audit"]


@dataclass(frozen=True)
class Rule:
    id: str
    severity: str  # error | warning | info
    title: str
    fix: str


RULES: dict[str, Rule] = {r.id: r for r in (
    Rule("FA001", "warning", "GPU backend usable and built, but the config pins the CPU",
         "run `fleet-agent bench` (or `fleet deploy`) so the measured best backend is "
         "written into the runtime config"),
    Rule("FA002", "error", "configured backend is not the backend that runs (silent fallback)",
         "configure a backend this MNN build has and this device can run, or ship an MNN "
         "build with that backend"),
    Rule("FA003", "error", "backend output wrong, all-zero, NaN or Inf",
         "do not serve this configuration; keep the pick (it passed), report the backend "
         "bug, or ship a non-quantized variant if every backend fails"),
    Rule("FA004", "warning", "precision low without fp16 arithmetic hardware",
         "set precision normal: low gives fp16 only on Arm v8.2+ CPUs (with an MNN_ARM82 "
         "build) and fp16-capable GPUs; here it changes nothing"),
    Rule("FA005", "info", "memory low on a float (not weight-quantized) model",
         "set memory normal, or deploy a weight-quantized variant (--variant wq8) if memory "
         "matters"),
    Rule("FA006", "error", "memory or power given as a string (pymnn silently ignores it)",
         "give memory/power as integers in a pymnn config (normal 0, high 1, low 2); the "
         "agent's runtime.json mnn_config does this"),
    Rule("FA007", "error", "shared or foreign GPU cache file",
         "delete that cache/<digest>/<backend>/ folder and re-run bench: a cache is valid "
         "only for the device, driver and model that made it, and MNN does not repair it"),
    Rule("FA008", "info", "CPU has AVX512/VNNI that this MNN build does not use",
         "use an MNN build with MNN_AVX512 (and VNNI) for this x86 fleet; the PyPI wheel's "
         "kernels stop at AVX2"),
    Rule("FA009", "warning", "benchmark missing or made for another model file",
         "re-run `fleet-agent bench` on the active model; figures only count for the file, "
         "device and conditions they were measured with"),
    Rule("FA010", "info", "no golden data: the model variant itself was not checked",
         "package the model from its original (ONNX/TFLite) so golden outputs travel with it"),
    Rule("FA011", "warning", "configured runtime is slower than the measured best",
         "write the pick into the runtime config (`fleet-agent bench` does)"),
    Rule("FA012", "info", "fp16 available and correct for this model, but not used",
         "consider precision low on this CPU: it passed the golden check here; on real "
         "Armv8.2+ hardware fp16 roughly halves the arithmetic and memory traffic (confirm "
         "the speed with `fleet-agent bench` on the device itself, not under emulation)"),
    Rule("FA013", "error", "fp16 (precision low) in use, and wrong for this model",
         "set precision normal for this model: its fp16 outputs fail the golden check here "
         "(other models may still run fp16 correctly on this device)"),
    Rule("FA014", "info", "the CPU is emulated: timings are not representative",
         "judge speed on real hardware only; correctness verdicts (golden check, fallbacks) "
         "from the emulated CPU still hold, and so does which features it offers"),
)}


@dataclass
class Finding:
    id: str
    severity: str
    title: str
    message: str
    fix: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "severity": self.severity, "title": self.title,
                "message": self.message, "fix": self.fix, "evidence": self.evidence}


def _finding(rule_id: str, message: str, **evidence: Any) -> Finding:
    rule = RULES[rule_id]
    return Finding(rule.id, rule.severity, rule.title, message, rule.fix, evidence)


@dataclass(frozen=True)
class _Facts:
    report: Mapping[str, Any] | None
    probe: Mapping[str, Any]
    config: Mapping[str, Any] | None
    build: Mapping[str, Any]
    cache_root: Path
    model_digest: str
    device_id: str


def _fa001(f: _Facts) -> list[Finding]:
    if f.config is None or f.config.get("backend") != "cpu":
        return []
    hw = hardware_backends(f.probe)
    built = f.build.get("backends") or {}
    usable = [api for api in GPU_BACKENDS if api in hw and built.get(api)]
    if not usable:
        return []
    return [_finding("FA001", f"config pins cpu while {', '.join(usable)} is usable and in "
                              "this MNN build", usable=usable, config=f.config.get("path"))]


def _fa002(f: _Facts) -> list[Finding]:
    conf = (f.report or {}).get("configured")
    if conf and conf.get("effective_backend") and (
            conf.get("fell_back") or conf.get("effective_backend") != conf.get("backend")):
        return [_finding("FA002", f"configured {conf.get('backend')}, MNN ran "
                                  f"{conf.get('effective_backend')}",
                         configured=conf.get("backend"),
                         effective=conf.get("effective_backend"), measured=True)]
    if f.config and f.config.get("backend") not in (None, "cpu"):
        backend = f.config["backend"]
        built = f.build.get("backends") or {}
        if backend in built and not built[backend]:
            return [_finding("FA002", f"configured {backend}, but this MNN build falls back "
                                      "to cpu for it", configured=backend, effective="cpu",
                             measured=False)]
    return []


def _fa003(f: _Facts) -> list[Finding]:
    if not f.report:
        return []
    out: list[Finding] = []
    for cand in f.report.get("candidates") or []:
        comp = cand.get("comparison") or {}
        if cand.get("status") == "failed" and comp and not comp.get("passed", True):
            ran = cand.get("effective_backend") or cand.get("requested_backend")
            out.append(_finding("FA003", f"{cand.get('label')} (ran on {ran}): "
                                         + "; ".join(comp.get("reasons", [])[:2]),
                                label=cand.get("label"), role=cand.get("role"),
                                worst_cosine=comp.get("worst_cosine")))
    if f.report.get("candidates") and f.report.get("pick") is None:
        out.append(_finding("FA003", "no configuration produced correct outputs: "
                                     + " ".join(f.report.get("pick_reasons") or []),
                            label=None, role="all"))
    return out


def _fa004(f: _Facts) -> list[Finding]:
    if not f.config or f.config.get("precision") != "low":
        return []
    backend = f.config.get("backend") or "cpu"
    if fp16_arith(f.probe, backend, f.build):
        return []
    why = (cpu_fp16(f.probe, f.build)[1] if backend == "cpu"
           else "no fp16 arithmetic for it here")
    return [_finding("FA004", f"precision low on {backend}, which has no fp16 arithmetic here"
                              f" ({why})", backend=backend, reason=why,
                     cpu_features=sorted(probe_cpu_features(f.probe))[:40],
                     mnn_cpu_line=((f.build.get("cpu_runtime") or {}).get("banner")))]


def _fa005(f: _Facts) -> list[Finding]:
    if not f.config or f.config.get("memory") != "low":
        return []
    quant = ((f.report or {}).get("model") or {}).get("weight_quantized")
    if quant is False:
        return [_finding("FA005", "memory low on a float model changes nothing",
                         weight_quantized=False)]
    return []


def _pymnn_dicts(raw: Mapping[str, Any], fmt: str) -> list[Mapping[str, Any]]:
    found: list[Mapping[str, Any]] = []
    if fmt == "pymnn":
        found.append(raw)
    inner = raw.get("mnn_config")
    if isinstance(inner, Mapping):
        found.append(inner)
    return found


def _fa006(f: _Facts) -> list[Finding]:
    if not f.config:
        return []
    out: list[Finding] = []
    for d in _pymnn_dicts(f.config.get("raw") or {}, str(f.config.get("format"))):
        bad = {k: d[k] for k in ("memory", "power") if isinstance(d.get(k), str)}
        if bad:
            out.append(_finding("FA006", "pymnn config gives " + ", ".join(
                f"{k}={v!r}" for k, v in bad.items()) + " as string(s): pymnn ignores them "
                "and runs with normal", values=bad, config=f.config.get("path")))
    return out


def _fa007(f: _Facts) -> list[Finding]:
    return [_finding("FA007", f"{c.path}: {c.reason}", path=str(c.path), backend=c.backend,
                     owner=c.owner)
            for c in scan_caches(f.cache_root, device_id=f.device_id) if not c.ok]


def _fa008(f: _Facts) -> list[Finding]:
    feats = probe_cpu_features(f.probe)
    wide = sorted(feats & {"avx512f", "avx512_vnni", "avx_vnni", "avx512_fp16", "amx_int8"})
    kernels = f.build.get("cpu_kernels") or {}
    if not wide or kernels.get("avx512") is not False:
        return []
    return [_finding("FA008", f"CPU has {', '.join(wide)}; MNN's CPU kernels here stop at "
                              f"{'AVX2' if kernels.get('avx2') else 'SSE'}",
                     cpu_features=wide, kernels=dict(kernels))]


def _fa009(f: _Facts) -> list[Finding]:
    if not f.report:
        return [_finding("FA009", "no health report for the active model", digest=None)]
    digest = (f.report.get("model") or {}).get("sha256")
    if digest and digest != f.model_digest:
        return [_finding("FA009", f"last report measured model {digest[:12]}, the active "
                                  f"model is {f.model_digest[:12]}", report_digest=digest)]
    return []


def _fa010(f: _Facts) -> list[Finding]:
    ref = (f.report or {}).get("reference") or {}
    if ref and ref.get("variant_checked") is False:
        return [_finding("FA010", "reference was the CPU fp32 run of this same file",
                         reference=ref.get("kind"))]
    return []


def _fa011(f: _Facts) -> list[Finding]:
    report = f.report or {}
    conf, chosen = report.get("configured"), report.get("pick")
    if not conf or not chosen or conf.get("median_ms") is None or conf.get("fell_back"):
        return []
    if report.get("emulated"):
        return []  # emulated timings rank nothing (FA014 says so)
    if conf.get("label") == chosen.get("label"):
        return []
    ratio = float(conf["median_ms"]) / max(float(chosen["median_ms"]), 1e-9)
    if ratio < 1.10:
        return []
    return [_finding("FA011", f"configured {conf.get('label')} takes {ratio:.2f}x the time of "
                              f"the pick {chosen.get('label')}", ratio=round(ratio, 3),
                     configured=conf.get("label"), recommended=chosen.get("label"))]


def _low_candidates(f: _Facts, backend: str) -> list[Mapping[str, Any]]:
    return [c for c in (f.report or {}).get("candidates") or []
            if (c.get("config") or {}).get("backend") == backend
            and (c.get("config") or {}).get("precision") == "low"]


def _fa012(f: _Facts) -> list[Finding]:
    if not f.config or (f.config.get("backend") or "cpu") != "cpu":
        return []
    if f.config.get("precision") == "low" or cpu_fp16(f.probe, f.build)[0] is False:
        return []
    passed = [c for c in _low_candidates(f, "cpu") if c.get("status") == "passed"]
    if not passed:
        return []
    best = min(passed, key=lambda c: float((c.get("timing") or {}).get("median_ms") or 1e30))
    comp = best.get("comparison") or {}
    ref = ((f.report or {}).get("reference") or {}).get("kind")
    emu = (f.report or {}).get("emulated")
    note = (f"; its speed was measured on an emulated CPU ({emu}), so measure on the real "
            "device before switching" if emu else "")
    return [_finding("FA012", f"{best.get('label')} (fp16) passed the {ref or 'reference'} "
                              f"check for this model (worst cosine "
                              f"{comp.get('worst_cosine')}) but the config runs precision "
                              f"{f.config.get('precision') or 'normal'}{note}",
                     label=best.get("label"), reference=ref,
                     worst_cosine=comp.get("worst_cosine"), emulated=emu)]


def _fa013(f: _Facts) -> list[Finding]:
    if not f.config or f.config.get("precision") != "low":
        return []
    backend = f.config.get("backend") or "cpu"
    wrong = [c for c in _low_candidates(f, backend) if c.get("status") == "failed"
             and c.get("comparison") and not (c.get("comparison") or {}).get("passed", True)]
    if not wrong:
        return []
    ref = ((f.report or {}).get("reference") or {}).get("kind")
    reasons = "; ".join(((wrong[0].get("comparison") or {}).get("reasons") or [])[:2])
    return [_finding("FA013", f"the config runs precision low on {backend} and "
                              f"{', '.join(str(c.get('label')) for c in wrong[:4])} fail the "
                              f"{ref or 'reference'} check for this model: {reasons}",
                     backend=backend, labels=[c.get("label") for c in wrong], reference=ref)]


def _fa014(f: _Facts) -> list[Finding]:
    emu = (f.report or {}).get("emulated") or emulated(f.probe)
    if not emu:
        return []
    cpu = f.probe.get("cpu") or {}
    detail = (cpu.get("details") or {}).get("emulation") or {}
    return [_finding("FA014", f"the CPU ({cpu.get('arch')}, {cpu.get('model')}) is emulated "
                              f"by {emu}: benchmark timings say nothing about real hardware",
                     emulator=emu, cpu_model=cpu.get("model"),
                     real_executable=detail.get("real_executable"))]


_CHECKS: tuple[Callable[[_Facts], list[Finding]], ...] = (
    _fa001, _fa002, _fa003, _fa004, _fa005, _fa006, _fa007, _fa008, _fa009, _fa010, _fa011,
    _fa012, _fa013, _fa014)


def audit(report: Mapping[str, Any] | None, *, probe: Mapping[str, Any],
          runtime_config: Mapping[str, Any] | None, cache_root: Path, model_digest: str,
          device_id: str, build: Mapping[str, Any] | None = None) -> list[Finding]:
    """Every finding for the active model, most severe first.

    ``report``: the last ``HealthReport.to_dict()`` for this model (None if never measured).
    ``runtime_config``: ``read_runtime_config(slot)`` (None if the model has none).
    ``build``: ``{"backends": {...}, "cpu_kernels": {...}}``; defaults to the report's.
    """
    facts = _Facts(report=report, probe=probe, config=runtime_config,
                   build=build if build is not None else (report or {}).get("build") or {},
                   cache_root=Path(cache_root), model_digest=model_digest,
                   device_id=device_id)
    findings = [f for check in _CHECKS for f in check(facts)]
    order = {"error": 0, "warning": 1, "info": 2}
    return sorted(findings, key=lambda f: (order.get(f.severity, 3), f.id))
