"""A wheelhouse for a board of another architecture: agent dependencies for its platform
and the project's wheel with natively compiled parts cross-built for it.

Dependencies (:func:`agent_requirements`, :func:`download_dependencies`): only what the
*agent* imports on a board (``numpy``, ``mnn``, ``cryptography``, ``tuf`` and what they
need), not the controller's CLI, registry or transports. Each is pinned to the version
installed here (the tested set), closed over their own requirements with markers evaluated
for the board, and fetched with ``pip download --no-deps --only-binary=:all:
--implementation cp --python-version X.Y --abi cpXY --platform manylinux_2_N_<machine>...``
(every manylinux tag the board's glibc accepts). A dependency with no wheel for the board
is a one-line :class:`NotFoundError` naming it and the platform.

The project's wheel (:func:`cross_project_wheel`): the project's Python files as a pure
wheel (:func:`pure_project_wheel`: ``pip wheel -C wheel.cmake=false``, seconds, no native
build for the controller) plus its two native files built for the board with Debian's
cross toolchain (``g++-aarch64-linux-gnu``) and ``runtime/cmake/<triple>.cmake``:
``fleet_agent/_native<EXT_SUFFIX>`` (the pybind11 module) and ``fleet_agent/bin/fleet-probe``;
its ``WHEEL`` tag becomes ``cpXY-cpXY-linux_<machine>``. Why cross-compile rather than build
inside the board's userland under qemu: the same C++ takes ~40 s natively and many minutes
under emulation, a real board rarely has a compiler, and the cross build needs nothing from
the board but facts. The module is compiled against this controller's Python headers,
which is exact only for the same CPython version and ABI: the board's ``sysconfig`` ABI
facts (:data:`fleet.bootstrap_board.ABI_VARS`) are compared first and a mismatch is refused.
The binaries' highest ``GLIBC_2.N`` symbol version is checked against the board's glibc.

Cache (under the bootstrap cache): ``deps-<tag>-glibc<M.N>-<key>/`` and
``project-<tag>-<key>/`` where the project key hashes the controller's project wheel, the
runtime sources, the compiler and the Python headers; ``cross-<machine>/`` is the CMake
build directory (incremental).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import sysconfig
import time
import zipfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from fleet._version import editable_project
from fleet.bootstrap import (
    Wheelhouse,
    _distribution,
    _locked,
    _source_key,
    build_wheelhouse,
    python_tag,
    runtime_requirements,
)
from fleet.bootstrap_board import ABI_VARS, BoardPlatform, controller_platform
from fleet.core import errors

__all__ = ["AGENT_DISTRIBUTIONS", "agent_requirements", "cross_project_wheel",
           "download_dependencies", "glibc_needed", "pure_project_wheel", "wheelhouse_for"]

Log = Callable[[str], None]
#: What the agent imports on a board (fleet_agent and fleet.core); the rest of the
#: project's requirements serve the controller.
AGENT_DISTRIBUTIONS = ("numpy", "mnn", "cryptography", "tuf", "httpx")
_TRIPLES = {"aarch64": "aarch64-linux-gnu"}
_PIP_ENV = {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
_NO_MATCH = re.compile(r"No matching distribution found for (\S+)")


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _marker_env(board: BoardPlatform) -> dict[str, str]:
    full = ".".join(map(str, board.python))
    return {"implementation_name": "cpython", "platform_python_implementation": "CPython",
            "python_version": f"{board.python[0]}.{board.python[1]}",
            "python_full_version": full, "implementation_version": full,
            "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
            "platform_machine": board.machine, "extra": ""}


def agent_requirements(project_requires: list[str], board: BoardPlatform) -> list[str]:
    """``name==version`` for the agent's distributions and everything they need on
    ``board``, pinned to what is installed here (a requirement not installed here keeps
    its own specifier). Raises :class:`UsageError` when an installed version does not
    satisfy the project's own requirement (a broken controller install)."""
    from packaging.requirements import Requirement

    env = _marker_env(board)
    todo = [Requirement(r) for r in project_requires
            if _canon(Requirement(r).name) in AGENT_DISTRIBUTIONS]
    pinned: dict[str, str] = {}
    while todo:
        req = todo.pop(0)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = _canon(req.name)
        if name in pinned:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            pinned[name] = f"{name}{req.specifier}"
            continue
        if req.specifier and not req.specifier.contains(dist.version, prereleases=True):
            raise errors.UsageError(f"{name} {dist.version} is installed here but the agent "
                                    f"needs {req}", requirement=str(req))
        pinned[name] = f"{name}=={dist.version}"
        todo.extend(Requirement(r) for r in dist.requires or [])
    return [pinned[k] for k in sorted(pinned)]


