"""GPU cache files: one per model per device per backend, with a sidecar saying whose.

Why (FIELD-NOTES 4b): OpenCL/Vulkan cache files hold programs compiled for one device and
driver and tuning for one model's shapes. MNN does not repair a wrong one. So the agent
keeps them at ``cache/<model digest>/<backend>/mnn.cache`` and writes ``owner.json`` next
to the file when it creates the path: device id, model digest, backend, driver, MNN
version. A cache file without a matching sidecar was not made here for this model (copied
from another device, restored from a backup, shared between models) and is never used;
the audit reports it (FA007).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet.core.fsutil import atomic_write

__all__ = ["CACHE_NAME", "SIDECAR_NAME", "CacheCheck", "check_cache_dir", "gpu_driver",
           "prepare_cache", "scan_caches"]

CACHE_NAME = "mnn.cache"
SIDECAR_NAME = "owner.json"


def gpu_driver(probe: Mapping[str, Any], backend: str) -> str | None:
    """The driver version string of the first device of ``backend`` in the probe."""
    from fleet_agent.candidates import probe_gpu_devices

    section = (probe.get("gpu") or {}).get(backend) or {}
    for dev in probe_gpu_devices(probe, backend):
        if dev.get("driver_version"):
            return str(dev["driver_version"])
    value = section.get("driver_version_string") or section.get("driver_version")
    return None if value is None else str(value)


@dataclass(frozen=True)
class CacheCheck:
    path: Path
    backend: str
    ok: bool
    reason: str
    owner: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "backend": self.backend, "ok": self.ok,
                "reason": self.reason, "owner": self.owner}


def check_cache_dir(directory: Path, *, device_id: str, model_digest: str,
                    driver: str | None = None) -> CacheCheck:
    """Is the cache file in ``directory`` this device's, for this model (and driver)?"""
    backend = directory.name
    sidecar = directory / SIDECAR_NAME
    owner: dict[str, Any] | None = None
    if sidecar.is_file():
        try:
            loaded = json.loads(sidecar.read_text())
            owner = loaded if isinstance(loaded, dict) else None
        except (OSError, ValueError):
            owner = None
    cache = directory / CACHE_NAME
    if owner is None:
        return CacheCheck(cache, backend, False, "no readable owner sidecar: not made here",
                          None)
    if owner.get("device_id") != device_id:
        return CacheCheck(cache, backend, False,
                          f"made on device {owner.get('device_id')!r}, not this one", owner)
    if owner.get("model_digest") != model_digest:
        return CacheCheck(cache, backend, False,
                          f"made for model {str(owner.get('model_digest'))[:12]}, not this one",
                          owner)
    if directory.parent.name != model_digest:
        return CacheCheck(cache, backend, False,
                          "sits under another model's cache folder (shared cache)", owner)
    if driver is not None and owner.get("driver") not in (None, driver):
        return CacheCheck(cache, backend, False,
                          f"made with driver {owner.get('driver')!r}, now {driver!r}", owner)
    return CacheCheck(cache, backend, True, "made on this device for this model", owner)


def prepare_cache(cache_root: Path, *, model_digest: str, backend: str, device_id: str,
                  driver: str | None, mnn_version: str) -> tuple[Path | None, CacheCheck]:
    """The cache file to hand MNN for this candidate, or None when the existing one is foreign.

    A fresh directory gets its sidecar first, so every cache file MNN writes there is owned.
    """
    directory = Path(cache_root) / model_digest / backend
    if (directory / CACHE_NAME).exists() or (directory / SIDECAR_NAME).exists():
        check = check_cache_dir(directory, device_id=device_id, model_digest=model_digest,
                                driver=driver)
        return (check.path if check.ok else None), check
    directory.mkdir(parents=True, exist_ok=True)
    owner = {"device_id": device_id, "model_digest": model_digest, "backend": backend,
             "driver": driver, "mnn_version": mnn_version,
             "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write(directory / SIDECAR_NAME,  # O_EXCL | O_NOFOLLOW temp file
                 json.dumps(owner, indent=2, sort_keys=True).encode())
    return directory / CACHE_NAME, CacheCheck(directory / CACHE_NAME, backend, True,
                                              "new cache path owned by this device", owner)


def scan_caches(cache_root: Path, *, device_id: str, model_digest: str | None = None
                ) -> list[CacheCheck]:
    """Check every ``<digest>/<backend>/`` folder holding a cache file (all models, or one).

    A folder under another digest is checked against its own digest: what is flagged is a
    file not made on this device, or one whose sidecar names another model.
    """
    root = Path(cache_root)
    if not root.is_dir():
        return []
    results: list[CacheCheck] = []
    for digest_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if model_digest is not None and digest_dir.name != model_digest:
            continue
        for backend_dir in sorted(p for p in digest_dir.iterdir() if p.is_dir()):
            if not any(f.name != SIDECAR_NAME and f.is_file() for f in backend_dir.iterdir()):
                continue
            results.append(check_cache_dir(backend_dir, device_id=device_id,
                                           model_digest=digest_dir.name))
    return results
