"""Write the pick into the model's runtime config, and read a runtime config back.

Two forms (ARCHITECTURE "The agent's brain", step 4):
- a plain model: ``slots/<name>/runtime.json`` (``fleet.runtime/1``): names for people
  (``backend``, ``precision``, ``memory``, ``power``, ``threads``) and ``mnn_config``, the
  exact dict handed to pymnn, with the integers pymnn needs (FIELD-NOTES 5: strings for
  ``memory``/``power`` are silently ignored there).
- an MNN-LLM folder: its ``config.json`` keys ``backend_type``, ``precision``, ``memory``,
  ``thread_num`` are updated in place, other keys kept (MNN-LLM parses these as strings).

Writes are atomic (temp file, fsync, rename), so a crash leaves the old or the new file.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fleet.core.errors import StoreError
from fleet.core.mnn.session import RuntimeConfig
from fleet_agent.policy import Pick

__all__ = ["LLM_KEYS", "RUNTIME_FILE", "RUNTIME_SCHEMA", "is_llm_folder",
           "read_runtime_config", "write_runtime_config"]

RUNTIME_FILE = "runtime.json"
RUNTIME_SCHEMA = "fleet.runtime/1"
#: Keys by which a ``config.json`` is recognised as an MNN-LLM model folder's.
LLM_KEYS = ("llm_model", "llm_weight", "backend_type", "tokenizer_file", "thread_num")


def _atomic_write(path: Path, data: dict[str, Any]) -> None:
    """temp (``O_EXCL | O_NOFOLLOW``: a planted link is never written through) + fsync +
    rename + fsync(dir)."""
    from fleet.core.fsutil import atomic_write

    atomic_write(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StoreError(f"runtime config {path} unreadable: {exc}", path=str(path)) from exc
    if not isinstance(data, dict):
        raise StoreError(f"runtime config {path} is not a JSON object", path=str(path))
    return data


def is_llm_folder(target: Path) -> bool:
    cfg = Path(target) / "config.json"
    if not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and any(k in data for k in LLM_KEYS)


def _as_config(pick: Pick | RuntimeConfig | Mapping[str, Any]) -> tuple[RuntimeConfig,
                                                                         list[str]]:
    if isinstance(pick, Pick):
        return pick.config, list(pick.reasons)
    if isinstance(pick, RuntimeConfig):
        return pick, []
    return RuntimeConfig.from_dict(pick), list(pick.get("reasons", []))


def write_runtime_config(target: Path, pick: Pick | RuntimeConfig | Mapping[str, Any], *,
                         reasons: Sequence[str] = (), extra: Mapping[str, Any] | None = None
                         ) -> Path:
    """Write ``pick`` for the model at ``target`` (a slot folder or an MNN-LLM folder).

    Returns the file written. ``extra`` is merged into ``runtime.json`` (e.g. the report id).
    """
    target = Path(target)
    cfg, why = _as_config(pick)
    why = [*why, *reasons]
    if not target.is_dir():
        raise StoreError(f"no model folder at {target}", path=str(target))
    if is_llm_folder(target):
        path = target / "config.json"
        data = _load_json(path)
        data.update({"backend_type": cfg.backend, "precision": cfg.precision,
                     "memory": cfg.memory, "thread_num": cfg.threads})
        _atomic_write(path, data)
        return path
    path = target / RUNTIME_FILE
    data = {"schema": RUNTIME_SCHEMA, **cfg.to_dict(), "mnn_config": cfg.schedule(),
            "reasons": why,
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if extra:
        data.update(dict(extra))
    _atomic_write(path, data)
    return path


def read_runtime_config(target: Path) -> dict[str, Any] | None:
    """The runtime config for the model at ``target``, normalised, or None when absent.

    ``target``: a slot folder, an MNN-LLM folder, or a JSON file. The result holds the
    normalised ``backend``/``precision``/``memory``/``power``/``threads`` (``None`` for a
    value that cannot be read), ``format`` (``fleet`` | ``mnn-llm`` | ``pymnn``), ``path``,
    and ``raw``: the file as written, which the audit reads (FA006 looks at value types).
    """
    target = Path(target)
    if target.is_file():
        path = target
    elif is_llm_folder(target):
        path = target / "config.json"
    elif (target / RUNTIME_FILE).is_file():
        path = target / RUNTIME_FILE
    else:
        return None
    raw = _load_json(path)
    if path.name == "config.json" and any(k in raw for k in LLM_KEYS):
        fmt = "mnn-llm"
        view = {"backend": raw.get("backend_type", "cpu"),
                "precision": raw.get("precision", "low"), "memory": raw.get("memory", "low"),
                "power": raw.get("power", "normal"), "threads": raw.get("thread_num", 4)}
    elif "numThread" in raw or (isinstance(raw.get("backend"), int)):
        fmt = "pymnn"
        view = {"backend": raw.get("backend", 0), "precision": raw.get("precision", 0),
                "memory": raw.get("memory", 0), "power": raw.get("power", 0),
                "threads": raw.get("numThread", 1)}
    else:
        fmt = "fleet"
        view = {k: raw.get(k, d) for k, d in (("backend", "cpu"), ("precision", "normal"),
                                               ("memory", "normal"), ("power", "normal"),
                                               ("threads", 1))}
    out: dict[str, Any] = {"format": fmt, "path": str(path), "raw": raw}
    out.update(_normalise(view))
    return out


def _normalise(view: Mapping[str, Any]) -> dict[str, Any]:
    """Names for every field that can be read; a value pymnn would ignore becomes None."""
    from fleet.core.mnn.session import (
        BACKEND_CODES,
        MEMORY_MODES,
        POWER_MODES,
        PRECISION_MODES,
        backend_name,
    )

    out: dict[str, Any] = {}
    backend = view.get("backend")
    if isinstance(backend, int) and not isinstance(backend, bool):
        out["backend"] = backend_name(backend)
    elif isinstance(backend, str) and backend.lower() in BACKEND_CODES:
        out["backend"] = backend.lower()
    else:
        out["backend"] = None
    for key, table in (("precision", PRECISION_MODES), ("memory", MEMORY_MODES),
                       ("power", POWER_MODES)):
        value = view.get(key)
        name = None
        if isinstance(value, str) and value.lower() in table:
            name = value.lower()
        elif isinstance(value, int) and not isinstance(value, bool):
            name = next((n for n, c in table.items() if c == value), None)
        out[key] = name
    threads = view.get("threads")
    out["threads"] = threads if isinstance(threads, int) and threads > 0 else None
    return out
