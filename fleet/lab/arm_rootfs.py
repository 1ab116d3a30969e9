"""The arm64 Debian userland of the Arm lab boards, built once with debootstrap and cached.

``debootstrap --arch=arm64 --variant=minbase --include=python3,openssh-server,libstdc++6``
from Debian's archive: the first stage (download and unpack) runs natively, the second
(dpkg and the maintainer scripts, arm64 programs) in qemu-user through the lab's binfmt
entry (:mod:`fleet.lab.arm_binfmt`) with the ``cortex-a53`` model (no pointer
authentication to emulate: ``max`` spends more than half of a Python start in QARMA5).

The second stage is the slow part: every program it runs is translated from scratch
(measured on this 2-core machine: ~7 min for minbase + python3 + python3-venv +
openssh-server at first; ~4 min for the whole build now). What it spent most on is
avoided:

- debootstrap's own dependency resolution in emulated perl over the suite's 49 MB
  ``Packages`` index (~135 s): the second stage sees an index of the packages it installs
  only (:func:`_small_package_index`), Debian's file is put back after.

- ``python3-venv`` is not installed: it pulls ``python3-pip-whl`` and with it
  ``ca-certificates``, whose ``update-ca-certificates`` forks ~1,000 emulated programs
  (~2 min). The board's Python then has no ``ensurepip``, like many minimal images, and
  ``fleet device bootstrap`` makes the venv ``--without-pip`` and runs pip from the pip
  wheel it pushes.
- ``openssh-server``'s host keys: placeholders made natively with ``ssh-keygen`` before
  the second stage (its postinst then skips the emulated RSA key generation) and removed
  after it; each board gets its own key (:mod:`fleet.lab.arm_board`).

Cache (``<cache>/``, default ``/var/cache/fleet-lab``, ``$FLEET_LAB_CACHE`` or
``fleet lab up --cache``):

- ``debs/``: debootstrap's package cache (``--cache-dir``); an interrupted build downloads
  only what is missing next time.
- ``rootfs-arm64-bookworm-<digest>/``: the finished root, shared read-only by every board
  (the lower layer of each board's overlay). ``<digest>`` hashes the inputs (suite, arch,
  variant, packages, mirror, recipe version).
- ``rootfs-arm64-bookworm-<digest>.stamp.json``: written last, after the rename; it holds
  the inputs, their digest and a digest of the tree (paths, types, sizes, modes, link
  targets). A root without a stamp, or whose stamp or tree does not match, is rebuilt; a
  half-built ``.partial`` directory of an interrupted run is removed first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fleet.core import errors
from fleet.core.filelock import exclusive
from fleet.lab import arm_binfmt

__all__ = ["DEFAULT_CACHE", "PACKAGES", "RootfsInfo", "default_cache", "ensure", "inputs",
           "verify"]

Log = Callable[[str], None]
DEFAULT_CACHE = Path("/var/cache/fleet-lab")
SUITE = "bookworm"
ARCH = "arm64"
VARIANT = "minbase"
#: What a board needs beyond minbase: Python (the agent's interpreter), sshd (its
#: transport), libstdc++ (manylinux wheels such as MNN's link it from the system).
PACKAGES = ("python3", "openssh-server", "libstdc++6")
MIRROR = "http://deb.debian.org/debian"
#: Bump when the steps around debootstrap change: old roots are then rebuilt.
RECIPE = 2
BUILD_CPU = "cortex-a53"
_STAMP_SCHEMA = "fleet.lab.rootfs/1"


class RootfsInfo(dict[str, Any]):
    """The stamp: ``{"schema", "path", "inputs", "inputs_digest", "tree_digest", "files",
    "build_s", "built_at"}``."""


def default_cache() -> Path:
    return Path(os.environ.get("FLEET_LAB_CACHE") or DEFAULT_CACHE)


def inputs() -> dict[str, Any]:
    return {"suite": SUITE, "arch": ARCH, "variant": VARIANT, "packages": list(PACKAGES),
            "mirror": os.environ.get("FLEET_LAB_DEBIAN_MIRROR") or MIRROR, "recipe": RECIPE}


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def tree_digest(root: Path) -> tuple[str, int]:
    """Digest of every entry's path, type, size, mode and link target (not contents: a
    cheap check, ~0.3 s for the ~10k entries of the root), and the entry count."""
    h = hashlib.sha256()
    count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            link = os.readlink(p) if stat.S_ISLNK(st.st_mode) else ""
            size = st.st_size if stat.S_ISREG(st.st_mode) else 0
            h.update(f"{rel}\0{st.st_mode:o}\0{size}\0{link}\n".encode())
            count += 1
    return h.hexdigest()[:32], count


def _paths(cache: Path) -> tuple[Path, Path]:
    name = f"rootfs-{ARCH}-{SUITE}-{_digest(inputs())}"
    return cache / name, cache / f"{name}.stamp.json"


def verify(root: Path, stamp: Path) -> list[str]:
    """Why ``root`` cannot be reused (empty: it can)."""
    if not root.is_dir():
        return [f"{root} does not exist"]
    try:
        info = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return [f"{stamp} is missing or unreadable (an interrupted build?)"]
    problems = []
    if info.get("schema") != _STAMP_SCHEMA or info.get("inputs_digest") != _digest(inputs()):
        problems.append("the stamp was made for other inputs")
    digest, count = tree_digest(root)
    if info.get("tree_digest") != digest:
        problems.append(f"the tree changed since it was built ({count} entries now, "
                        f"{info.get('files')} then)")
    for rel in ("usr/bin/python3", "usr/sbin/sshd", "usr/lib/python3.11/venv/__init__.py",
                "usr/lib/aarch64-linux-gnu/libstdc++.so.6"):
        if not (root / rel).exists():
            problems.append(f"{rel} is missing")
    return problems


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path) + "/"
    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            mnt = line.split()[4].replace("\\040", " ")
            if mnt == str(path) or mnt.startswith(prefix):
                found.append(mnt)
    return sorted(found, key=len, reverse=True)


def _remove_tree(path: Path) -> None:
    """rm -rf that never follows a mount (a half-built root may hold bind mounts)."""
    for mnt in _mounts_under(path):
        res = subprocess.run(["umount", mnt], capture_output=True, check=False)
        if res.returncode != 0:
            subprocess.run(["umount", "-l", mnt], capture_output=True, check=False)
    if _mounts_under(path):
        raise errors.LabError(f"{path} still has mounts under it; not removing it")
    shutil.rmtree(path, ignore_errors=True)


def _run(argv: list[str], log_file: Path, what: str, timeout: float) -> None:
    with log_file.open("ab") as out:
        try:
            res = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                                 check=False)
        except subprocess.TimeoutExpired as exc:
            raise errors.LabError(f"{what} did not finish in {timeout:g}s; see {log_file}"
                                  ) from exc
        except FileNotFoundError as exc:
            raise errors.LabError(f"{argv[0]} is not installed (apt-get install debootstrap "
                                  "qemu-user-static)") from exc
    if res.returncode != 0:
        tail = log_file.read_text(errors="replace").strip().splitlines()[-3:]
        raise errors.LabError(f"{what} failed ({res.returncode}): {' | '.join(tail)}; see "
                              f"{log_file}", log=str(log_file))


@contextlib.contextmanager
def _emulation(root: Path, user: str) -> Iterator[None]:
    """The lab's wrapper and qemu inside ``root`` (bind mounts), the build CPU model."""
    arm_binfmt.acquire(user)
    qdir = root / str(arm_binfmt.QEMU_DIR).lstrip("/")
    qdir.mkdir(parents=True, exist_ok=True)
    mounted: list[Path] = []
    try:
        for host, inside in ((arm_binfmt.WRAPPER, qdir / arm_binfmt.WRAPPER.name),
                             (arm_binfmt.QEMU_STATIC, qdir / arm_binfmt.QEMU_IN_ROOT.name)):
            inside.touch()
            subprocess.run(["mount", "--bind", "-o", "ro", str(host), str(inside)],
                           check=True, capture_output=True)
            mounted.append(inside)
        (qdir / arm_binfmt.CPU_FILE.name).write_text(BUILD_CPU + "\n")
        yield
    finally:
        for m in reversed(mounted):
            subprocess.run(["umount", str(m)], capture_output=True, check=False)
        arm_binfmt.release(user)
        shutil.rmtree(root / "run" / "fleetlab", ignore_errors=True)


