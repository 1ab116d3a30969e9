"""Install the agent on a board that has Python but no network.

The controller builds a wheelhouse once (``pip wheel``: the project, built natively, and
every dependency), caches it, pushes it through the device's transport (resumable,
sha256-verified; wheels the board already holds are not sent again), makes a virtualenv
on the board (``python3 -m venv``), installs offline (``pip install --no-index
--find-links``), and checks the result with ``fleet-agent status``.

The wheelhouse matches the controller's interpreter and machine (``cp311-x86_64`` here):
the agent has native parts (MNN, numpy, cryptography, the runtime module). A board with
another Python or architecture is refused with a clear error instead of a broken install.
Cache layout: ``<cache>/deps-<tag>-<hash of the dependency list>/`` (slow to build: it
downloads) and ``<cache>/project-<tag>-<hash of the sources>/`` (the native build).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet.core import errors
from fleet.core.filelock import exclusive
from fleet.core.fsutil import sha256_file
from fleet.transports.base import Transport

__all__ = ["BootstrapResult", "Wheelhouse", "bootstrap", "build_wheelhouse", "python_tag"]

Log = Callable[[str], None]
_PIP_ENV = "PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1"
_SOURCES = ("pyproject.toml", "fleet", "agents", "runtime")


def python_tag() -> str:
    """The controller's interpreter and machine, which the wheelhouse is built for."""
    return f"cp{sys.version_info[0]}{sys.version_info[1]}-{platform.machine()}"


@dataclass
class Wheelhouse:
    wheels: list[Path]
    project_wheel: Path
    tag: str
    build_s: float  #: time spent building in this call (0 when fully cached)
    cached: bool


@dataclass
class BootstrapResult:
    device: str
    venv: str
    agent_cmd: list[str]
    wheels: int
    wheels_sent: int
    bytes_sent: int
    agent_status: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


def _project_root() -> Path:
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").exists():
        raise errors.UsageError("bootstrap needs the project's source checkout to build the "
                                "agent's wheel (or pass a ready wheelhouse)")
    return root