def _run(argv: list[str], what: str, timeout: float, *, cwd: Path | None = None,
         env: dict[str, str] | None = None) -> str:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                             check=False, cwd=cwd, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired as exc:
        raise errors.FleetError(f"{what} did not finish in {timeout:g}s") from exc
    except FileNotFoundError as exc:
        raise errors.UsageError(f"{what}: {argv[0]} is not installed") from exc
    if res.returncode != 0:
        raise errors.FleetError(f"{what} failed ({res.returncode}): "
                                f"{(res.stderr or res.stdout).strip()[-1500:]}",
                                argv=shlex.join(argv))
    return res.stdout


def download_dependencies(cache_dir: Path, board: BoardPlatform, reqs: list[str], *,
                          rebuild: bool = False, log: Log = lambda _: None) -> list[Path]:
    """The wheels of ``reqs`` for ``board`` (cached). Raises :class:`NotFoundError` naming
    a requirement that has no wheel for the board's platform."""
    glibc = ".".join(map(str, board.libc_version))
    # pip itself, to install with on a board whose Python has no ensurepip
    reqs = [*reqs, f"pip=={metadata.version('pip')}"]
    key = hashlib.sha256(json.dumps([reqs, board.pip_platforms()]).encode()).hexdigest()[:12]
    out = cache_dir / f"deps-{board.tag}-glibc{glibc}-{key}"
    wheels = sorted(out.glob("*.whl"))
    if wheels and not rebuild:
        return wheels
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    argv = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
            "--only-binary=:all:", "--implementation", "cp", "--python-version",
            f"{board.python[0]}.{board.python[1]}", "--abi", board.abi_tag,
            *[a for p in board.pip_platforms() for a in ("--platform", p)], "--dest",
            str(tmp), *reqs]
    log(f"downloading the agent's dependencies for {board.describe()} (cached afterwards)")
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=1800, check=False,
                             env={**os.environ, **_PIP_ENV})
    except subprocess.TimeoutExpired as exc:
        raise errors.FleetError("pip download did not finish in 1800s") from exc
    if res.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        missing = _NO_MATCH.search(res.stderr or "")
        if missing:
            raise errors.NotFoundError(
                f"no wheel of {missing.group(1)} for {board.describe()} "
                f"({board.abi_tag}, manylinux up to glibc {glibc}): the agent cannot be "
                "installed offline there; pass a --wheelhouse DIR with one built for it",
                kind="wheel", name=missing.group(1), platform=board.tag)
        raise errors.FleetError(f"pip download failed: {res.stderr.strip()[-1500:]}")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return sorted(out.glob("*.whl"))


def _check_headers(board: BoardPlatform) -> Path:
    """This controller's Python headers, when they are exact for ``board``'s CPython."""
    here = controller_platform()
    if (board.python[:2], board.abiflags) != (here.python[:2], here.abiflags):
        raise errors.UsageError(
            f"the board runs CPython {board.python[0]}.{board.python[1]}{board.abiflags}; "
            f"its native module is compiled here against this controller's "
            f"{here.python[0]}.{here.python[1]}{here.abiflags} headers, which only fit the "
            "same version: run the controller with that Python, or pass --wheelhouse DIR",
            board=board.tag)
    def norm(v: object) -> object:
        return 0 if v in (None, "", 0) else v  # unset and 0 mean the same in pyconfig.h

    differ = {k: (board.abi_vars.get(k), here.abi_vars.get(k)) for k in ABI_VARS
              if norm(board.abi_vars.get(k)) != norm(here.abi_vars.get(k))}
    if differ:
        raise errors.UsageError(
            "the board's Python differs in ABI from this controller's: " + ", ".join(
                f"{k} {b} vs {h}" for k, (b, h) in sorted(differ.items())),
            board=board.tag)
    include = Path(sysconfig.get_paths()["include"])
    if not (include / "Python.h").is_file():
        raise errors.UsageError(f"{include}/Python.h is missing: the cross build of the "
                                "native module needs this Python's headers")
    return include


