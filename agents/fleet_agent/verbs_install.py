"""Install and health verbs: ``stage``, ``activate``, ``rollback``, ``bench``, ``audit``.

``activate`` is where the store and the brain meet: the staged version is decrypted into
memory, every candidate backend is measured against the reference, and only when one
passes does the slot switch. A model that fails its health check never becomes active; the
previous one keeps serving.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fleet.core import errors
from fleet_agent.context import AgentContext

__all__ = ["activate", "audit", "bench", "rollback", "stage"]


def _store(ctx: AgentContext) -> Any:
    from fleet_agent.store import Store
    ctx.ensure()
    return Store(ctx)


def _probe(ctx: AgentContext) -> dict[str, Any]:
    try:
        from fleet_agent.probe import probe
    except ImportError:  # native module missing: a minimal document from Python
        import platform
        return {"schema": "fleet.probe/1", "cpu": {"arch": platform.machine(), "features": {}},
                "gpu": {}, "source": "python-fallback"}
    doc: dict[str, Any] = probe()
    return doc


def _version_dir(ctx: AgentContext, name: str, version: int) -> Path:
    """Per-version runtime config: switching slots switches config with it, atomically."""
    d = ctx.slots / name / f"v{version}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _report_path(ctx: AgentContext, name: str, version: int) -> Path:
    return ctx.reports / f"{name}.v{version}.health.json"


def _save_json(path: Path, data: dict[str, Any]) -> None:
    from fleet.core.fsutil import atomic_write  # O_EXCL | O_NOFOLLOW temp file

    atomic_write(path, json.dumps(data, sort_keys=True, default=str).encode())


def _summary(name: str, version: int, digest: str, health: dict[str, Any],
             runtime: dict[str, Any] | None) -> dict[str, Any]:
    """The controller's view of one health report: configured/effective/recommended."""
    pick = health.get("pick") or None
    cands = health.get("candidates") or []
    picked = next((c for c in cands if pick and c.get("label") == pick.get("label")), None)
    cpu = [c for c in cands if c.get("requested_backend") == "cpu" and c.get("status") ==
           "passed" and c.get("timing")]
    cpu_ms = min((c["timing"]["median_ms"] for c in cpu), default=None)
    configured = health.get("configured") or {}
    configured_backend = (runtime or {}).get("backend") or configured.get("backend") or "cpu"
    effective = configured.get("effective_backend") or (picked or {}).get("effective_backend")
    return {"name": name, "version": version, "digest": digest,
            "configured_backend": configured_backend, "effective_backend": effective,
            "recommended_backend": pick.get("backend") if pick else None,
            "pick": {**pick, "effective_backend": (picked or {}).get("effective_backend")}
            if pick else None,
            "median_ms": pick.get("median_ms") if pick else None, "cpu_median_ms": cpu_ms,
            "pick_reasons": health.get("pick_reasons"), "reference": health.get("reference"),
            "emulated": health.get("emulated"),
            "timings_representative": health.get("timings_representative", True),
            "candidates": [{k: c.get(k) for k in ("label", "status", "effective_backend",
                                                  "fell_back", "timing", "comparison",
                                                  "reasons", "role", "error", "crash")}
                           for c in cands]}


