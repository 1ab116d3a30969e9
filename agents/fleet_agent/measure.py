"""Measure one candidate: load, warm up, time with a sync, compare with the reference.

Per candidate (ARCHITECTURE "The agent's brain", step 3):
load (timed) -> warm-up runs -> one run per reference sample, outputs compared with the
reference -> N timed iterations, each timing input copy + run + reading every output back
into numpy (the sync asynchronous GPU backends need, FIELD-NOTES 4; timing without it
cannot happen here) -> min/median/p90/max, RSS before and after, MNN's session memory.
Inputs are converted once, before the timed loop, to the dtype of MNN's own input tensors
(:meth:`LoadedModel.prepare`), so the loop copies and does not convert.

Every figure carries its conditions (backend asked and used, threads, precision, memory,
power, warm-up, iterations, what the timed region holds, load average): FIELD-NOTES 6.
This module runs inside the contained child (:mod:`fleet_agent.healthbench` starts it).
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fleet.core.compare import Thresholds, compare_samples
from fleet.core.errors import InvalidModelError
from fleet.core.mnn.fdcapture import capture_fds
from fleet.core.mnn.session import (
    LoadedModel,
    RuntimeConfig,
    current_rss_bytes,
    monotonic_ns,
    peak_rss_bytes,
)
from fleet_agent.candidates import Candidate

__all__ = ["CandidateResult", "detect_weight_quant", "measure"]

_TIMED_REGION = "input copy + run + every output read back to numpy"


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
    crash: dict[str, Any] | None = None  # the child died: signal, exit code, its last lines

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
                "reasons": self.reasons, "crash": self.crash}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CandidateResult:
        """Inverse of :meth:`to_dict` (a contained child sends its result as JSON)."""
        return cls(config=RuntimeConfig.from_dict(d["config"]), role=str(d["role"]),
                   why=str(d["why"]), status=str(d["status"]),
                   effective_backend=d.get("effective_backend"),
                   fell_back=bool(d.get("fell_back")), fallbacks=list(d.get("fallbacks") or []),
                   log=list(d.get("log") or []), load_ms=d.get("load_ms"),
                   timing=d.get("timing"), memory=dict(d.get("memory") or {}),
                   comparison=d.get("comparison"), conditions=dict(d.get("conditions") or {}),
                   cache=d.get("cache"), error=d.get("error"),
                   reasons=list(d.get("reasons") or []), crash=d.get("crash"))


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
        inputs = [model.prepare(feeds) for feeds in inputs]  # session dtypes, once
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


measure = _measure
