"""Which MNN backends this MNN build really has: found by trying them, cached per version.

Why try instead of reading a list: the PyPI wheel names every backend in its Python enums
(``MNN.expr.Backend.OPENCL`` exists on a CPU-only build), and a build that has a backend
still falls back when the driver is missing. The only honest answer is to create a session
on each backend and look at what MNN used (the fallback log line and the session's backend
type). A backend that "exists" but always falls back is not usable here, so it is False.

The trial runs in a child process: a broken GPU driver may crash the process that
initialises it, and the agent must survive that. The answer is cached in the device
root under the MNN version, so the trial runs once per MNN upgrade.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from fleet.core.fsutil import atomic_write
from fleet.core.mnn.fdcapture import capture_fds
from fleet.core.mnn.session import GPU_BACKENDS, LoadedModel, RuntimeConfig, mnn, mnn_version

__all__ = ["TRIED_BACKENDS", "build_backend_details", "build_cpu_kernels",
           "detect_build_backends"]

#: Backends worth a trial besides the CPU (which every build has).
TRIED_BACKENDS: tuple[str, ...] = (*GPU_BACKENDS, "nn")
_TRIAL_TIMEOUT_S = 120.0


#: Byte markers of CPU kernel families in MNN's engine library (function and file names).
_KERNEL_MARKERS: dict[str, bytes] = {
    "sse": b"_SSE_", "avx2": b"AVX2Backend", "avx512": b"_AVX512_", "vnni": b"VNNI",
    "arm82_fp16": b"Arm82",
}


def _engine_libraries() -> list[Path]:
    import importlib.util

    found: list[Path] = []
    spec = importlib.util.find_spec("_mnncengine")
    if spec is not None and spec.origin:
        found.append(Path(spec.origin))
    pkg = Path(mnn().__file__).parent
    found.extend(sorted(pkg.parent.glob("libMNN*.so*")) + sorted(pkg.glob("libMNN*.so*")))
    return [p for p in found if p.is_file()]


def build_cpu_kernels() -> dict[str, Any]:
    """Which CPU kernel families the MNN library contains, read from its bytes.

    Why: the x86-64 wheel's kernels stop at AVX2 (FIELD-NOTES 5) and fp16 compute on Arm
    needs a build with ``MNN_ARM82``; nothing in pymnn says so, but the kernels' symbol
    names are in the library. ``None`` values mean no library was found to read.
    """
    libs = _engine_libraries()
    if not libs:
        return {"library": None, **{k: None for k in _KERNEL_MARKERS}}
    hits = dict.fromkeys(_KERNEL_MARKERS, False)
    overlap = max(len(m) for m in _KERNEL_MARKERS.values())
    with libs[0].open("rb") as fh:
        tail = b""
        while chunk := fh.read(4 << 20):
            window = tail + chunk
            for key, marker in _KERNEL_MARKERS.items():
                if not hits[key] and marker in window:
                    hits[key] = True
            tail = window[-overlap:]
    return {"library": str(libs[0]), **hits}


def _cache_file(cache_dir: Path, version: str) -> Path:
    return Path(cache_dir) / f"mnn-build-backends-{version}.json"


def _write_probe_model(path: Path) -> None:
    """A 1x4 ReLU graph: enough for MNN to create a session on any backend."""
    import numpy as np

    mod = mnn()
    F = mod.expr
    with capture_fds():
        x = F.placeholder([1, 4], F.NCHW, F.float)
        x.name = "x"
        y = F.relu(x * F.const(np.array([1, -2, 3, -4], np.float32), [4]))
        y.name = "y"
        F.save([y], str(path))


def _trial(model: Path) -> dict[str, Any]:
    """Create a session on every backend; return what MNN really used for each."""
    detail: dict[str, Any] = {"cpu": {"present": True, "effective": "cpu", "log": []}}
    for name in TRIED_BACKENDS:
        try:
            loaded = LoadedModel.open(str(model), RuntimeConfig(backend=name, threads=4))
        except Exception as exc:  # a backend that cannot even start is absent
            detail[name] = {"present": False, "effective": None, "error": str(exc),
                            "log": []}
            continue
        detail[name] = {"present": not loaded.fell_back,
                        "effective": loaded.effective_backend,
                        "fallbacks": [f.to_dict() for f in loaded.fallbacks],
                        "log": loaded.log[:10]}
        loaded.close()
    return detail


def build_backend_details(cache_dir: Path, *, refresh: bool = False,
                          isolate: bool = True) -> dict[str, Any]:
    """The cached trial document: ``{"mnn_version", "backends": {name: bool}, "detail",
    "cpu_kernels", "cpu_runtime"}`` (``cpu_runtime``: MNN's load-time CPU line,
    :mod:`fleet_agent.mnn_cpu`, re-read when the CPU changes)."""
    from fleet_agent.mnn_cpu import cpu_key, mnn_cpu_runtime

    version = mnn_version()
    cache = _cache_file(cache_dir, version)
    key = cpu_key()
    if not refresh and cache.is_file():
        try:
            doc: dict[str, Any] = json.loads(cache.read_text())
            if doc.get("mnn_version") == version and isinstance(doc.get("backends"), dict):
                if (doc.get("cpu_runtime") or {}).get("cpu_key") != key:
                    # MNN's own CPU line depends on the CPU, not only on the MNN version
                    doc["cpu_runtime"] = {**mnn_cpu_runtime(), "cpu_key": key}
                    atomic_write(cache, json.dumps(doc, indent=2, sort_keys=True).encode())
                return doc
        except (OSError, ValueError):
            pass  # a damaged cache is re-made below
    with tempfile.TemporaryDirectory(prefix="fleet-backends-") as tmp:
        model = Path(tmp) / "probe.mnn"
        _write_probe_model(model)
        detail = _trial_in_child(model) if isolate else _trial(model)
    doc = {"mnn_version": version,
           "backends": {name: bool(info.get("present")) for name, info in detail.items()},
           "detail": detail, "cpu_kernels": build_cpu_kernels(),
           "cpu_runtime": {**mnn_cpu_runtime(), "cpu_key": key}}
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cache, json.dumps(doc, indent=2, sort_keys=True).encode())  # O_NOFOLLOW
    return doc


def _trial_in_child(model: Path) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "fleet_agent.backends", str(model)],
                          capture_output=True, text=True, timeout=_TRIAL_TIMEOUT_S,
                          check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        result: dict[str, Any] = json.loads(lines[-1])
        return result
    # The child died (a driver crashed it): only the CPU is known to work.
    detail: dict[str, Any] = {"cpu": {"present": True, "effective": "cpu", "log": []}}
    for name in TRIED_BACKENDS:
        detail[name] = {"present": False, "effective": None,
                        "error": f"backend trial process failed (exit {proc.returncode})",
                        "log": proc.stderr.splitlines()[-5:]}
    return detail


def detect_build_backends(cache_dir: Path, *, refresh: bool = False) -> dict[str, bool]:
    """``{"cpu": True, "opencl": False, ...}``: backends that MNN really runs on here."""
    backends: dict[str, bool] = build_backend_details(cache_dir, refresh=refresh)["backends"]
    return backends


if __name__ == "__main__":  # the child side of _trial_in_child
    sys.stdout.write(json.dumps(_trial(Path(sys.argv[1]))) + "\n")