def _source_key(root: Path) -> str:
    """Cheap content key for the project wheel: paths, sizes and mtimes of its sources."""
    h = hashlib.sha256()
    for top in _SOURCES:
        base = root / top
        paths = [base] if base.is_file() else sorted(
            p for p in base.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        for p in paths:
            st = p.stat()
            h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with exclusive(directory / ".lock"):
        yield


def _pip_wheel(args: list[str], out: Path, log: Log, timeout: float) -> None:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    argv = [sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(tmp), *args]
    log(f"$ {shlex.join(argv)}")
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise errors.FleetError(f"pip wheel did not finish in {timeout:g}s") from exc
    if res.returncode != 0:
        raise errors.FleetError(f"pip wheel failed: {res.stderr.strip()[-2000:]}",
                                argv=argv)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def build_wheelhouse(cache_dir: Path, *, rebuild: bool = False, log: Log = lambda _: None,
                     project_root: Path | None = None) -> Wheelhouse:
    """The wheels that install the agent offline, built once and cached under ``cache_dir``."""
    root = project_root or _project_root()
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    tag = python_tag()
    deps_key = hashlib.sha256(json.dumps(deps).encode()).hexdigest()[:12]
    deps_dir = cache_dir / f"deps-{tag}-{deps_key}"
    proj_dir = cache_dir / f"project-{tag}-{_source_key(root)}"
    start = time.monotonic()
    cached = True
    with _locked(cache_dir):
        if rebuild or not list(deps_dir.glob("*.whl")):
            cached = False
            log(f"building dependency wheels for {tag} (downloads; cached afterwards)")
            _pip_wheel(list(deps), deps_dir, log, timeout=1800)
        if rebuild or not list(proj_dir.glob("mnn_fleet-*.whl")):
            cached = False
            log("building the mnn-fleet wheel (native runtime)")
            _pip_wheel(["--no-deps", "--no-build-isolation", str(root)], proj_dir, log,
                       timeout=1800)
            for old in cache_dir.glob(f"project-{tag}-*"):
                if old != proj_dir and old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
    project = sorted(proj_dir.glob("mnn_fleet-*.whl"))[-1]
    wheels = sorted(w for w in deps_dir.glob("*.whl") if not w.name.startswith("mnn_fleet-"))
    return Wheelhouse(wheels=[*wheels, project], project_wheel=project, tag=tag,
                      build_s=0.0 if cached else time.monotonic() - start, cached=cached)


def _remote(t: Transport, script: str, *args: str, timeout: float = 120.0,
            what: str = "command") -> str:
    res = t.run(["sh", "-c", script, "sh", *args], timeout=timeout)
    if not res.ok:
        raise errors.RemoteFileError(
            f"bootstrap {what} failed ({res.exit_code}): "
            f"{(res.stderr or res.stdout).decode(errors='replace').strip()[-2000:]}",
            exit_code=res.exit_code)
    return res.stdout.decode(errors="replace")


def bootstrap(t: Transport, device: str, house: Wheelhouse, *, venv: str, agent_root: str,
              python: str = "python3", keep_wheels: bool = False, log: Log = lambda _: None
              ) -> BootstrapResult:
    """Install the agent from ``house`` into ``venv`` on the device behind ``t``."""
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    probe = _remote(t, '"$1" -c "import sys, platform; print(\'cp%d%d-%s\' % '
                       '(sys.version_info[0], sys.version_info[1], platform.machine()))"',
                    python, what=f"{python} probe").strip()
    if probe != house.tag:
        raise errors.UsageError(
            f"{device} runs {probe}, the wheelhouse is for {house.tag}; build the wheelhouse "
            "on a controller with the board's Python and architecture", device=device,
            board=probe, wheelhouse=house.tag)
    wheel_dir = venv.rstrip("/") + ".wheels"
    have: dict[str, str] = {}
    listing = _remote(t, 'mkdir -p -- "$1" && cd -- "$1" && for f in *.whl; do '
                         '[ -f "$f" ] && sha256sum -- "$f"; done; true', wheel_dir,
                      timeout=300, what="wheel listing")
    for line in listing.splitlines():
        digest, _, name = line.partition("  ")
        have[name.strip()] = digest
    sent = n_sent = 0
    for wheel in house.wheels:
        if have.get(wheel.name) == sha256_file(wheel):
            continue
        pushed = t.push(wheel, f"{wheel_dir}/{wheel.name}")
        sent += pushed.bytes_sent
        n_sent += 1
    timings["push_s"] = time.monotonic() - t0
    log(f"{device}: {n_sent}/{len(house.wheels)} wheels sent ({sent / (1 << 20):.1f} MiB)")
    t1 = time.monotonic()
    venv_abs = _remote(
        t, '[ -x "$1/bin/python" ] || "$2" -m venv -- "$1" || exit 1; cd -- "$1" && pwd -P',
        venv, python, timeout=300, what="venv creation").strip()
    project = f"{wheel_dir}/{house.project_wheel.name}"
    pip = f"{venv_abs}/bin/pip"
    _remote(t, f'{_PIP_ENV} "$1" install -q --no-index --find-links "$2" "$3" && '
               f'{_PIP_ENV} "$1" install -q --no-index --no-deps --force-reinstall "$3"',
            pip, wheel_dir, project, timeout=1200, what="pip install")
    timings["install_s"] = time.monotonic() - t1
    if not keep_wheels:
        _remote(t, 'rm -rf -- "$1"', wheel_dir, what="cleanup")
    agent = [f"{venv_abs}/bin/fleet-agent"]
    res = t.run([*agent, "--root", agent_root, "status"], timeout=120)
    try:
        doc = json.loads(res.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        raise errors.AgentError(f"{device}: installed agent did not answer `status`: "
                                f"{res.stderr.decode(errors='replace')[-1000:]}") from exc
    if not doc.get("ok"):
        raise errors.AgentError(f"{device}: installed agent reports failure: {doc}")
    timings["total_s"] = time.monotonic() - t0
    return BootstrapResult(device=device, venv=venv_abs, agent_cmd=agent,
                           wheels=len(house.wheels), wheels_sent=n_sent, bytes_sent=sent,
                           agent_status=doc, timings=timings)