def _placeholder_host_keys(ssh_dir: Path, logf: Path) -> None:
    """Host keys made natively, so openssh-server's postinst does not make them emulated."""
    ssh_dir.mkdir(parents=True, exist_ok=True)
    for kind in ("rsa", "ecdsa", "ed25519"):
        key = ssh_dir / f"ssh_host_{kind}_key"
        if not key.exists():
            _run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "placeholder", "-f",
                  str(key)], logf, "ssh-keygen (placeholder host keys)", timeout=120)


def _stanza_name(stanza: bytes) -> bytes:
    m = re.match(rb"Package:[ \t]*(\S+)", stanza)
    return m.group(1) if m else b""


@contextlib.contextmanager
def _small_package_index(root: Path, log: Log) -> Iterator[None]:
    """The suite's ``Packages`` index cut down to the packages this root installs, for the
    duration of the second stage, then put back.

    The second stage resolves pre-dependencies with ``pkgdetails_perl``: emulated perl
    reads the whole index (bookworm arm64 main: ~49 MB) several times, which measured
    ~135 s of a ~380 s second stage. It only ever looks up packages of
    ``/debootstrap/debpaths`` (the first stage downloaded every dependency), so an index
    of their stanzas gives the same answers. Debian's file (checked against ``InRelease``
    by apt) is restored afterwards, so the finished root is the same either way.
    """
    debpaths = root / "debootstrap" / "debpaths"
    lists = root / "var" / "lib" / "apt" / "lists"
    indexes = sorted(lists.glob("*_Packages"))
    if not debpaths.is_file() or not indexes:
        yield  # another debootstrap layout: leave it as it is
        return
    wanted = {line.split()[0].encode() for line in debpaths.read_text().splitlines()
              if line.strip()}
    saved: list[tuple[Path, Path]] = []
    try:
        for index in indexes:
            full = index.with_name(index.name + ".fleetlab-full")
            os.replace(index, full)
            saved.append((index, full))
            kept = [st for st in full.read_bytes().split(b"\n\n")
                    if _stanza_name(st) in wanted]
            index.write_bytes(b"\n\n".join(kept) + b"\n\n")
            log(f"{index.name}: {len(kept)} of the index's stanzas kept for the second stage")
        yield
    finally:
        for index, full in saved:
            os.replace(full, index)


