"""Install the agent on a board that has Python but no network.

The controller puts together a wheelhouse (the mnn-fleet wheel and every dependency's),
caches it, pushes it through the device's transport (resumable, sha256-verified; wheels the
board already holds are not sent again), makes a virtualenv on the board (``python3 -m
venv``), installs offline (``pip install --no-index --find-links``), and checks the result
with ``fleet-agent status``.

Where the mnn-fleet wheel comes from (never from a source tree the controller happens to
sit in):

- ``--wheelhouse DIR`` (:func:`wheelhouse_from_dir`): the operator's ready wheelhouse, used
  as it is. Its tag comes from the mnn-fleet wheel in it, so a wheelhouse made on an arm64
  machine serves arm64 boards from an x86 controller.
- a wheel install (:func:`build_wheelhouse`): the installed distribution made into a wheel
  again from its dist-info ``RECORD``: the files as installed, each checked against its
  recorded sha256, with the same ``WHEEL`` tag, minus what the installer wrote (launcher
  scripts, bytecode, ``INSTALLER``, ``REQUESTED``, ``direct_url.json``). Deterministic, so
  the same install gives the same bytes and a board that holds them is not sent them again.
- an editable (development) install: ``pip wheel`` of the project the install points to
  (its PEP 610 ``direct_url.json``), built natively.

Dependencies: ``pip wheel`` of the installed distribution's runtime requirements (downloads
once, or comes from pip's cache). That wheelhouse matches the controller's interpreter and
machine (``cp311-x86_64`` here): the agent has native parts (MNN, numpy, cryptography, the
runtime module). Cache layout: ``<cache>/deps-<tag>-<hash of the requirement list>/`` (slow
to build: it downloads) and ``<cache>/project-<tag>-<key>/`` (key: the install's
``RECORD``, or the editable project's source paths, sizes and mtimes).

A board of another architecture (an aarch64 board from an x86-64 controller) is asked for
its machine, CPython version and ABI, and glibc (:mod:`fleet.bootstrap_board`), and gets a
wheelhouse made for exactly that (:func:`fleet.bootstrap_cross.wheelhouse_for`):
only the agent's dependencies, downloaded as wheels for its platform, and the project's
wheel with its native parts cross-compiled. Those wheels, pinned and closed on the
controller, are installed as files with ``--no-deps`` (the project wheel's own requirements
are the controller's). A board whose Python has no ``ensurepip`` (Debian without
``python3-venv``) gets a venv ``--without-pip`` and pip runs from the pushed pip wheel.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from fleet._version import DIST_NAME, editable_project
from fleet.bootstrap_board import BoardPlatform, ask_board
from fleet.core import errors
from fleet.core.filelock import exclusive
from fleet.core.fsutil import sha256_file
from fleet.transports.base import Transport

__all__ = ["BootstrapResult", "Wheelhouse", "bootstrap", "build_wheelhouse",
           "dependency_wheels", "python_tag", "remake_installed_wheel", "runtime_requirements",
           "wheel_board_tag", "wheelhouse_from_dir"]

Log = Callable[[str], None]
_PIP_ENV = "PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1"
_SOURCES = ("pyproject.toml", "fleet", "agents", "runtime", "migrations")
_PROJECT_GLOB = "mnn_fleet-*.whl"
#: dist-info files an installer writes; they describe one installation, not the wheel
_INSTALLER_FILES = frozenset({"INSTALLER", "REQUESTED", "direct_url.json", "RECORD"})
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed member times: the same install, the same bytes


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
    #: The pinned dependency closure these wheels are (a cross-architecture wheelhouse:
    #: the agent's dependencies only, installed as files with ``--no-deps``). Empty: the
    #: project wheel brings its requirements from the wheelhouse itself.
    requirements: list[str] = field(default_factory=list)


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
    board: dict[str, Any] = field(default_factory=dict)  #: BoardPlatform.to_dict()


def _distribution() -> metadata.Distribution:
    try:
        return metadata.distribution(DIST_NAME)
    except metadata.PackageNotFoundError as exc:
        raise errors.UsageError(
            f"{DIST_NAME} is not installed in this Python, so there is no installation to "
            "make the agent's wheel from: install it, or pass a ready --wheelhouse DIR"
        ) from exc


def runtime_requirements(dist: metadata.Distribution | None = None) -> list[str]:
    """The installed distribution's requirements without the optional extras (markers kept:
    pip evaluates them)."""
    reqs = (dist or _distribution()).requires or []
    return [r for r in reqs if "extra" not in r.partition(";")[2]]


def wheel_board_tag(wheel_name: str) -> str:
    """``cp311-x86_64`` for ``mnn_fleet-0.1.0-cp311-cp311-linux_x86_64.whl``: the board
    interpreter and machine a wheel installs on (compared with the board's own probe).

    Raises :class:`UsageError` for a name that is not a wheel of one CPython and machine.
    """
    parts = wheel_name.removesuffix(".whl").split("-")
    python = parts[-3].split(".")[0] if len(parts) >= 5 else ""
    plat = parts[-1].split(".")[0] if len(parts) >= 5 else ""
    m = re.fullmatch(r"(?:many|musl)?linux(?:1|2010|2014)?(?:_\d+_\d+)?_(\w+)", plat)
    if not wheel_name.endswith(".whl") or not re.fullmatch(r"cp\d+", python) or m is None:
        raise errors.UsageError(f"{wheel_name} is not a wheel for one CPython on Linux; "
                                "the agent has native parts", wheel=wheel_name)
    return f"{python}-{m.group(1)}"


def wheelhouse_from_dir(directory: Path) -> Wheelhouse:
    """The operator's ready wheelhouse (``--wheelhouse DIR``): every ``*.whl`` in it, as is.

    Raises :class:`UsageError` when it holds no mnn-fleet wheel, or more than one.
    """
    wheels = sorted(directory.glob("*.whl")) if directory.is_dir() else []
    projects = [w for w in wheels if w.match(_PROJECT_GLOB)]
    if len(projects) != 1:
        found = ", ".join(p.name for p in projects) or "none"
        raise errors.UsageError(
            f"the wheelhouse {directory} must hold exactly one {DIST_NAME} wheel "
            f"(found: {found}) beside its dependencies' wheels", wheelhouse=str(directory))
    project = projects[0]
    others = [w for w in wheels if w != project]
    return Wheelhouse(wheels=[*others, project], project_wheel=project,
                      tag=wheel_board_tag(project.name), build_s=0.0, cached=True)


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


def _record_hash(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _wheel_filename(dist: metadata.Distribution) -> str:
    """``name-version-tag.whl`` from the install's ``WHEEL`` file (tags compressed)."""
    tags = [line.split(":", 1)[1].strip() for line in (dist.read_text("WHEEL") or "").splitlines()
            if line.startswith("Tag:")]
    if not tags:
        raise errors.FleetError(f"the {DIST_NAME} install has no WHEEL tag to remake it with")
    split = [t.split("-") for t in tags]
    tag = "-".join(".".join(dict.fromkeys(s[i] for s in split)) for i in range(3))
    name = re.sub(r"[-_.]+", "_", dist.metadata["Name"]).lower()
    return f"{name}-{dist.version.replace('-', '_')}-{tag}.whl"


def remake_installed_wheel(dist: metadata.Distribution, out_dir: Path) -> Path:
    """Make the wheel an installation was installed from again, from its ``RECORD``.

    Takes every recorded file as installed, checking each against its recorded sha256,
    except what the installer wrote (entry-point launchers, bytecode, ``INSTALLER``,
    ``REQUESTED``, ``direct_url.json``); writes a fresh ``RECORD``. Member order, times and
    modes are fixed, so the same install gives the same bytes. Raises :class:`FleetError`
    when the install has no ``RECORD`` or ``WHEEL`` tag, a file differs from its record (an
    edited install must not be shipped to devices), or a file lies outside site-packages
    that pip would not make again (data or script files): pass ``--wheelhouse`` then.
    """
    files = dist.files
    if not files:
        raise errors.FleetError(f"the {DIST_NAME} install has no RECORD to remake it from")
    launchers = {ep.name for ep in dist.entry_points
                 if ep.group in ("console_scripts", "gui_scripts")}
    members: list[tuple[str, Path]] = []
    distinfo = ""
    for f in files:
        if f.parts[0] == "..":
            if f.name in launchers:
                continue  # pip writes the launchers from entry_points.txt again
            raise errors.FleetError(
                f"the {DIST_NAME} install has {f} outside site-packages, which a wheel made "
                "from it would lose; pass a ready --wheelhouse DIR", path=str(f))
        if "__pycache__" in f.parts or f.suffix == ".pyc":
            continue
        if f.parts[0].endswith(".dist-info"):
            distinfo = f.parts[0]
            if len(f.parts) == 2 and f.name in _INSTALLER_FILES:
                continue
        path = Path(str(dist.locate_file(f)))
        if f.hash is not None and (f.hash.mode != "sha256"
                                   or f.hash.value != _record_hash(path.read_bytes())):
            raise errors.FleetError(
                f"{path} differs from the {DIST_NAME} install's RECORD; reinstall it "
                "before making a wheel of it for devices", path=str(path))
        members.append((f.as_posix(), path))
    if not distinfo:
        raise errors.FleetError(f"the {DIST_NAME} install's RECORD names no dist-info")
    # dist-info last, as the wheel spec recommends; otherwise in name order
    members.sort(key=lambda m: (m[0].startswith(distinfo + "/"), m[0]))
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / _wheel_filename(dist)
    tmp = target.with_name(target.name + ".tmp")
    record: list[str] = []
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for arcname, path in members:
            data = path.read_bytes()
            info = zipfile.ZipInfo(arcname, date_time=_ZIP_EPOCH)
            info.external_attr = (stat.S_IFREG | stat.S_IMODE(path.stat().st_mode)) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
            record.append(f"{arcname},sha256={_record_hash(data)},{len(data)}")
        record.append(f"{distinfo}/RECORD,,")
        info = zipfile.ZipInfo(f"{distinfo}/RECORD", date_time=_ZIP_EPOCH)
        info.external_attr = (stat.S_IFREG | 0o644) << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        zf.writestr(info, "\n".join(record) + "\n")
    os.replace(tmp, target)
    return target


def _dependency_wheels(cache_dir: Path, reqs: list[str], tag: str, rebuild: bool,
                       log: Log) -> tuple[list[Path], bool]:
    key = hashlib.sha256(json.dumps(reqs).encode()).hexdigest()[:12]
    deps_dir = cache_dir / f"deps-{tag}-{key}"
    built = False
    if rebuild or not list(deps_dir.glob("*.whl")):
        built = True
        log(f"building dependency wheels for {tag} (downloads; cached afterwards)")
        _pip_wheel(list(reqs), deps_dir, log, timeout=1800)
    wheels = sorted(w for w in deps_dir.glob("*.whl") if not w.match(_PROJECT_GLOB))
    return wheels, built


def dependency_wheels(cache_dir: Path, *, rebuild: bool = False,
                      log: Log = lambda _: None) -> list[Path]:
    """The wheels of the installed distribution's runtime dependencies (``pip wheel``,
    cached under ``cache_dir``). Raises :class:`UsageError` when mnn-fleet is not installed,
    :class:`FleetError` when pip fails."""
    reqs = runtime_requirements()
    with _locked(cache_dir):
        return _dependency_wheels(cache_dir, reqs, python_tag(), rebuild, log)[0]


def _project_wheel(cache_dir: Path, dist: metadata.Distribution, tag: str, rebuild: bool,
                   log: Log) -> tuple[Path, bool]:
    project = editable_project()
    if project is not None:
        if not (project / "pyproject.toml").is_file():
            raise errors.UsageError(
                f"the editable {DIST_NAME} install points to {project}, which has no "
                "pyproject.toml; reinstall it, or pass a ready --wheelhouse DIR")
        proj_dir = cache_dir / f"project-{tag}-{_source_key(project)}"
    else:
        record = (dist.read_text("RECORD") or "").encode()
        proj_dir = cache_dir / f"project-{tag}-{hashlib.sha256(record).hexdigest()[:16]}"
    built = False
    if rebuild or not list(proj_dir.glob(_PROJECT_GLOB)):
        built = True
        if project is not None:
            log(f"building the {DIST_NAME} wheel from the editable project {project}")
            _pip_wheel(["--no-deps", "--no-build-isolation", str(project)], proj_dir, log,
                       timeout=1800)
        else:
            log(f"making the {DIST_NAME} wheel from the installed distribution")
            shutil.rmtree(proj_dir, ignore_errors=True)
            remake_installed_wheel(dist, proj_dir)
        for old in cache_dir.glob(f"project-{tag}-*"):
            if old != proj_dir and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
    return sorted(proj_dir.glob(_PROJECT_GLOB))[-1], built


def build_wheelhouse(cache_dir: Path, *, rebuild: bool = False, log: Log = lambda _: None
                     ) -> Wheelhouse:
    """The wheels that install the agent offline, made from this installation of mnn-fleet
    (see the module docstring) and cached under ``cache_dir``.

    Raises :class:`UsageError` when mnn-fleet is not installed (or its editable project is
    gone), :class:`FleetError` when pip fails or the installation differs from its RECORD.
    """
    dist = _distribution()
    tag = python_tag()
    start = time.monotonic()
    with _locked(cache_dir):
        deps, deps_built = _dependency_wheels(cache_dir, runtime_requirements(dist), tag,
                                              rebuild, log)
        project, project_built = _project_wheel(cache_dir, dist, tag, rebuild, log)
    cached = not (deps_built or project_built)
    return Wheelhouse(wheels=[*deps, project], project_wheel=project, tag=tag,
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
              python: str = "python3", keep_wheels: bool = False, log: Log = lambda _: None,
              board: BoardPlatform | None = None) -> BootstrapResult:
    """Install the agent from ``house`` into ``venv`` on the device behind ``t``.

    ``board``: what :func:`fleet.bootstrap_board.ask_board` found (asked here if None);
    a wheelhouse for another platform is refused before anything is sent.
    """
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    board = board or ask_board(t, python, device=device)
    if board.tag != house.tag:
        raise errors.UsageError(
            f"{device} runs {board.describe()} ({board.tag}), the wheelhouse is for "
            f"{house.tag}; let bootstrap make one for the board (no --wheelhouse), or pass "
            "one built for it", device=device, board=board.tag, wheelhouse=house.tag)
    # "~/x" (the default) is the login user's home on the board, spelled out once here:
    # quoted in the scripts below it would be a folder named "~"
    venv = _remote(t, 'case "$1" in "~"|"~/"*) printf "%s\\n" "$HOME${1#"~"}" ;; '
                      '*) printf "%s\\n" "$1" ;; esac', venv, what="venv path").strip()
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
    # A Python without ensurepip (Debian's python3 without python3-venv, many minimal
    # images) still makes a venv --without-pip; pip then runs from the pushed pip wheel.
    made = _remote(
        t, 'if [ -x "$1/bin/python" ]; then echo kept; else "$2" -m venv -- "$1" >/dev/null '
           '2>&1 || "$2" -m venv --without-pip -- "$1" >&2 || exit 1; echo new; fi; '
           'cd -- "$1" && pwd -P', venv, python, timeout=300, what="venv creation"
    ).strip().splitlines()
    fresh, venv_abs = made[-2] == "new", made[-1]
    has_pip = _remote(t, '[ -x "$1/bin/pip" ] && echo yes || echo no', venv_abs,
                      what="pip check").strip() == "yes"
    pip_wheel = next((w for w in house.wheels if re.fullmatch(r"pip-[^-]+-py3-none-any\.whl",
                                                                  w.name)), None)
    if not has_pip and pip_wheel is None:
        raise errors.UsageError(
            f"{device}: {python} has no ensurepip (Debian: apt-get install python3-venv) and "
            "the wheelhouse holds no pip wheel to install with", device=device)
    pip_path = "" if has_pip else f"{wheel_dir}/{pip_wheel.name}"  # type: ignore[union-attr]
    project = f"{wheel_dir}/{house.project_wheel.name}"
    py = f"{venv_abs}/bin/python"
    if house.requirements:
        # The dependency closure was pinned on the controller: the wheel files go in as
        # they are (--no-deps: no resolver run on a slow board), with the project in the
        # same pip run on a fresh venv; no bytecode now (the board compiles what it
        # imports, once).
        deps = [f"{wheel_dir}/{w.name}" for w in house.wheels
                if w not in (house.project_wheel, pip_wheel)]
        _remote(t, f'py="$1"; p="$3"; fresh="$4"; [ -n "$2" ] && export PYTHONPATH="$2"; '
                   f'shift 4; {_PIP_ENV} "$py" -m pip install -q --no-compile --no-index '
                   '--no-deps "$@" "$p" && { [ "$fresh" = 1 ] || '
                   f'{_PIP_ENV} "$py" -m pip install -q --no-compile --no-index --no-deps '
                   '--force-reinstall "$p"; }',
                py, pip_path, project, "1" if fresh else "0", *deps, timeout=1800,
                what="pip install")
    else:
        _remote(t, f'[ -n "$2" ] && export PYTHONPATH="$2"; {_PIP_ENV} "$1" -m pip install -q '
                   f'--no-index --find-links "$3" "$4" && {_PIP_ENV} "$1" -m pip install -q '
                   '--no-index --no-deps --force-reinstall "$4"',
                py, pip_path, wheel_dir, project, timeout=1200, what="pip install")
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
                           agent_status=doc, timings=timings, board=board.to_dict())
