"""The prepared-payload cache: converted models and their golden data, keyed by what made
them.

Why: MNN's converter is not byte-deterministic on every version (it writes a random UUID
into each model), and converting and running the reference again costs seconds to minutes.
A re-run of an unchanged ``fleet deploy model.onnx`` must give the same payload (so the
same digest, the same version, and nothing sent), so the converted payload is kept under
``$FLEET_HOME/cache/prepared/<key>/`` where ``key`` is the sha256 of: the source file's
sha256, every option that changes the payload (name, variant, input shapes, the digest of
``--inputs``/``--golden``), and the converter (MNN) version. A different MNN version is a
different key, so an upgrade converts afresh.

An entry is a folder written whole (temp folder + ``os.replace``) holding the payload
files and ``spec.json`` (their sha256, the entry, the golden file, the manifest facts). An
entry whose files no longer match ``spec.json`` is ignored and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

from fleet.core.fsutil import sha256_file

__all__ = ["cache_key", "converter_version", "load_entry", "store_entry"]

_SCHEMA = "fleet.prepared/1"
_SPEC = "spec.json"


def converter_version() -> str:
    """The installed MNN distribution's version (without importing MNN)."""
    try:
        return f"MNN {metadata.version('MNN')}"
    except metadata.PackageNotFoundError:
        return "MNN unknown"


def cache_key(parts: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``parts`` plus the schema and converter version."""
    doc = {"schema": _SCHEMA, "converter": converter_version(), **parts}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


def load_entry(cache_dir: Path, key: str) -> tuple[Path, dict[str, Any]] | None:
    """(entry folder, spec) when a complete, unaltered entry exists; else None."""
    folder = cache_dir / key
    try:
        spec = json.loads((folder / _SPEC).read_text())
        for rel, digest in spec["files"].items():
            p = folder / rel
            if p.is_symlink() or not p.is_file() or sha256_file(p) != digest:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return folder, spec


def store_entry(cache_dir: Path, key: str, files: dict[str, Path], spec: dict[str, Any]
                ) -> Path:
    """Copy ``files`` (payload path -> file) into a new entry with ``spec``; return it.

    A concurrent writer of the same key wins or loses whole; the loser's copy is dropped."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{key}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        digests = {}
        for rel, src in files.items():
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            digests[rel] = sha256_file(dst)
        (tmp / _SPEC).write_text(json.dumps({**spec, "files": digests}, sort_keys=True))
        final = cache_dir / key
        if final.exists() and load_entry(cache_dir, key) is None:
            shutil.rmtree(final, ignore_errors=True)  # a damaged entry: replaced
        try:
            os.replace(tmp, final)
        except OSError:  # a complete entry is already there (another run made it)
            shutil.rmtree(tmp, ignore_errors=True)
            if load_entry(cache_dir, key) is None:
                raise
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
