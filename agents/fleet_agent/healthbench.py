"""The health benchmark: measure every candidate, check its outputs, pick the best.

Per candidate (ARCHITECTURE "The agent's brain", step 3):
load (timed) -> warm-up runs -> one run per reference sample, outputs compared with the
reference -> N timed iterations, each timing input copy + run + reading every output back
into numpy (the sync asynchronous GPU backends need, FIELD-NOTES 4; timing without it
cannot happen here) -> min/median/p90/max, RSS before and after, MNN's session memory.

Every figure carries its conditions (backend asked and used, threads, precision, memory,
power, warm-up, iterations, what the timed region holds, load average): FIELD-NOTES 6.

The reference is the golden data from the package when there is one (outputs of the
ORIGINAL model), else the CPU fp32 run of the same file; the report says which, and that
without golden data the variant itself was not checked.
"""

from __future__ import annotations

import hashlib
import os
import platform
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fleet.core.compare import Thresholds, compare_samples
from fleet.core.errors import InvalidModelError, UsageError
from fleet.core.golden import Golden, synth_inputs
from fleet.core.mnn.fdcapture import capture_fds
from fleet.core.mnn.session import (
    LoadedModel,
    RuntimeConfig,
    current_rss_bytes,
    mnn_version,
    monotonic_ns,
    peak_rss_bytes,
)
from fleet_agent import gpucache
from fleet_agent.backends import build_backend_details
from fleet_agent.candidates import Candidate, enumerate_candidates
from fleet_agent.policy import Pick, pick

__all__ = ["HEALTH_SCHEMA", "CandidateResult", "HealthReport", "detect_weight_quant",
           "health_check"]

HEALTH_SCHEMA = "fleet.health/1"
_TIMED_REGION = "input copy + run + every output read back to numpy"
_SYNTH_SAMPLES = 2


@dataclass
class CandidateResult:
    """One measured configuration. ``status``: passed | failed | fallback | error."""

    config: RuntimeConfig
    role: str
    why: str
    status: str = "error"
    effective_backend: str | None = None
    fell_back: bool = False
    fallbacks: list[dict[str, Any]] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    load_ms: float | None = None
    timing: dict[str, Any] | None = None
    memory: dict[str, Any] = field(default_factory=dict)
    comparison: dict[str, Any] | None = None
    conditions: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] | None = None
    error: str | None = None
    reasons: list[str] = field(default_factory=list)

    @property
    def median_ms(self) -> float | None:
        return None if self.timing is None else float(self.timing["median_ms"])

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.config.label(), "config": self.config.to_dict(),
                "role": self.role, "why": self.why, "status": self.status,
                "requested_backend": self.config.backend,
                "effective_backend": self.effective_backend, "fell_back": self.fell_back,
                "fallbacks": self.fallbacks, "log": self.log[:20], "load_ms": self.load_ms,
                "timing": self.timing, "memory": self.memory, "comparison": self.comparison,
                "conditions": self.conditions, "cache": self.cache, "error": self.error,
                "reasons": self.reasons}


@dataclass
class HealthReport:
    model: dict[str, Any]
    mnn_version: str
    build: dict[str, Any]
    reference: dict[str, Any]
    thresholds: dict[str, float]
    candidates: list[CandidateResult]
    skipped: list[dict[str, Any]]
    pick: Pick | None
    pick_reasons: list[str]
    configured: CandidateResult | None
    environment: dict[str, Any]
    started_at: str
    duration_s: float

    def to_dict(self) -> dict[str, Any]:
        configured = None
        if self.configured is not None:
            configured = {**self.configured.config.to_dict(),
                          "label": self.configured.config.label(),
                          "effective_backend": self.configured.effective_backend,
                          "fell_back": self.configured.fell_back,
                          "status": self.configured.status,
                          "median_ms": self.configured.median_ms}
        return {
            "schema": HEALTH_SCHEMA, "model": self.model, "mnn_version": self.mnn_version,
            "build": self.build, "reference": self.reference, "thresholds": self.thresholds,
            "candidates": [c.to_dict() for c in self.candidates], "skipped": self.skipped,
            "pick": None if self.pick is None else self.pick.to_dict(),
            "pick_reasons": self.pick_reasons, "configured": configured,
            "environment": self.environment, "started_at": self.started_at,
            "duration_s": round(self.duration_s, 3),
        }


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _percentile(sorted_ms: Sequence[float], q: float) -> float:
    if len(sorted_ms) == 1:
        return sorted_ms[0]
    pos = q * (len(sorted_ms) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_ms) - 1)
    return sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (pos - lo)


