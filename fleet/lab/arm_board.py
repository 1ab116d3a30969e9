"""One Arm lab board: an arm64 Debian userland whose every process runs in qemu-user.

A board (see :mod:`fleet.lab.iot` for the network side, shared with the x86 boards):

- filesystem: an overlay of the cached root (:mod:`fleet.lab.arm_rootfs`, read-only,
  shared by all boards) and a writable layer of its own,
  ``/run/fleetlab/<tag>/iotN/{upper,work}``, mounted at ``/run/fleetlab/<tag>/iotN/root``
  on the host (so the controller and tests can look at the board's "SD card"). What the
  board writes (the agent's venv, logs) lands in its own layer and goes at ``lab down``.
- the agent's store: a size-limited tmpfs at ``/var/lib/fleet-agent`` of the board (host
  path ``root/var/lib/fleet-agent``), so a full disk happens for real, as on x86 boards.
- processes: sshd is the board's own arm64 OpenSSH (``/usr/sbin/sshd`` of the root), run
  chrooted in the board's network namespace and a mount namespace of its own with
  ``/proc``, ``/sys``, ``/dev`` and a ``/run`` tmpfs. That ``/run`` holds the binfmt
  wrapper, qemu and the ``cpu`` file (:mod:`fleet.lab.arm_binfmt`): every program the board
  runs, sshd, its sessions, the agent and the agent's children, runs on the board's CPU
  model whatever its environment.
- the agent: none until ``fleet device bootstrap`` installs one from the controller into
  ``/root/.fleet-agent-venv`` (the registered agent command points there).
- cores: a board's processes are pinned to one host CPU (``taskset``; boards spread over
  the host's CPUs by slot), so the board reports one usable core. Emulated cores are
  slow and a lab host has few: two boards then run side by side without competing, and
  the candidate grid has one thread count to measure.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from fleet.core import errors
from fleet.lab import arm_binfmt, netns

__all__ = ["AGENT_CMD", "AGENT_ROOT", "check_cpu", "make_root", "start_sshd", "status",
           "teardown"]

AGENT_ROOT = "/var/lib/fleet-agent"
#: Where ``fleet device bootstrap``'s default venv (``~/.fleet-agent-venv``) puts it.
AGENT_CMD = ["/root/.fleet-agent-venv/bin/fleet-agent"]
SSHD = "/usr/sbin/sshd"
_CONF_DIR = "/etc/ssh/fleetlab"
_SSHD_LOG = "/var/log/fleetlab-sshd.log"
_SSHD_WAIT_S = 60.0  # an emulated sshd takes a second or two to start


def _sshd_config(board_addr: str) -> str:
    return "\n".join([
        f"ListenAddress {board_addr}:22",
        f"HostKey {_CONF_DIR}/ssh_host_ed25519_key",
        "PidFile /run/sshd.pid",
        f"AuthorizedKeysFile {_CONF_DIR}/authorized_keys",
        "AllowUsers root",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes yes",
        "UseDNS no",
        "PrintMotd no",
        "X11Forwarding no",
        "AllowTcpForwarding no",
        "AllowAgentForwarding no",
        "PermitTunnel no",
        "MaxStartups 64:30:128",
        "MaxSessions 64",
        "Subsystem sftp internal-sftp",
        "",
    ])


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def make_root(b: dict[str, Any], rootfs: Path, *, host_key_pem: bytes, fleet_pub: str) -> None:
    """Mount the board's overlay and agent tmpfs, write its sshd files and CPU model."""
    rt = Path(b["runtime_dir"])
    upper, work, root = rt / "upper", rt / "work", Path(b["root_dir"])
    for d in (upper, work, root):
        d.mkdir(parents=True, exist_ok=True, mode=0o755)
    netns.sh(["mount", "-t", "overlay", f"fleetlab-{b['name']}", "-o",
              f"lowerdir={rootfs},upperdir={upper},workdir={work}", str(root)])
    b["mounted_root"] = True
    conf = root / _CONF_DIR.lstrip("/")
    conf.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write(conf / "ssh_host_ed25519_key", host_key_pem, 0o600)
    _write(conf / "authorized_keys", fleet_pub.encode(), 0o600)
    _write(conf / "sshd_config", _sshd_config(b["board_addr"]).encode(), 0o644)
    (root / "etc" / "hostname").write_text(b["name"] + "\n")
    store = Path(b["agent_root_host"])
    store.mkdir(parents=True, exist_ok=True, mode=0o700)
    netns.sh(["mount", "-t", "tmpfs", "-o", f"size={b['store_mb']}m,mode=0700",
              f"fleetlab-{b['name']}", str(store)])
    b["mounted"] = True