def _runtime_key(src: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(q for q in src.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(src)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def glibc_needed(paths: list[Path]) -> tuple[int, int]:
    """The newest ``GLIBC_2.N`` symbol version the ELF files reference."""
    best = (2, 0)
    for p in paths:
        for m in re.finditer(rb"GLIBC_2\.(\d+)(?:\.\d+)?\0", p.read_bytes()):
            best = max(best, (2, int(m.group(1))))
    return best


def _cross_build(project: Path, board: BoardPlatform, build_dir: Path, include: Path,
                 log: Log) -> tuple[Path, Path]:
    triple = _TRIPLES.get(board.machine)
    toolchain = project / "runtime" / "cmake" / f"{triple}.cmake"
    if triple is None or not toolchain.is_file():
        raise errors.UsageError(f"no cross toolchain file for {board.machine} "
                                f"(known: {', '.join(_TRIPLES)}); pass --wheelhouse DIR")
    if shutil.which(f"{triple}-g++") is None:
        raise errors.UsageError(f"{triple}-g++ is not installed: the {board.machine} build "
                                f"needs Debian's cross toolchain (apt-get install "
                                f"g++-{triple})")
    try:
        import pybind11
    except ImportError as exc:
        raise errors.UsageError("pybind11 is not installed here; the cross build of the "
                                "native module needs its headers (pip install pybind11)"
                                ) from exc
    log(f"cross-compiling the runtime for {board.machine} ({triple}-g++)")
    _run(["cmake", "-S", str(project / "runtime"), "-B", str(build_dir),
          f"-DCMAKE_TOOLCHAIN_FILE={toolchain}", "-DCMAKE_BUILD_TYPE=Release",
          "-DFLEET_PYTHON_MODULE=ON", f"-DFLEET_PYTHON_INCLUDE_DIR={include}",
          f"-DFLEET_PYBIND11_INCLUDE_DIR={pybind11.get_include()}",
          f"-DFLEET_PYTHON_EXT_SUFFIX={board.ext_suffix}"], "cmake configure", 300)
    _run(["cmake", "--build", str(build_dir), "--target", "fleet-probe", "_native",
          "-j", str(os.cpu_count() or 2)], "cmake build (cross)", 1800)
    return build_dir / "fleet-probe", build_dir / f"_native{board.ext_suffix}"


def _record_hash(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _retarget(base: Path, out_dir: Path, board: BoardPlatform, probe: Path,
              module: Path) -> Path:
    """``base`` with its native files replaced and its tag set to ``board``'s."""
    tag = f"{board.python_tag}-{board.abi_tag}-linux_{board.machine}"
    name_parts = base.name.removesuffix(".whl").split("-")
    target = out_dir / f"{'-'.join(name_parts[:2])}-{tag}.whl"
    tmp = target.with_name(target.name + ".tmp")
    record: list[str] = []
    distinfo = ""
    with zipfile.ZipFile(base) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        members = []
        for info in src.infolist():
            arc = info.filename
            if arc.endswith(".dist-info/RECORD"):
                distinfo = arc.rsplit("/", 1)[0]
                continue
            if re.fullmatch(r"fleet_agent/_native\..*\.so", arc):
                continue  # the controller's module; the board's is added below
            if arc == "fleet_agent/bin/fleet-probe":
                continue
            data = src.read(info)
            if arc.endswith(".dist-info/WHEEL"):
                lines = [ln for ln in data.decode().splitlines() if not ln.startswith("Tag:")]
                lines = [("Root-Is-Purelib: false" if ln.startswith("Root-Is-Purelib")
                          else ln) for ln in lines]
                data = ("\n".join([*lines, f"Tag: {tag}"]) + "\n").encode()
            members.append((arc, data, (info.external_attr >> 16) or 0o644))
        members.append((f"fleet_agent/_native{board.ext_suffix}", module.read_bytes(), 0o755))
        members.append(("fleet_agent/bin/fleet-probe", probe.read_bytes(), 0o755))
        members.sort(key=lambda m: (m[0].startswith(distinfo + "/"), m[0]))
        for arc, data, mode in members:
            info = zipfile.ZipInfo(arc, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = (stat.S_IFREG | stat.S_IMODE(mode)) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(info, data)
            record.append(f"{arc},sha256={_record_hash(data)},{len(data)}")
        record.append(f"{distinfo}/RECORD,,")
        info = zipfile.ZipInfo(f"{distinfo}/RECORD", date_time=(1980, 1, 1, 0, 0, 0))
        info.external_attr = (stat.S_IFREG | 0o644) << 16
        dst.writestr(info, "\n".join(record) + "\n")
    os.replace(tmp, target)
    return target


def pure_project_wheel(cache_dir: Path, project: Path | None, source_key: str, *,
                       log: Log = lambda _: None) -> tuple[Path, bool]:
    """The project's Python files as a wheel, without building the native parts
    (``pip wheel -C wheel.cmake=false``); cached by ``source_key``. ``(wheel, built)``."""
    if project is None or not (project / "pyproject.toml").is_file():
        raise errors.UsageError(
            "making the agent for another architecture needs the project's sources (an "
            "editable install of mnn-fleet); pass a ready --wheelhouse DIR instead")
    out = cache_dir / f"pure-{source_key}"
    found = sorted(out.glob("mnn_fleet-*.whl"))
    if found:
        return found[-1], False
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    log("packing the project's Python files (no native build)")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "-C", "wheel.cmake=false", "--wheel-dir", str(tmp), str(project)],
         "pip wheel (pure)", 600, env=_PIP_ENV)
    os.replace(tmp, out)
    for old in cache_dir.glob("pure-*"):
        if old != out and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return sorted(out.glob("mnn_fleet-*.whl"))[-1], True


def cross_project_wheel(cache_dir: Path, base_wheel: Path, project: Path | None,
                        board: BoardPlatform, *, rebuild: bool = False,
                        log: Log = lambda _: None) -> tuple[Path, bool]:
    """The project's wheel for ``board`` (cached by architecture and source digest);
    ``(wheel, built)``. Raises :class:`UsageError` when it cannot be made here (no project
    sources, no cross compiler, another CPython, a board glibc older than the build's)."""
    if project is None or not (project / "runtime" / "CMakeLists.txt").is_file():
        raise errors.UsageError(
            f"making the agent for {board.machine} needs the project's runtime/ sources "
            "(an editable install of mnn-fleet); pass a ready --wheelhouse DIR instead")
    include = _check_headers(board)
    gxx = shutil.which(f"{_TRIPLES.get(board.machine, board.machine)}-g++") or ""
    compiler = _run([gxx, "--version"], "compiler version", 30).splitlines()[0] if gxx else ""
    key = hashlib.sha256("\0".join([
        hashlib.sha256(base_wheel.read_bytes()).hexdigest(), _runtime_key(project / "runtime"),
        compiler, board.ext_suffix,
        hashlib.sha256((include / "pyconfig.h").read_bytes()).hexdigest()]).encode()
    ).hexdigest()[:16]
    out = cache_dir / f"project-{board.tag}-{key}"
    found = sorted(out.glob("mnn_fleet-*.whl"))
    if found and not rebuild:
        return found[-1], False
    t0 = time.monotonic()
    probe, module = _cross_build(project, board, cache_dir / f"cross-{board.machine}",
                                 include, log)
    need = glibc_needed([probe, module])
    if board.libc_version < need:
        raise errors.UsageError(
            f"the {board.machine} build needs glibc {need[0]}.{need[1]} (the cross "
            f"toolchain's), the board has {board.libc} "
            f"{'.'.join(map(str, board.libc_version))}; pass --wheelhouse DIR",
            board=board.tag)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    wheel = _retarget(base_wheel, out, board, probe, module)
    for old in cache_dir.glob(f"project-{board.tag}-*"):
        if old != out and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    log(f"{wheel.name} made in {time.monotonic() - t0:.0f}s")
    return wheel, True


def wheelhouse_for(cache_dir: Path, board: BoardPlatform, *, rebuild: bool = False,
                   log: Log = lambda _: None) -> Wheelhouse:
    """The wheelhouse for ``board``: :func:`fleet.bootstrap.build_wheelhouse` when it is
    this controller's own platform, else the agent's dependencies for its platform and the
    project wheel cross-built for it, all cached under ``cache_dir``.

    Raises :class:`NotFoundError` naming a dependency that has no wheel for the board,
    :class:`UsageError` when the board's wheel cannot be made here (see
    :func:`fleet.bootstrap_cross.cross_project_wheel`).
    """
    if board.tag == python_tag():
        return build_wheelhouse(cache_dir, rebuild=rebuild, log=log)
    dist = _distribution()
    start = time.monotonic()
    reqs = agent_requirements(runtime_requirements(dist), board)
    with _locked(cache_dir):
        before = {p.name for p in cache_dir.glob("deps-*")}
        deps = download_dependencies(cache_dir, board, reqs, rebuild=rebuild, log=log)
        deps_built = {p.name for p in cache_dir.glob("deps-*")} != before or rebuild
        source = editable_project()
        base, base_built = pure_project_wheel(
            cache_dir, source, _source_key(source) if source else "", log=log)
        project, built = cross_project_wheel(cache_dir, base, source, board,
                                             rebuild=rebuild, log=log)
    cached = not (deps_built or base_built or built)
    return Wheelhouse(wheels=[*deps, project], project_wheel=project, tag=board.tag,
                      build_s=0.0 if cached else time.monotonic() - start, cached=cached,
                      requirements=reqs)
