"""Activation check of an MNN-LLM package: load it from memory, reproduce its reference
outputs, time greedy decoding per candidate, pick the fastest that is correct.

The payload is decrypted into sealed memfds and MNN-LLM reads them through a private folder
of symbolic links to ``/proc/self/fd/N`` (``fleet_agent.lora_packs.LinkDir``): no plaintext on
disk. This wheel has only the CPU backend, so candidates differ in threads and in memory
mode (``low`` keeps the int8 weights packed and quantizes activations at run time).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fleet.core import errors
from fleet.core.mnn.session import RuntimeConfig
from fleet_agent.context import AgentContext
from fleet_agent.policy import Pick

__all__ = ["llm_health"]

_SCHEMA = "fleet.health/1"


def _candidates(probe: Mapping[str, Any], facts: Mapping[str, Any]) -> list[RuntimeConfig]:
    cores = int((probe.get("cpu") or {}).get("usable_cores") or os.cpu_count() or 1)
    threads = sorted({1, min(4, cores)})
    memories = ["low", "normal"] if facts.get("quant_bits") else ["normal"]
    return [RuntimeConfig("cpu", precision="normal", memory=m, threads=t)
            for t in threads for m in memories]


def llm_health(ctx: AgentContext, opened: Any, *, probe: Mapping[str, Any],
               args: Mapping[str, Any]) -> tuple[dict[str, Any], Pick | None]:
    """``opened``: the store's ``OpenedPayload`` of an MNN-LLM package."""
    import json

    from fleet_agent.lora_packs import LinkDir, Reference

    manifest = opened.manifest
    facts = manifest.mnn or {}
    reference = None
    if opened.golden:
        reference = Reference.from_dict(json.loads(Path(opened.golden).read_bytes()))
    links = LinkDir(ctx.root / "run")
    results: list[dict[str, Any]] = []
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    t0 = time.monotonic()
    try:
        for rel, path in opened.paths.items():
            links.link(rel, path)
        config = str(links.path / "config.json")
        for cfg in _candidates(probe, facts):
            results.append(_measure(config, cfg, reference, int(args.get("iterations", 3))))
    finally:
        links.close()
    passed = [r for r in results if r["status"] == "passed"]
    pick = None
    reasons: list[str] = []
    if passed:
        best = min(passed, key=lambda r: (r["timing"]["median_ms"], r["config"]["threads"]))
        cpu1 = next((r for r in passed if r["config"]["threads"] == 1), best)
        pick = Pick(RuntimeConfig.from_dict(best["config"]), best["timing"]["median_ms"],
                    [f"fastest correct candidate: {best['label']} "
                     f"({best['timing']['median_ms']:.2f} ms per token)"],
                    round(cpu1["timing"]["median_ms"] / best["timing"]["median_ms"], 3))
        reasons = pick.reasons
    else:
        reasons = ["no candidate reproduced the reference outputs"]
    report = {
        "schema": _SCHEMA, "kind": "mnn-llm",
        "model": {"name": manifest.name, "version": manifest.version, "sha256": manifest.sha256,
                  "format": "mnn-llm", "quant_bits": facts.get("quant_bits"),
                  "quant_block": facts.get("quant_block"), "weight_quantized":
                  bool(facts.get("quant_bits"))},
        "reference": ({"kind": "golden", "variant_checked": True,
                       "samples": len(reference.prompts),
                       "note": "greedy tokens expected for the reference prompts"}
                      if reference else
                      {"kind": "none", "variant_checked": False,
                       "note": "no reference outputs in the package: loading and decoding "
                               "were checked, correctness was not"}),
        "candidates": results, "skipped": [], "configured": None,
        "pick": pick.to_dict() if pick else None, "pick_reasons": reasons,
        "build": {}, "environment": {"cores": os.cpu_count()}, "started_at": started,
        "duration_s": round(time.monotonic() - t0, 3),
        # MNN's mmap caches forced off (plaintext stays in memory): what the package asked
        "memory_only": {"forced": links.forced, "use_mmap": False, "kvcache_mmap": False},
    }
    return report, pick


def _measure(config_path: str, cfg: RuntimeConfig, reference: Any, iterations: int
             ) -> dict[str, Any]:
    from fleet_agent.lora_packs import check_reference
    from fleet_agent.serve import _load_llm

    row: dict[str, Any] = {"label": cfg.label(), "config": cfg.to_dict(),
                           "requested_backend": "cpu", "effective_backend": "cpu",
                           "fell_back": False, "role": "candidate", "status": "error",
                           "conditions": {"threads": cfg.threads, "precision": cfg.precision,
                                          "memory": cfg.memory, "power": cfg.power,
                                          "warmup": 1, "iterations": iterations,
                                          "sampler": "greedy"}}
    t = time.monotonic_ns()
    try:
        llm = _load_llm(config_path, {"backend_type": "cpu", "thread_num": cfg.threads,
                                      "precision": cfg.precision, "memory": cfg.memory})
    except errors.FleetError as exc:
        row["error"] = exc.message
        return row
    row["load_ms"] = round((time.monotonic_ns() - t) / 1e6, 3)

    def gen(ids: list[int], n: int) -> list[int]:
        llm._c_obj.reset()
        return [int(x) for x in llm._c_obj.generate(ids, n)]

    prompt: list[int] = list(reference.prompts[0]) if reference else [1, 2, 3]
    n: int = int(reference.max_new_tokens) if reference else 8
    gen(prompt, n)  # warm-up
    samples = []
    for _ in range(max(1, iterations)):
        t = time.monotonic_ns()
        out = gen(prompt, n)
        samples.append((time.monotonic_ns() - t) / 1e6 / max(1, len(out)))
    samples.sort()
    row["timing"] = {"min_ms": round(samples[0], 4),
                     "median_ms": round(samples[len(samples) // 2], 4),
                     "p90_ms": round(samples[min(len(samples) - 1, int(0.9 * len(samples)))], 4),
                     "max_ms": round(samples[-1], 4), "unit": "ms per generated token"}
    if reference is not None:
        try:
            row["comparison"] = check_reference(gen, reference, adapter="base")
        except errors.ReferenceMismatchError as exc:
            row["status"] = "failed"
            row["reasons"] = [exc.message]
            return row
    row["status"] = "passed"
    return row
