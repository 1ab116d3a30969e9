"""binfmt_misc for the Arm lab: every aarch64 program of a board runs in qemu-user with the
board's CPU model, whatever its environment.

How: one binfmt_misc entry, ``fleetlab-aarch64`` (the aarch64 ELF magic, flag ``P``, no
``F``), whose interpreter is ``/run/fleetlab/qemu/aarch64``. Without ``F`` the kernel opens
the interpreter at exec time *inside the root of the process that execs*. Each board runs
chrooted in its own filesystem, where that path is a static x86-64 wrapper (the C source
below) that reads the board's CPU model from ``/run/fleetlab/qemu/cpu`` and execs
``/run/fleetlab/qemu/qemu-aarch64-static -cpu MODEL -0 ARGV0 PROGRAM ARGS...``. So the CPU
is a property of the board's filesystem, not of a process's environment: ``QEMU_CPU`` would
be lost by any ``env -i`` or subprocess started with a clean environment, and qemu would
then emulate its default CPU (``max``) on a ``cortex-a53`` board without a word. On the
host the same path holds the wrapper without a ``cpu`` file (qemu's default CPU), so
aarch64 programs outside the boards still run while the entry is there.

The lab registers the entry only when it is not there, mounts ``binfmt_misc`` only when it
is not mounted, and at the last user's :func:`release` removes only what it added
(recorded in ``/run/fleetlab/arm-binfmt.json`` with the users: boards and rootfs builds of
every lab home on this machine). An entry registered later by someone else for the same
magic (``systemd-binfmt``, ``update-binfmts``) would be tried first by the kernel;
:func:`board_emulator` lets the lab see that a board's processes really run in its wrapper.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fleet.core import errors
from fleet.core.filelock import exclusive

__all__ = ["BINFMT_DIR", "ENTRY", "QEMU_DIR", "QEMU_STATIC", "WRAPPER", "acquire",
           "board_emulator", "entry_text", "release", "users"]

RUN_ROOT = Path("/run/fleetlab")
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
ENTRY = "fleetlab-aarch64"
#: Same path on the host and inside every board's root (see the module docstring).
QEMU_DIR = Path("/run/fleetlab/qemu")
WRAPPER = QEMU_DIR / "aarch64"
CPU_FILE = QEMU_DIR / "cpu"
QEMU_IN_ROOT = QEMU_DIR / "qemu-aarch64-static"
#: Debian's qemu-user-static.
QEMU_STATIC = Path("/usr/bin/qemu-aarch64-static")
_STATE = RUN_ROOT / "arm-binfmt.json"
_LOCK = RUN_ROOT / ".binfmt.lock"
# e_ident (64-bit, little-endian, version 1) + e_type EXEC/DYN (mask 0xfe) + e_machine 183
_MAGIC = r"\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
_MASK = r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"

WRAPPER_C = r"""
/* fleet lab: binfmt_misc interpreter for one board's aarch64 programs (flag P: argv is
   [wrapper, program path, original argv0, original argv1...]). Runs qemu with the CPU
   model in /run/fleetlab/qemu/cpu of the calling process's root (the board's). */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#define DIR "/run/fleetlab/qemu/"
