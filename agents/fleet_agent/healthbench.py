"""The health benchmark: measure every candidate, check its outputs, pick the best.

Per candidate (ARCHITECTURE "The agent's brain", step 3) :mod:`fleet_agent.measure` loads,
warms up, times with a sync (outputs read back every iteration) and compares the outputs
with the reference; every figure carries its conditions (FIELD-NOTES 6).

The reference is the golden data from the package when there is one (outputs of the
ORIGINAL model, fed as given: the session converts each input to the dtype of MNN's own
tensor), else the CPU fp32 run of the same file; the report says which, and that without
golden data the variant itself was not checked.

Containment (FIELD-NOTES "MNN can crash natively"): the reference run and every candidate
run in their own child process (:mod:`fleet_agent.contained`; the decrypted model's memfd
is passed to it); the whole measurement, timed loop included, happens in the child. A
child that dies marks its candidate ``failed`` with the signal in ``error``, ``reasons``
and ``crash``; the others are still measured. When the CPU reference run itself dies, the
golden data (if any) is still the reference; without it nothing can be checked and no
candidate is measured.
"""

from __future__ import annotations

import hashlib
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fleet.core.compare import Thresholds
from fleet.core.errors import UsageError
from fleet.core.golden import Golden, synth_inputs
from fleet.core.mnn.session import LoadedModel, RuntimeConfig, mnn_version
from fleet_agent import gpucache
from fleet_agent.backends import build_backend_details
from fleet_agent.candidates import Candidate, enumerate_candidates
from fleet_agent.contained import ChildOutcome, run_contained
from fleet_agent.measure import CandidateResult, _measure, detect_weight_quant
from fleet_agent.policy import EMULATED_NOTE, Pick, pick
from fleet_agent.probe import emulated as probe_emulated

__all__ = ["HEALTH_SCHEMA", "CandidateResult", "HealthReport", "detect_weight_quant",
           "health_check"]

HEALTH_SCHEMA = "fleet.health/1"
_SYNTH_SAMPLES = 2
#: Wall-clock deadline of one contained job (a reference run or one candidate), seconds.
JOB_TIMEOUT_S = 600.0


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
    emulated: str | None = None  #: the probe's cpu.emulated ("qemu"): timings meaningless

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
            "duration_s": round(self.duration_s, 3), "emulated": self.emulated,
            "timings_representative": self.emulated is None,
            "timing_note": EMULATED_NOTE.format(self.emulated) if self.emulated else None,
        }


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class _Reference:
    """What the CPU reference job found out (or could not: ``outcome`` says why)."""

    outcome: ChildOutcome
    inputs_info: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    weight_quantized: bool | None = None
    samples_in: list[dict[str, np.ndarray]] = field(default_factory=list)
    samples_out: list[dict[str, np.ndarray]] = field(default_factory=list)


def _shapes(spec: Mapping[str, Any] | None) -> dict[str, tuple[int, ...]] | None:
    return None if spec is None else {k: tuple(int(d) for d in v) for k, v in spec.items()}


def _pack(prefix: str, samples: Sequence[Mapping[str, np.ndarray]]
          ) -> tuple[list[str], dict[str, np.ndarray]]:
    """Samples as ``<prefix>.<i>.<k>`` arrays and the names k indexes."""
    names = sorted(samples[0]) if samples else []
    arrays = {f"{prefix}.{i}.{k}": np.asarray(s[n]) for i, s in enumerate(samples)
              for k, n in enumerate(names)}
    return names, arrays