def _health(ctx: AgentContext, store: Any, name: str, version: int, args: dict[str, Any],
            probe: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    from fleet.core.golden import Golden
    from fleet_agent.healthbench import health_check
    from fleet_agent.runtime_config import read_runtime_config

    with store.open_payload(name, version) as opened:
        manifest = opened.manifest
        if (manifest.mnn or {}).get("format") == "mnn-llm":
            from fleet_agent.llm_health import llm_health
            llm_report, llm_pick = llm_health(ctx, opened, probe=probe, args=args)
            return manifest, llm_report | {"_pick_obj": llm_pick}
        golden = Golden.load(opened.golden) if opened.golden else None
        configured = read_runtime_config(_version_dir(ctx, name, version))
        report = health_check(opened.entry, probe=probe, golden=golden, cache_dir=ctx.cache,
                              warmup=int(args.get("warmup", 3)),
                              iterations=int(args.get("iterations", 10)),
                              configured=configured, model_digest=manifest.sha256,
                              device_id=store.fingerprint,
                              input_spec=(manifest.mnn or {}).get("input_spec"))
    return manifest, report.to_dict() | {"_pick_obj": report.pick}


def stage(ctx: AgentContext, args: dict[str, Any]) -> dict[str, Any]:
    """``path``: the pushed package; ``envelope``: this device's key envelope (base64;
    format-2 packages); ``order``, ``trust``, ``controller_time``: see Store.stage."""
    from fleet.core.package.envelope import envelope_from_text

    path = args.get("path")
    if not path:
        raise errors.UsageError("stage needs 'path' (the pushed package)")
    staged = _store(ctx).stage(path, order=args.get("order"), trust=args.get("trust"),
                               controller_time=args.get("controller_time"),
                               envelope=envelope_from_text(args.get("envelope")))
    with_remove = args.get("remove_incoming", True)
    if with_remove and Path(path).resolve().parent == ctx.incoming.resolve():
        Path(path).unlink(missing_ok=True)  # the verified copy lives in store/
    result: dict[str, Any] = staged.to_dict()
    return result


def activate(ctx: AgentContext, args: dict[str, Any]) -> dict[str, Any]:
    from fleet_agent.runtime_config import write_runtime_config

    name, version = str(args["name"]), int(args["version"])
    store = _store(ctx)
    probe = _probe(ctx)
    manifest, health = _health(ctx, store, name, version, args, probe)
    pick = health.pop("_pick_obj")
    _save_json(_report_path(ctx, name, version), health)
    if pick is None:  # refused: its package goes and it does not raise the floor
        store.refuse(name, version, "; ".join(health.get("pick_reasons") or []) or "health")
        raise errors.HealthCheckError(
            f"{name}@{version}: no backend produced correct outputs; not activated "
            f"({'; '.join(health.get('pick_reasons') or [])})", name=name, version=version,
            candidates=[(c["label"], c["status"], c.get("reasons")) for c in
                        health.get("candidates", [])])
    write_runtime_config(_version_dir(ctx, name, version), pick,
                         extra={"model": name, "model_version": version})
    change = store.activate(name, version)
    body = _summary(name, version, manifest.sha256, health,
                    {"backend": pick.config.backend})
    body["configured_backend"] = pick.config.backend  # we just wrote the pick into the config
    body["findings"] = _findings(ctx, store, name, version, health, probe)
    body["previous"] = change.previous
    body["probe"] = probe
    return {"report": body}


def rollback(ctx: AgentContext, args: dict[str, Any]) -> dict[str, Any]:
    store = _store(ctx)
    change = store.rollback(str(args["name"]), order=args.get("order"),
                            trust=args.get("trust"), controller_time=args.get("controller_time"))
    result: dict[str, Any] = change.to_dict()
    return result


def _active_names(store: Any, only: str | None) -> list[tuple[str, int]]:
    out = []
    for name, info in store.installed().items():
        if info.get("active") is not None and info.get("kind", "model") == "model" and \
                (only is None or name == only):
            out.append((name, int(info["active"])))
    return out


def bench(ctx: AgentContext, args: dict[str, Any]) -> dict[str, Any]:
    """Re-measure the active model(s); reports only, the config is not changed."""
    store = _store(ctx)
    probe = _probe(ctx)
    models = []
    for name, version in _active_names(store, args.get("name")):
        manifest, health = _health(ctx, store, name, version, args, probe)
        health.pop("_pick_obj")
        _save_json(_report_path(ctx, name, version), health)
        from fleet_agent.runtime_config import read_runtime_config
        runtime = read_runtime_config(_version_dir(ctx, name, version))
        body = _summary(name, version, manifest.sha256, health, runtime)
        body["findings"] = _findings(ctx, store, name, version, health, probe)
        models.append(body)
    if not models:
        raise errors.NoActiveModelError("no active model to benchmark")
    return {"models": models, "report": models[0] if len(models) == 1 else
            {"models": models}}


def _findings(ctx: AgentContext, store: Any, name: str, version: int,
              health: dict[str, Any] | None, probe: dict[str, Any]) -> list[dict[str, Any]]:
    from fleet_agent.audit_rules import audit as run_rules
    from fleet_agent.runtime_config import read_runtime_config

    manifest = store.manifest(name, version)
    found = run_rules(health, probe=probe,
                      runtime_config=read_runtime_config(_version_dir(ctx, name, version)),
                      cache_root=ctx.cache, model_digest=manifest.sha256,
                      device_id=store.fingerprint)
    return [f.to_dict() for f in found]


def audit(ctx: AgentContext, args: dict[str, Any]) -> dict[str, Any]:
    """Findings for every active model, from its last health report and current config."""
    from fleet_agent.runtime_config import read_runtime_config

    store = _store(ctx)
    probe = _probe(ctx)
    models = []
    for name, version in _active_names(store, args.get("name")):
        path = _report_path(ctx, name, version)
        health = json.loads(path.read_text()) if path.exists() else None
        runtime = read_runtime_config(_version_dir(ctx, name, version))
        manifest = store.manifest(name, version)
        body = _summary(name, version, manifest.sha256, health or {}, runtime)
        body["findings"] = _findings(ctx, store, name, version, health, probe)
        body["measured_at"] = (health or {}).get("started_at")
        models.append(body)
    return {"models": models, "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                          time.gmtime())}