int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "fleetlab qemu wrapper: started by binfmt_misc (flag P) only\n");
    return 127;
  }
  char cpu[256] = "";
  int fd = open(DIR "cpu", O_RDONLY | O_CLOEXEC);
  if (fd >= 0) {
    ssize_t n = read(fd, cpu, sizeof cpu - 1);
    close(fd);
    cpu[n > 0 ? n : 0] = 0;
    cpu[strcspn(cpu, " \t\r\n")] = 0;
  }
  char *args[argc + 6];
  int k = 0;
  args[k++] = DIR "qemu-aarch64-static";
  if (cpu[0]) { args[k++] = "-cpu"; args[k++] = cpu; }
  args[k++] = "-0";
  args[k++] = argv[2];
  args[k++] = argv[1];
  for (int i = 3; i < argc; ++i) args[k++] = argv[i];
  args[k] = NULL;
  execv(args[0], args);
  perror("fleetlab qemu wrapper: exec " DIR "qemu-aarch64-static");
  return 127;
}
"""


def entry_text() -> str:
    """The line written to ``binfmt_misc/register``."""
    return f":{ENTRY}:M::{_MAGIC}:{_MASK}:{WRAPPER}:P"


@contextlib.contextmanager
def _locked() -> Iterator[dict[str, Any]]:
    RUN_ROOT.mkdir(parents=True, exist_ok=True, mode=0o755)
    with exclusive(_LOCK):
        try:
            state: dict[str, Any] = json.loads(_STATE.read_text())
        except (OSError, ValueError):
            state = {}
        state.setdefault("users", [])
        yield state
        if state["users"] or state.get("mounted") or state.get("registered"):
            tmp = _STATE.with_name(f".{_STATE.name}.{os.getpid()}")
            tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
            os.replace(tmp, _STATE)
        else:
            _STATE.unlink(missing_ok=True)


def _mounted() -> bool:
    return (BINFMT_DIR / "register").exists()


def _run(argv: list[str], what: str) -> None:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise errors.LabError(f"{what} failed: {exc}", argv=argv) from exc
    if res.returncode != 0:
        raise errors.LabError(f"{what} failed ({res.returncode}): {res.stderr.strip()[-500:]}",
                              argv=argv)


def _install_wrapper() -> None:
    """Compile the wrapper (static, so it runs in any root) unless this source made it."""
    QEMU_DIR.mkdir(parents=True, exist_ok=True, mode=0o755)
    digest = hashlib.sha256(WRAPPER_C.encode()).hexdigest()
    sidecar = WRAPPER.with_name("aarch64.sha256")
    if WRAPPER.is_file() and sidecar.is_file() and sidecar.read_text().strip() == digest:
        return
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise errors.LabError("the Arm lab compiles a small static binfmt wrapper and needs a "
                              "C compiler (apt-get install build-essential)")
    src = QEMU_DIR / f".wrapper-{os.getpid()}.c"
    tmp = QEMU_DIR / f".aarch64-{os.getpid()}"
    src.write_text(WRAPPER_C)
    try:
        _run([cc, "-static", "-O2", "-Wall", "-o", str(tmp), str(src)],
             "compiling the binfmt wrapper (needs libc6-dev's static libc)")
        os.replace(tmp, WRAPPER)
        sidecar.write_text(digest + "\n")
    finally:
        src.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    link = QEMU_DIR / QEMU_IN_ROOT.name
    if not link.is_symlink():
        link.unlink(missing_ok=True)
        link.symlink_to(QEMU_STATIC)


def _remove_wrapper() -> None:
    for name in ("aarch64", "aarch64.sha256", QEMU_IN_ROOT.name, CPU_FILE.name):
        (QEMU_DIR / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        QEMU_DIR.rmdir()


def acquire(user: str) -> None:
    """Make aarch64 programs run through the lab's wrapper; ``user`` names who needs it
    (``<lab tag>/<board>`` or ``rootfs-build:<pid>``).

    Raises :class:`LabError` when qemu-user-static is missing, binfmt_misc cannot be
    mounted, or an entry named ``fleetlab-aarch64`` exists with another interpreter.
    """
    if not QEMU_STATIC.is_file():
        raise errors.LabError(f"{QEMU_STATIC} is missing: the Arm lab runs boards in "
                              "qemu-user (apt-get install qemu-user-static)")
    with _locked() as state:
        if not _mounted():
            _run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)],
                 f"mounting binfmt_misc on {BINFMT_DIR}")
            state["mounted"] = True
        _install_wrapper()
        entry = BINFMT_DIR / ENTRY
        if entry.exists():
            text = entry.read_text()
            if f"interpreter {WRAPPER}" not in text or "flags: P" not in text:
                raise errors.LabError(f"{entry} exists with another interpreter or flags; "
                                      f"remove it (echo -1 > {entry}) and retry",
                                      entry=text)
            if text.splitlines()[0].strip() != "enabled":
                entry.write_text("1")
        else:
            try:
                (BINFMT_DIR / "register").write_text(entry_text())
            except OSError as exc:
                raise errors.LabError(f"registering {ENTRY} with binfmt_misc failed: {exc}"
                                      ) from exc
            state["registered"] = True
        if user not in state["users"]:
            state["users"].append(user)


def release(user: str) -> bool:
    """Drop ``user``; the last one removes what :func:`acquire` added. True if removed."""
    with _locked() as state:
        if user in state["users"]:
            state["users"].remove(user)
        if state["users"]:
            return False
        removed = False
        if state.pop("registered", False):
            entry = BINFMT_DIR / ENTRY
            if entry.exists():
                entry.write_text("-1")
            removed = True
            _remove_wrapper()
        if state.pop("mounted", False) and _mounted():
            others = [p.name for p in BINFMT_DIR.iterdir()
                      if p.name not in ("register", "status")]
            if not others:
                _run(["umount", str(BINFMT_DIR)], f"unmounting {BINFMT_DIR}")
        return removed


def users() -> list[str]:
    with _locked() as state:
        return list(state["users"])


def board_emulator(pid: int) -> dict[str, Any]:
    """What really runs a board process: the executable the kernel runs for ``pid`` and
    the ``-cpu`` qemu got (read from the host, where qemu cannot answer for its guest)."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return {"pid": pid, "executable": None, "cpu": None}
    args = [a.decode(errors="replace") for a in argv if a]
    cpu = args[args.index("-cpu") + 1] if "-cpu" in args[:-1] else None
    return {"pid": pid, "executable": exe, "cpu": cpu}