def _unpack(prefix: str, names: Sequence[str], count: int,
            arrays: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    return [{n: arrays[f"{prefix}.{i}.{k}"] for k, n in enumerate(names)}
            for i in range(count)]


def reference_target(spec: dict[str, Any], arrays: dict[str, np.ndarray]
                     ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Contained job: the CPU fp32 reference. Model facts and, without golden data, seeded
    inputs and their outputs (``in.<i>.<k>``/``out.<i>.<k>`` arrays)."""
    path, input_shapes = str(spec["path"]), _shapes(spec.get("input_shapes"))
    ref_model = LoadedModel.open(path, RuntimeConfig("cpu", precision="high"),
                                 input_shapes=input_shapes)
    data: dict[str, Any] = {
        "inputs": {k: v.to_dict() for k, v in ref_model.inputs.items()},
        "outputs": ref_model.output_names(), "samples": 0}
    out: dict[str, np.ndarray] = {}
    if spec.get("synthesise"):
        specs = {k: (list(v.shape), v.dtype) for k, v in ref_model.inputs.items()}
        rng = np.random.default_rng(int(spec.get("seed", 0)))
        inputs = [synth_inputs(specs, rng) for _ in range(_SYNTH_SAMPLES)]
        outputs = [ref_model.run_quiet(feeds)[0] for feeds in inputs]
        data["in_names"], packed_in = _pack("in", inputs)
        data["out_names"], packed_out = _pack("out", outputs)
        data["samples"] = len(inputs)
        out.update(packed_in)
        out.update(packed_out)
    ref_model.close()
    wq = spec.get("weight_quantized")
    data["weight_quantized"] = detect_weight_quant(path, input_shapes) if wq is None else wq
    return data, out


def candidate_target(spec: dict[str, Any], arrays: dict[str, np.ndarray]
                     ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Contained job: :func:`_measure` of one candidate (load, warm-up, timed loop and
    comparison all in the child); returns ``{"result": CandidateResult.to_dict()}``."""
    cand = Candidate(RuntimeConfig.from_dict(spec["config"]), str(spec["why"]))
    n = int(spec["samples"])
    res = _measure(str(spec["path"]), cand, str(spec["role"]),
                   inputs=_unpack("in", spec["in_names"], n, arrays),
                   reference=_unpack("ref", spec["ref_names"], n, arrays),
                   input_shapes=_shapes(spec.get("input_shapes")),
                   thresholds=Thresholds(**spec["thresholds"]), warmup=int(spec["warmup"]),
                   iterations=int(spec["iterations"]), cache_file=spec.get("cache_file"),
                   cache_info=spec.get("cache_info"))
    res.conditions["contained"] = spec.get("contained", "child process")
    return {"result": res.to_dict()}, {}


#: The contained jobs, as ``module:function`` (tests may point these elsewhere).
REFERENCE_TARGET = f"{__name__}:reference_target"
CANDIDATE_TARGET = f"{__name__}:candidate_target"


def _reference(path: str, input_shapes: Mapping[str, tuple[int, ...]] | None, *,
               synthesise: bool, seed: int, weight_quantized: bool | None, isolate: bool,
               timeout_s: float) -> _Reference:
    """Run the reference job contained. A Python error in it (a file MNN refuses to load:
    :class:`InvalidModelError`) is re-raised here; a crash is returned in ``outcome``."""
    spec = {"path": path, "synthesise": synthesise, "seed": seed,
            "weight_quantized": weight_quantized,
            "input_shapes": None if input_shapes is None else
            {k: list(v) for k, v in input_shapes.items()}}
    outcome = run_contained(REFERENCE_TARGET, spec, fd_paths=[path], timeout_s=timeout_s,
                            isolate=isolate)
    outcome.raise_error()
    ref = _Reference(outcome)
    if not outcome.ok:
        ref.weight_quantized = weight_quantized
        return ref
    d, arrays = outcome.data, outcome.arrays
    ref.inputs_info, ref.outputs = dict(d["inputs"]), list(d["outputs"])
    ref.weight_quantized = d.get("weight_quantized")
    n = int(d.get("samples") or 0)
    if n:
        ref.samples_in = _unpack("in", d["in_names"], n, arrays)
        ref.samples_out = _unpack("out", d["out_names"], n, arrays)
    return ref


def _crashed_candidate(cand: Candidate, role: str, outcome: ChildOutcome,
                       cache_info: dict[str, Any] | None) -> CandidateResult:
    """A candidate whose child died (or raised outside ``_measure``'s own handling)."""
    res = CandidateResult(config=cand.config, role=role, why=cand.why, cache=cache_info,
                          log=list(outcome.log[-10:]))
    res.conditions = {**cand.config.to_dict(), "backend_requested": cand.config.backend}
    if outcome.crashed:
        res.status = "failed"
        res.crash = outcome.crash_dict()
        res.error = f"MNN {outcome.describe()} while loading or measuring this candidate"
    else:
        res.status = "error"
        res.error = outcome.describe()
    res.reasons.append(res.error)
    return res


def _measure_contained(path: str, cand: Candidate, role: str, *, isolate: bool,
                       timeout_s: float, cache_info: dict[str, Any] | None,
                       inputs: Sequence[Mapping[str, np.ndarray]],
                       reference: Sequence[Mapping[str, np.ndarray]],
                       input_shapes: Mapping[str, tuple[int, ...]] | None,
                       thresholds: Thresholds, warmup: int, iterations: int,
                       cache_file: str | None) -> CandidateResult:
    """One candidate in its own child process (:data:`CANDIDATE_TARGET`)."""
    in_names, in_arrays = _pack("in", inputs)
    ref_names, ref_arrays = _pack("ref", reference)
    spec = {"path": path, "config": cand.config.to_dict(), "why": cand.why, "role": role,
            "samples": len(inputs), "in_names": in_names, "ref_names": ref_names,
            "input_shapes": None if input_shapes is None else
            {k: list(v) for k, v in input_shapes.items()},
            "thresholds": thresholds.to_dict(), "warmup": warmup, "iterations": iterations,
            "cache_file": cache_file, "cache_info": cache_info,
            "contained": "child process" if isolate else "in-process"}
    outcome = run_contained(CANDIDATE_TARGET, spec, {**in_arrays, **ref_arrays},
                            fd_paths=[path], timeout_s=timeout_s, isolate=isolate)
    if outcome.ok:
        return CandidateResult.from_dict(outcome.data["result"])
    return _crashed_candidate(cand, role, outcome, cache_info)


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
    isolate: bool = True,
    job_timeout_s: float = JOB_TIMEOUT_S,
) -> HealthReport:
    """Measure every candidate for ``model_path`` on this device and pick the best.

    ``cache_dir``: the device root's ``cache/`` (build-backend trial cache, GPU caches).
    ``configured``: the runtime config in force; it is always measured (role
    ``configured``) so the report shows configured vs effective backend.
    ``backends``: extra backends to measure even when the build or probe says no.
    ``isolate``: run the reference and each candidate in a child process (default; a native
    crash then fails only that candidate); ``job_timeout_s`` bounds each child.
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

    ref = _reference(model_path, input_shapes, synthesise=golden is None, seed=seed,
                     weight_quantized=weight_quantized, isolate=isolate,
                     timeout_s=job_timeout_s)
    model_info: dict[str, Any] = {"path": model_path, "sha256": digest,
                                  "inputs": ref.inputs_info, "outputs": ref.outputs,
                                  "weight_quantized": ref.weight_quantized}
    if golden is not None:
        inputs, reference = golden.inputs, golden.outputs
        ref_info: dict[str, Any] = {
            "kind": "golden", "variant_checked": True, "samples": golden.samples,
            "source": golden.meta.get("reference"), "inputs": golden.input_specs(),
            "note": "outputs of the original model, from the package"}
        if not ref.outcome.ok:
            model_info["inputs"] = golden.input_specs()
            model_info["outputs"] = sorted(golden.outputs[0])
    else:
        inputs, reference = ref.samples_in, ref.samples_out
        ref_info = {"kind": "cpu_fp32_same_file", "variant_checked": False,
                    "samples": len(inputs), "seed": seed,
                    "note": "no golden data: the CPU fp32 run of this file is the reference, "
                            "so the variant itself (quantization, fp16 storage) was not "
                            "checked"}
    if not ref.outcome.ok:
        ref_info["cpu_reference"] = {"status": "crashed", "error": ref.outcome.describe(),
                                     **ref.outcome.crash_dict()}

    conf_cfg: RuntimeConfig | None = None
    if configured is not None:
        conf_cfg = (configured if isinstance(configured, RuntimeConfig)
                    else RuntimeConfig.from_dict(configured))
    forced = list(backends or [])
    if conf_cfg is not None and conf_cfg.backend != "cpu":
        forced.append(conf_cfg.backend)
    cands, skipped = enumerate_candidates(probe, build["backends"],
                                          weight_quantized=bool(ref.weight_quantized),
                                          thread_options=thread_options, backends=forced,
                                          build=build)
    emu = probe_emulated(probe)
    plan: list[tuple[Candidate, str]] = [(c, "candidate") for c in cands]
    if conf_cfg is not None:
        for i, (c, _) in enumerate(plan):
            if c.config == conf_cfg:
                plan[i] = (c, "configured")
                break
        else:
            plan.append((Candidate(conf_cfg, "the configuration in force"), "configured"))

    results: list[CandidateResult] = []
    no_reference = golden is None and not ref.outcome.ok
    for cand, role in [] if no_reference else plan:
        cache_file: str | None = None
        cache_info: dict[str, Any] | None = None
        backend = cand.config.backend
        if backend != "cpu" and build["backends"].get(backend):
            path, check = gpucache.prepare_cache(
                cache_root, model_digest=digest, backend=backend, device_id=device,
                driver=gpucache.gpu_driver(probe, backend), mnn_version=mnn_version())
            cache_file = None if path is None else str(path)
            cache_info = {**check.to_dict(), "used": path is not None}
        res = _measure_contained(
            model_path, cand, role, isolate=isolate, timeout_s=job_timeout_s,
            cache_info=cache_info, inputs=inputs, reference=reference,
            input_shapes=input_shapes, thresholds=th, warmup=warmup, iterations=iterations,
            cache_file=cache_file)
        res.conditions["emulated"] = emu  # FIELD-NOTES 6: figures carry their conditions
        results.append(res)
    if no_reference:
        chosen, reasons = None, [
            f"the CPU fp32 reference run {ref.outcome.describe()}; without golden data "
            "there is nothing to check candidates against, none was measured"]
    else:
        chosen, reasons = pick(results, emulated=emu)
    configured_result = next((r for r in results if r.role == "configured"), None)
    env = {"device_id": device, "machine": platform.machine(), "cores": os.cpu_count(),
           "power": "normal (not changed by the agent)",
           "probe_schema": probe.get("schema"), "emulated": emu,
           "cpu_model": (probe.get("cpu") or {}).get("model")}
    return HealthReport(
        model=model_info, mnn_version=mnn_version(),
        build={"backends": build["backends"], "cpu_kernels": build.get("cpu_kernels"),
               "cpu_runtime": build.get("cpu_runtime")},
        reference=ref_info, thresholds=th.to_dict(), candidates=results,
        skipped=[s.to_dict() for s in skipped], pick=chosen, pick_reasons=reasons,
        configured=configured_result, environment=env, started_at=started,
        duration_s=time.monotonic() - t_start, emulated=emu)