def _build(tmp: Path, cache: Path, log: Log) -> None:
    logf = cache / "rootfs-build.log"
    logf.write_text("")
    debs = cache / "debs"
    debs.mkdir(exist_ok=True)
    spec = inputs()
    argv = ["debootstrap", "--foreign", f"--arch={ARCH}", f"--variant={VARIANT}",
            f"--include={','.join(PACKAGES)}", f"--cache-dir={debs}", SUITE, str(tmp),
            spec["mirror"]]
    t0 = time.monotonic()
    log(f"debootstrap first stage (download, unpack): {' '.join(argv)}")
    _run(argv, logf, "debootstrap (first stage)", timeout=1800)
    log(f"first stage done in {time.monotonic() - t0:.0f}s; second stage in qemu-user "
        f"({BUILD_CPU}): dpkg configures every package (minutes)")
    proc_link = tmp / "proc"  # debootstrap's container mode leaves a symlink to /proc
    if proc_link.is_symlink():
        proc_link.unlink()
        proc_link.mkdir()
    _placeholder_host_keys(tmp / "etc" / "ssh", logf)
    with _emulation(tmp, f"rootfs-build:{os.getpid()}"), _small_package_index(tmp, log):
        _run(["chroot", str(tmp), "/debootstrap/debootstrap", "--second-stage"], logf,
             "debootstrap (second stage, in qemu-user)", timeout=3600)
        _run(["chroot", str(tmp), "/usr/bin/python3", "-c", "import venv, ssl, sqlite3"],
             logf, "checking the root's Python", timeout=300)
    for mnt in _mounts_under(tmp):  # the second stage may leave /proc or /sys mounted
        subprocess.run(["umount", "-l", mnt], capture_output=True, check=False)
    # Host keys made by openssh-server's postinst would be shared by every board: each
    # board gets its own (fleet.lab.arm_board). Downloaded packages stay in debs/ only.
    for key in (tmp / "etc" / "ssh").glob("ssh_host_*"):
        key.unlink()
    for deb in (tmp / "var" / "cache" / "apt" / "archives").glob("*.deb"):
        deb.unlink()
    log(f"second stage done ({time.monotonic() - t0:.0f}s in all)")


def ensure(cache: Path | None = None, *, rebuild: bool = False, log: Log = lambda _: None
           ) -> RootfsInfo:
    """The cached root (built first when missing, changed or half-built); its stamp.

    Raises :class:`LabError` when debootstrap or qemu is missing or a stage fails (the
    message names the log file: ``<cache>/rootfs-build.log``).
    """
    cache = (cache or default_cache()).resolve()
    cache.mkdir(parents=True, exist_ok=True, mode=0o755)
    root, stamp = _paths(cache)
    with exclusive(cache / ".lock"):
        problems = ["--rebuild"] if rebuild else verify(root, stamp)
        if not problems:
            return RootfsInfo(json.loads(stamp.read_text()))
        if root.exists():
            log(f"rebuilding {root.name}: {'; '.join(problems)}")
        if shutil.which("debootstrap") is None:
            raise errors.LabError("debootstrap is not installed (apt-get install debootstrap)")
        tmp = root.with_name(root.name + ".partial")
        if tmp.exists():
            log(f"removing the half-built {tmp.name} of an interrupted build")
            _remove_tree(tmp)
        t0 = time.monotonic()
        try:
            _build(tmp, cache, log)
        except BaseException:
            _remove_tree(tmp)
            raise
        stamp.unlink(missing_ok=True)
        if root.exists():
            old = root.with_name(f"{root.name}.old-{os.getpid()}")
            os.replace(root, old)  # boards still running on it keep their mount
            if not _mounts_under(old):
                _remove_tree(old)
        os.replace(tmp, root)
        digest, count = tree_digest(root)
        info = RootfsInfo(schema=_STAMP_SCHEMA, path=str(root), inputs=inputs(),
                          inputs_digest=_digest(inputs()), tree_digest=digest, files=count,
                          build_s=round(time.monotonic() - t0, 1),
                          built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        tmp_stamp = stamp.with_name(stamp.name + ".tmp")
        tmp_stamp.write_text(json.dumps(info, indent=2, sort_keys=True))
        os.replace(tmp_stamp, stamp)
        return info
