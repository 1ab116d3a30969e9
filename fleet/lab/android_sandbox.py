"""An emulated phone's filesystem: a sandbox folder on the host, and the namespace its
shell commands run in.

Layout of one phone's sandbox (``<lab>/android/phones/<name>/``), as the phone sees it::

    data/local/tmp/          /data/local/tmp   (adb shell's writable place; agent root below)
    data/data/<package>/     /data/data/<pkg>  (an "installed" app: the emulated app agent)
    data/misc/adb/adb_keys   /data/misc/adb    (authorized adb public keys, offered_keys)
    sdcard/                  /sdcard, /storage/emulated/0
    system/build.prop        /system           (read-only: property table, getprop, am, pm)

Why a mount namespace (``bwrap``, Debian's bubblewrap, run as root): shell commands must
really run and see ``/data/local/tmp`` and ``/sdcard`` as the phone's own folders, while the
host's ``/`` gets no new directories. The namespace's root is built from read-only binds of
``/usr`` (with the merged-usr symlinks ``/bin``, ``/lib``...), ``/etc``, ``/sys``, the
repository and the Python installation that runs the agent, plus read-write binds of the
phone's ``data`` and ``sdcard``. The sync service (push/pull) runs in the lab daemon itself
and maps device paths into the same folders with :class:`PhoneFs`, refusing anything that
escapes the sandbox.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

__all__ = ["PYTHON", "REPO", "PhoneFs", "shell_argv", "write_layout"]

REPO = Path(__file__).resolve().parents[2]
PYTHON = str(Path(sys.prefix) / "bin" / "python")

#: device prefix -> sandbox sub-folder; the longest prefix wins.
_ALIASES = {"/storage/emulated/0": "sdcard", "/storage/self/primary": "sdcard",
            "/sdcard": "sdcard"}
#: where the adb shell user may write, as on a phone without root.
_WRITABLE = ("/data/local/tmp", "/sdcard")


def _norm(device_path: str) -> str:
    if not device_path.startswith("/"):
        raise FileNotFoundError(f"device paths are absolute: {device_path!r}")
    parts: list[str] = []
    for part in device_path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    path = "/" + "/".join(parts)
    for alias, target in _ALIASES.items():
        if path == alias or path.startswith(alias + "/"):
            path = "/" + target + path[len(alias):]
            break
    return path


class PhoneFs:
    """Device path -> host path inside one phone's sandbox."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def host_path(self, device_path: str, *, write: bool = False) -> Path:
        path = _norm(device_path)
        if write and not any(path == w or path.startswith(w + "/") for w in _WRITABLE):
            raise PermissionError(f"{device_path}: Read-only file system or permission denied")
        host = self.root / path.lstrip("/")
        real = Path(os.path.realpath(host))
        if real != self.root and self.root not in real.parents:
            raise PermissionError(f"{device_path}: outside the phone's storage")
        return host


def _sbin(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def write_layout(root: Path, props: dict[str, str], packages: tuple[str, ...] = ()) -> None:
    """Create (or refresh) a phone's sandbox; existing data and keys are kept."""
    for sub in ("data/local/tmp", "data/misc/adb", "data/data", "sdcard/Android/data",
                "sdcard/Download", "system/bin", "system/etc"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "data/local/tmp").chmod(0o771)
    (root / "system/build.prop").write_text(
        "".join(f"{k}={v}\n" for k, v in sorted(props.items())))
    # getprop answers from the property table, in Android's output format.
    _sbin(root / "system/bin/getprop", """#!/bin/sh
if [ $# -eq 0 ]; then
  exec awk '{i=index($0,"="); if (i>1) printf "[%s]: [%s]\\n", substr($0,1,i-1), substr($0,i+1)}' \\
    /system/build.prop
fi
awk -v k="$1" -v d="$2" 'BEGIN{f=0} {i=index($0,"="); if (substr($0,1,i-1)==k) \\
  {print substr($0,i+1); f=1; exit}} END{if (!f) print d}' /system/build.prop
""")
    # am / pm: the emulated activity and package managers (fleet.lab.android_app).
    for tool in ("am", "pm"):
        _sbin(root / "system/bin" / tool,
              f'#!/bin/sh\nexec {PYTHON} -m fleet.lab.android_app {tool} "$@"\n')
    for package in packages:
        (root / "data/data" / package).mkdir(parents=True, exist_ok=True)
        (root / "sdcard/Android/data" / package / "files/fleet/inbox").mkdir(
            parents=True, exist_ok=True)
        (root / "sdcard/Android/data" / package / "files/fleet/outbox").mkdir(
            parents=True, exist_ok=True)


def _ro_binds() -> list[str]:
    args: list[str] = ["--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        top = Path("/") / name
        if top.is_symlink():
            args += ["--symlink", os.readlink(top), str(top)]
        elif top.is_dir():
            args += ["--ro-bind", str(top), str(top)]
    seen: list[Path] = [Path("/usr")]
    for extra in (REPO, Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()):
        if any(extra == s or s in extra.parents for s in seen):
            continue
        seen.append(extra)
        args += ["--ro-bind", str(extra), str(extra)]
    return args


def shell_argv(root: Path, command: str | None) -> list[str]:
    """The host argv that runs ``/bin/sh -c COMMAND`` inside the phone's namespace."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise FileNotFoundError("bwrap not found: install Debian's bubblewrap (Makefile)")
    root = root.resolve()
    # /tmp first: later binds (the repo, the venv) may live under /tmp and must stay visible
    argv = [bwrap, "--tmpfs", "/tmp", *_ro_binds(),
            "--proc", "/proc", "--dev", "/dev",
            # read-only sysfs, as on a phone: CPU clusters, GPU/OpenCL drivers read it
            "--ro-bind", "/sys", "/sys",
            "--bind", str(root / "data"), "/data",
            "--bind", str(root / "sdcard"), "/sdcard",
            "--dir", "/storage/emulated", "--symlink", "/sdcard", "/storage/emulated/0",
            "--ro-bind", str(root / "system"), "/system",
            "--chdir", "/",
            "--clearenv",
            "--setenv", "PATH", "/system/bin:/usr/bin:/bin",
            "--setenv", "HOME", "/",
            "--setenv", "TMPDIR", "/data/local/tmp",
            "--setenv", "ANDROID_DATA", "/data",
            "--setenv", "EXTERNAL_STORAGE", "/sdcard",
            "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
            "--setenv", "LANG", "C.UTF-8",
            "/bin/sh"]
    if command is not None:
        argv += ["-c", command]
    return argv