def _timing(samples_ns: Sequence[int]) -> dict[str, Any]:
    ms = sorted(s / 1e6 for s in samples_ns)
    return {"iterations": len(ms), "min_ms": round(ms[0], 4),
            "median_ms": round(statistics.median(ms), 4),
            "p90_ms": round(_percentile(ms, 0.9), 4), "max_ms": round(ms[-1], 4),
            "mean_ms": round(statistics.fmean(ms), 4)}


def detect_weight_quant(path: str, input_shapes: Mapping[str, tuple[int, ...]] | None = None
                        ) -> bool:
    """True when ``memory: low`` shrinks the CPU session: the weights are int8/int4 packed.

    pymnn exposes no quantization flag; MNN keeps quantized weights packed only in memory
    low mode, so the session memory tells (FIELD-NOTES 5).
    """
    sizes = []
    for mem in ("normal", "low"):
        model = LoadedModel.open(path, RuntimeConfig("cpu", memory=mem), input_shapes=input_shapes)
        sizes.append(model.session_memory_mb())
        model.close()
    return sizes[1] < sizes[0] * 0.95


def _measure(path: str, cand: Candidate, role: str, *, inputs: list[dict[str, np.ndarray]],
             reference: list[dict[str, np.ndarray]], input_shapes: Mapping[str, tuple[int, ...]]
             | None, thresholds: Thresholds, warmup: int, iterations: int,
             cache_file: str | None, cache_info: dict[str, Any] | None) -> CandidateResult:
    cfg = cand.config
    res = CandidateResult(config=cfg, role=role, why=cand.why, cache=cache_info)
    res.conditions = {**cfg.to_dict(), "backend_requested": cfg.backend,
                      "warmup": warmup, "iterations": iterations,
                      "timed_region": _TIMED_REGION, "samples_checked": len(inputs),
                      "load_avg_1m": round(os.getloadavg()[0], 2)
                      if hasattr(os, "getloadavg") else None}
    rss_before = current_rss_bytes()
    try:
        model = LoadedModel.open(path, cfg, cache_file=cache_file, input_shapes=input_shapes)
    except InvalidModelError as exc:
        res.error = exc.message
        res.reasons.append(f"could not load: {exc.message}")
        return res
    res.load_ms = round(model.load_ns / 1e6, 3)
    res.effective_backend = model.effective_backend
    res.fell_back = model.fell_back
    res.fallbacks = [f.to_dict() for f in model.fallbacks]
    res.log = list(model.log)
    res.conditions["backend_effective"] = model.effective_backend
    try:
        with capture_fds() as cap:
            for _ in range(warmup):
                model.run(inputs[0])
            got = [model.run(feeds) for feeds in inputs]
            samples: list[int] = []
            for i in range(iterations):
                feeds = inputs[i % len(inputs)]
                t0 = monotonic_ns()
                model.run(feeds)
                samples.append(monotonic_ns() - t0)
        res.log.extend(cap.lines()[:10])
        res.memory = {"rss_before_bytes": rss_before, "rss_after_bytes": current_rss_bytes(),
                      "session_mb": round(model.session_memory_mb(), 3),
                      "process_peak_rss_bytes": peak_rss_bytes()}
    except Exception as exc:  # a backend that crashes mid-run is a finding, not a crash
        res.error = f"{type(exc).__name__}: {exc}"
        res.reasons.append(f"failed while running: {res.error}")
        model.close()
        return res
    model.close()
    if res.memory["rss_before_bytes"] >= 0 and res.memory["rss_after_bytes"] >= 0:
        res.memory["rss_delta_bytes"] = (res.memory["rss_after_bytes"]
                                         - res.memory["rss_before_bytes"])
    res.timing = _timing(samples) if samples else None
    comparison = compare_samples(got, reference, thresholds)
    res.comparison = comparison.to_dict()
    if res.fell_back:
        res.status = "fallback"
        res.reasons.append(f"asked for {cfg.backend}, MNN ran {model.effective_backend}: "
                           "not eligible as " + cfg.backend)
    elif not comparison.passed:
        res.status = "failed"
        res.reasons.extend(comparison.reasons[:5])
    elif res.timing is None:
        res.status = "failed"
        res.reasons.append("no timed iterations")
    else:
        res.status = "passed"
    return res