def _board_script() -> str:
    """Runs (as sh on the host) in the board's new mount namespace: the board's /proc,
    /sys, /dev and /run, the emulation files in /run, then sshd chrooted (emulated)."""
    q = str(arm_binfmt.QEMU_DIR)
    return "\n".join([
        "set -e",
        'R="$1"',
        'mount -t proc proc "$R/proc"',
        'mount --rbind /sys "$R/sys"',
        'mount --rbind /dev "$R/dev"',
        'mount -t tmpfs -o size=16m,mode=0755 fleetlab-run "$R/run"',
        f'mkdir -p "$R/run/sshd" "$R{q}"',
        f'touch "$R{q}/aarch64" "$R{q}/qemu-aarch64-static"',
        f'mount --bind -o ro "$2" "$R{q}/aarch64"',
        f'mount --bind -o ro "$3" "$R{q}/qemu-aarch64-static"',
        f'printf "%s\\n" "$4" > "$R{q}/cpu"',
        f'exec chroot "$R" {SSHD} -f {_CONF_DIR}/sshd_config -E {_SSHD_LOG}',
    ])


def start_sshd(b: dict[str, Any]) -> None:
    """Start (or restart) the board's emulated sshd and wait until it listens."""
    root = Path(b["root_dir"])
    cpu = int(b.get("host_cpu", int(b["slot"]) % (os.cpu_count() or 1)))
    b["host_cpu"] = cpu
    argv = ["taskset", "-c", str(cpu),
            *netns.nsenter_argv(b["netns"]), "unshare", "--mount", "--propagation", "slave",
            "--", "sh", "-c", _board_script(), "sh", str(root), str(arm_binfmt.WRAPPER),
            str(arm_binfmt.QEMU_STATIC), b["cpu_model"]]
    netns.sh(argv, timeout=_SSHD_WAIT_S)
    deadline = time.monotonic() + _SSHD_WAIT_S
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((b["board_addr"], 22), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    log = root / _SSHD_LOG.lstrip("/")
    raise errors.LabError(f"the emulated sshd of {b['name']} does not listen on "
                          f"{b['board_addr']}:22 after {_SSHD_WAIT_S:g}s; see {log} "
                          f"(command: {shlex.join(argv)})", device=b["name"])


def check_cpu(b: dict[str, Any]) -> dict[str, Any]:
    """The board's processes as the host sees them: each should be qemu with the board's
    ``-cpu``. ``{"ok", "processes", "wrong"}``; ``wrong`` lists the others."""
    seen = [arm_binfmt.board_emulator(pid) for pid in netns.netns_pids(b["netns"])]
    wrong = [p for p in seen if p["executable"] is not None and (
        Path(p["executable"]).name != arm_binfmt.QEMU_STATIC.name
        or p["cpu"] != b["cpu_model"])]
    return {"ok": bool(seen) and not wrong, "processes": len(seen), "wrong": wrong}


def teardown(b: dict[str, Any]) -> None:
    """Unmount the board's store and overlay (its processes are gone by now)."""
    for key in ("agent_root_host", "root_dir"):
        path = b.get(key)
        if path and os.path.ismount(path):
            res = subprocess.run(["umount", path], capture_output=True, check=False)
            if res.returncode != 0:
                subprocess.run(["umount", "-l", path], capture_output=True, check=False)


def status(b: dict[str, Any]) -> dict[str, Any]:
    """The Arm part of ``lab status``: arch, CPU model, whether qemu runs it as such."""
    cpu = check_cpu(b)
    return {"arch": "arm64", "cpu_model": b["cpu_model"], "emulator": "qemu-user",
            "emulator_ok": cpu["ok"], "rootfs": b.get("rootfs"), "host_cpu": b.get("host_cpu")}