def health_check(
    model_path: str,
    *,
    probe: Mapping[str, Any],
    golden: Golden | None,
    cache_dir: Path,
    warmup: int = 3,
    iterations: int = 10,
    input_spec: Mapping[str, Any] | None = None,
    thread_options: Sequence[int] | None = None,
    configured: RuntimeConfig | Mapping[str, Any] | None = None,
    backends: Sequence[str] | None = None,
    thresholds: Thresholds | None = None,
    weight_quantized: bool | None = None,
    model_digest: str | None = None,
    device_id: str | None = None,
    seed: int = 0,
) -> HealthReport:
    """Measure every candidate for ``model_path`` on this device and pick the best.

    ``cache_dir``: the device root's ``cache/`` (build-backend trial cache, GPU caches).
    ``configured``: the runtime config in force; it is always measured (role
    ``configured``) so the report shows configured vs effective backend.
    ``backends``: extra backends to measure even when the build or probe says no.
    Raises :class:`InvalidModelError` when the model does not load on the CPU at all.
    """
    if warmup < 0 or iterations < 1:
        raise UsageError("warmup must be >= 0 and iterations >= 1")
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    t_start = time.monotonic()
    th = thresholds or Thresholds()
    cache_root = Path(cache_dir)
    digest = model_digest or _sha256_file(model_path)
    device = device_id or platform.node() or "unknown"
    build = build_backend_details(cache_root)
    if golden is not None:
        input_shapes: dict[str, tuple[int, ...]] | None = golden.input_shapes()
    elif input_spec:
        input_shapes = {k: tuple(int(d) for d in v["shape"]) for k, v in input_spec.items()}
    else:
        input_shapes = None

    ref_model = LoadedModel.open(model_path, RuntimeConfig("cpu", precision="high"),
                                 input_shapes=input_shapes)
    model_info: dict[str, Any] = {
        "path": model_path, "sha256": digest,
        "inputs": {k: v.to_dict() for k, v in ref_model.inputs.items()},
        "outputs": ref_model.output_names()}
    if golden is not None:
        inputs, reference = golden.inputs, golden.outputs
        ref_info = {"kind": "golden", "variant_checked": True, "samples": golden.samples,
                    "source": golden.meta.get("reference"),
                    "note": "outputs of the original model, from the package"}
    else:
        specs = {k: (list(v.shape), v.dtype) for k, v in ref_model.inputs.items()}
        rng = np.random.default_rng(seed)
        inputs = [synth_inputs(specs, rng) for _ in range(_SYNTH_SAMPLES)]
        reference = [ref_model.run_quiet(feeds)[0] for feeds in inputs]
        ref_info = {"kind": "cpu_fp32_same_file", "variant_checked": False,
                    "samples": len(inputs), "seed": seed,
                    "note": "no golden data: the CPU fp32 run of this file is the reference, "
                            "so the variant itself (quantization, fp16 storage) was not "
                            "checked"}
    ref_model.close()
    if weight_quantized is None:
        weight_quantized = detect_weight_quant(model_path, input_shapes)
    model_info["weight_quantized"] = weight_quantized

    conf_cfg: RuntimeConfig | None = None
    if configured is not None:
        conf_cfg = (configured if isinstance(configured, RuntimeConfig)
                    else RuntimeConfig.from_dict(configured))
    forced = list(backends or [])
    if conf_cfg is not None and conf_cfg.backend != "cpu":
        forced.append(conf_cfg.backend)
    cands, skipped = enumerate_candidates(probe, build["backends"],
                                          weight_quantized=weight_quantized,
                                          thread_options=thread_options, backends=forced)
    plan: list[tuple[Candidate, str]] = [(c, "candidate") for c in cands]
    if conf_cfg is not None:
        for i, (c, _) in enumerate(plan):
            if c.config == conf_cfg:
                plan[i] = (c, "configured")
                break
        else:
            plan.append((Candidate(conf_cfg, "the configuration in force"), "configured"))

    results: list[CandidateResult] = []
    for cand, role in plan:
        cache_file: str | None = None
        cache_info: dict[str, Any] | None = None
        backend = cand.config.backend
        if backend != "cpu" and build["backends"].get(backend):
            path, check = gpucache.prepare_cache(
                cache_root, model_digest=digest, backend=backend, device_id=device,
                driver=gpucache.gpu_driver(probe, backend), mnn_version=mnn_version())
            cache_file = None if path is None else str(path)
            cache_info = {**check.to_dict(), "used": path is not None}
        results.append(_measure(model_path, cand, role, inputs=inputs, reference=reference,
                                input_shapes=input_shapes, thresholds=th, warmup=warmup,
                                iterations=iterations, cache_file=cache_file,
                                cache_info=cache_info))
    chosen, reasons = pick(results)
    configured_result = next((r for r in results if r.role == "configured"), None)
    env = {"device_id": device, "machine": platform.machine(), "cores": os.cpu_count(),
           "power": "normal (not changed by the agent)",
           "probe_schema": probe.get("schema")}
    return HealthReport(
        model=model_info, mnn_version=mnn_version(),
        build={"backends": build["backends"], "cpu_kernels": build.get("cpu_kernels")},
        reference=ref_info, thresholds=th.to_dict(), candidates=results,
        skipped=[s.to_dict() for s in skipped], pick=chosen, pick_reasons=reasons,
        configured=configured_result, environment=env, started_at=started,
        duration_s=time.monotonic() - t_start)
