"""The IoT lab: Linux "boards" that are network namespaces running real OpenSSH ``sshd``.

Layout (all names carry the home's tag, see :func:`fleet.lab.base.lab_tag`):

- board ``iotN``: namespace ``fleetlab-<tag>-iotN``; veth ``fl<tag4>iN`` in the root
  namespace, ``eth0`` inside; one private /30 per board out of ``10.213.0.0/16`` (used
  only by the lab): ``.1`` is the controller side, ``.2`` the board, sshd on port 22 of
  the board address only.
- runtime files in ``/run/fleetlab/<tag>/iotN/`` (0700): the board's own ed25519 host key,
  ``authorized_keys`` with the fleet's key, ``sshd_config``, pid file and log. sshd runs
  in the board's network namespace and a mount namespace of its own that only masks
  root's shell startup files (see :func:`start_sshd`); ``~`` is this machine's ``/root``.
- the agent's store: a size-limited tmpfs at ``/run/fleetlab/<tag>/iotN/agent`` (the
  board's agent root), so a full disk happens for real.
- the agent: boards share the controller's filesystem (only the network is namespaced),
  so they run the controller's ``.venv/bin/fleet-agent`` instead of one install each.

Arm boards (``arch="arm64"``, ``fleet lab up --iot N --arch arm64 --cpu MODEL``) have the
same network side but their own arm64 Debian userland, every process of it in qemu-user
with the board's CPU model, and no agent until ``fleet device bootstrap``
(:mod:`fleet.lab.arm_board`, :mod:`fleet.lab.arm_rootfs`, :mod:`fleet.lab.arm_binfmt`).
:func:`up` without ``start_index`` keeps the boards of the same arch and CPU model and adds
boards after the others, so ``up(1, arch="arm64", cpu="max")`` then
``up(1, arch="arm64", cpu="cortex-a53")`` gives two boards.

Everything made is recorded in ``home.lab_dir/iot.json``; :func:`down` removes it by name.
"""

from __future__ import annotations

import base64
import contextlib
import io
import ipaddress
import os
import platform
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fleet.core import errors
from fleet.core.filelock import exclusive
from fleet.home import FleetHome
from fleet.lab import netns
from fleet.lab.base import (
    LabDevice,
    lab_tag,
    load_state,
    register_devices,
    save_state,
    shared_agent_cmd,
    unregister_devices,
)
from fleet.transports._known_hosts import KnownHosts, ensure_ssh_key, fingerprint

__all__ = ["GROUP", "KIND", "SUBNET", "board", "down", "normalize_arch", "start_sshd",
           "status", "up", "update_board"]

KIND = "iot"
GROUP = "lab-iot"
SUBNET = ipaddress.IPv4Network("10.213.0.0/16")
RUN_ROOT = Path("/run/fleetlab")
SSHD = "/usr/sbin/sshd"
DEFAULT_STORE_MB = 192
_STARTUP_FILES = (".bashrc", ".bash_profile", ".bash_login", ".profile")
_MAX_SLOTS = 1024  # bounded allocation search: 1024 boards is far beyond any lab here
HOST_ARCH = "x86_64" if platform.machine() in ("x86_64", "AMD64") else platform.machine()
DEFAULT_ARM_CPU = "max"
_ARCHES = {"x86_64": "x86_64", "amd64": "x86_64", "host": HOST_ARCH, "arm64": "arm64",
           "aarch64": "arm64"}
_CPU_RE = re.compile(r"[a-z0-9][a-z0-9.-]*(,[a-z0-9-]+=[a-z0-9.-]+)*")


def normalize_arch(arch: str | None, cpu: str | None) -> tuple[str, str | None]:
    """``(arch, cpu_model)`` of a board spec: ``("x86_64", None)`` (the host's own CPU) or
    ``("arm64", "max")``. ``cpu`` is qemu's ``-cpu`` value (``cortex-a53``,
    ``max,pauth=off``). Raises :class:`UsageError` for an unknown arch or CPU model."""
    key = (arch or "host").lower()
    if key not in _ARCHES:
        raise errors.UsageError(f"unknown --arch {arch!r}; known: x86_64 (the host), arm64")
    norm = _ARCHES[key]
    if norm == HOST_ARCH and norm != "arm64":
        if cpu:
            raise errors.UsageError("--cpu applies to emulated boards only (--arch arm64)")
        return norm, None
    if norm != "arm64":
        raise errors.UsageError(f"--arch {arch} boards cannot be made on this {HOST_ARCH} host")
    model = cpu or DEFAULT_ARM_CPU
    if not _CPU_RE.fullmatch(model):
        raise errors.UsageError(f"--cpu {model!r} is not a qemu CPU model "
                                "(e.g. max, cortex-a53, max,pauth=off)")
    known = _qemu_cpu_models()
    if known and model.split(",")[0] not in known:
        raise errors.UsageError(f"qemu-aarch64 has no CPU model {model.split(',')[0]!r}; "
                                f"known: {', '.join(known)}")
    return norm, model


def _qemu_cpu_models() -> list[str]:
    from fleet.lab.arm_binfmt import QEMU_STATIC

    try:
        res = subprocess.run([str(QEMU_STATIC), "-cpu", "help"], capture_output=True,
                             text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in res.stdout.splitlines()[1:] if line.strip()]


def _spec(b: dict[str, Any]) -> tuple[str, str | None]:
    return str(b.get("arch") or "x86_64"), b.get("cpu_model")


def _rundir(home: FleetHome) -> Path:
    return RUN_ROOT / lab_tag(home)


@contextlib.contextmanager
def _global_lock() -> Iterator[None]:
    """Address and name allocation is machine-wide: serialise it across processes."""
    RUN_ROOT.mkdir(parents=True, exist_ok=True, mode=0o755)
    with exclusive(RUN_ROOT / ".lock"):
        yield


def _free_slot(taken: set[int]) -> int:
    used = netns.used_ipv4()
    for iface in used:
        if iface.network.overlaps(SUBNET) and iface.network.prefixlen < 30:
            raise errors.LabError(f"{iface} overlaps the lab range {SUBNET}; refusing to "
                                  "add lab addresses next to a real network")
    busy = {int(i.ip) for i in used if i.ip in SUBNET}
    for slot in range(_MAX_SLOTS):
        if slot in taken:
            continue
        base = int(SUBNET.network_address) + 4 * slot
        if not busy.intersection(range(base, base + 4)):
            return slot
    raise errors.LabError(f"no free /30 left in the first {_MAX_SLOTS} of {SUBNET}")


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _make_host_key(path: Path) -> paramiko.PKey:
    key = ed25519.Ed25519PrivateKey.generate()
    _write_private(path, key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()))
    return paramiko.Ed25519Key.from_private_key_file(str(path))


def _new_host_key() -> tuple[bytes, paramiko.PKey]:
    pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption())
    return pem, paramiko.Ed25519Key.from_private_key(io.StringIO(pem.decode()))


def _sshd_config(rt: Path, board_addr: str) -> str:
    return "\n".join([
        f"ListenAddress {board_addr}:22",
        f"HostKey {rt / 'ssh_host_ed25519_key'}",
        f"PidFile {rt / 'sshd.pid'}",
        f"AuthorizedKeysFile {rt / 'authorized_keys'}",
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


def start_sshd(b: dict[str, Any]) -> None:
    """Start (or restart) the board's sshd in its namespace and wait until it listens."""
    if _spec(b)[0] == "arm64":
        from fleet.lab import arm_board

        arm_board.start_sshd(b)
        return
    rt = Path(b["runtime_dir"])
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # OpenSSH's privilege separation dir
    empty = rt / "empty"
    empty.write_bytes(b"")
    # The board gets its own mount namespace whose only change hides the login user's shell
    # startup files (bash runs ~/.bashrc for every ssh command; a developer's pyenv/conda
    # init there costs ~0.3 s per command and is no part of a board). Everything else,
    # including later mounts of the root namespace (the agent tmpfs, via slave
    # propagation), is this machine's filesystem.
    user_home = Path(os.path.expanduser("~root"))
    masks = " && ".join(f'mount --bind "$1" "{user_home / n}"' for n in _STARTUP_FILES
                        if (user_home / n).is_file())
    netns.sh([*netns.nsenter_argv(b["netns"]), "unshare", "--mount", "--propagation", "slave",
              "--", "sh", "-c", f'{masks + " && " if masks else ""}exec "$2" -f "$3" -E "$4"',
              "sh", str(empty), SSHD, str(rt / "sshd_config"), str(rt / "sshd.log")])
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((b["board_addr"], 22), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise errors.LabError(f"sshd of {b['name']} does not listen on {b['board_addr']}:22; "
                          f"see {rt / 'sshd.log'}", device=b["name"])


def _make_board(home: FleetHome, name: str, slot: int, store_mb: int,
                fleet_pub: str, spec: tuple[str, str | None] = ("x86_64", None),
                rootfs: Path | None = None) -> dict[str, Any]:
    tag = lab_tag(home)
    index = name.removeprefix("iot")
    base = SUBNET.network_address + 4 * slot
    rt = _rundir(home) / name
    b: dict[str, Any] = {
        "name": name, "slot": slot, "netns": f"fleetlab-{tag}-{name}",
        "host_if": f"fl{tag[:4]}i{index}", "host_addr": str(base + 1),
        "board_addr": str(base + 2), "prefix": 30, "runtime_dir": str(rt),
        "agent_root": str(rt / "agent"), "store_mb": store_mb, "faults": {},
        "arch": spec[0], "cpu_model": spec[1],
    }
    netns.netns_add(b["netns"])
    netns.add_veth_pair(b["host_if"], b["netns"], host_addr=b["host_addr"],
                        board_addr=b["board_addr"], prefix=30)
    rt.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(rt, 0o700)
    if spec[0] == "arm64":
        return _make_arm_board(home, b, rootfs, fleet_pub)
    key = _make_host_key(rt / "ssh_host_ed25519_key")
    b["host_key"] = f"{key.get_name()} {key.get_base64()}"
    b["host_key_fingerprint"] = fingerprint(key)
    _write_private(rt / "authorized_keys", fleet_pub.encode())
    (rt / "sshd_config").write_text(_sshd_config(rt, b["board_addr"]))
    Path(b["agent_root"]).mkdir(mode=0o700, exist_ok=True)
    netns.sh(["mount", "-t", "tmpfs", "-o", f"size={store_mb}m,mode=0700",
              f"fleetlab-{name}", b["agent_root"]])
    b["mounted"] = True
    start_sshd(b)
    return b


def _make_arm_board(home: FleetHome, b: dict[str, Any], rootfs: Path | None,
                    fleet_pub: str) -> dict[str, Any]:
    from fleet.lab import arm_binfmt, arm_board

    if rootfs is None:
        raise errors.LabError("an arm64 board needs the arm64 root (fleet.lab.arm_rootfs)")
    rt = Path(b["runtime_dir"])
    b.update(rootfs=str(rootfs), root_dir=str(rt / "root"),
             agent_root=arm_board.AGENT_ROOT,
             agent_root_host=str(rt / "root" / arm_board.AGENT_ROOT.lstrip("/")),
             agent_cmd=list(arm_board.AGENT_CMD))
    arm_binfmt.acquire(f"{lab_tag(home)}/{b['name']}")
    b["binfmt_user"] = f"{lab_tag(home)}/{b['name']}"
    pem, key = _new_host_key()
    b["host_key"] = f"{key.get_name()} {key.get_base64()}"
    b["host_key_fingerprint"] = fingerprint(key)
    arm_board.make_root(b, rootfs, host_key_pem=pem, fleet_pub=fleet_pub)
    start_sshd(b)
    return b


def _store_path(b: dict[str, Any]) -> str:
    """The agent store as the host sees it (an Arm board's is inside its root)."""
    return str(b.get("agent_root_host") or b["agent_root"])


def _device(b: dict[str, Any]) -> LabDevice:
    agent = list(b.get("agent_cmd") or shared_agent_cmd())
    uri = (f"ssh://root@{b['board_addr']}:22?root={quote(b['agent_root'], safe='/')}"
           f"&agent={quote(' '.join(agent), safe='/')}")
    extra = {k: b[k] for k in ("netns", "host_if", "host_addr", "board_addr",
                               "host_key_fingerprint", "store_mb", "runtime_dir")}
    extra.update(arch=_spec(b)[0], cpu_model=_spec(b)[1], agent_root_host=_store_path(b))
    if b.get("root_dir"):
        extra["root_dir"] = b["root_dir"]
    return LabDevice(name=b["name"], uri=uri, platform="linux", group=GROUP,
                     agent_root=b["agent_root"], agent_cmd=agent, extra=extra)


def _alive(b: dict[str, Any]) -> bool:
    return netns.netns_exists(b["netns"]) and bool(netns.netns_pids(b["netns"]))


def _teardown(b: dict[str, Any]) -> None:
    netns.kill_netns_processes(b["netns"])
    if b.get("root_dir"):  # an Arm board: its store and overlay
        from fleet.lab import arm_board

        arm_board.teardown(b)
    mount = b.get("agent_root")
    if mount and os.path.ismount(mount):
        res = netns.sh(["umount", mount], check=False)
        if res.returncode != 0:
            netns.sh(["umount", "-l", mount], check=False)
    netns.delete_link(b["host_if"])
    netns.netns_delete(b["netns"])
    if b.get("binfmt_user"):
        from fleet.lab import arm_binfmt

        arm_binfmt.release(b["binfmt_user"])
    rt = Path(b["runtime_dir"])
    if rt.is_dir() and rt.parent.parent == RUN_ROOT:  # only ever our own directory
        shutil.rmtree(rt, ignore_errors=True)


def _names(state: dict[str, Any], count: int, start_index: int | None,
           spec: tuple[str, str | None]) -> list[str]:
    """The boards an ``up`` call is about: ``iot<start_index>``.. when given, else the
    boards of this spec (arch, CPU model) already there, then new names after the rest."""
    if start_index is not None:
        names = [f"iot{i}" for i in range(start_index, start_index + count)]
        for n in names:
            if n in state and _alive(state[n]) and _spec(state[n]) != spec:
                raise errors.UsageError(f"{n} runs as {_spec(state[n])}, not {spec}")
        return names
    def index(n: str) -> int:
        return int(n.removeprefix("iot"))
    same = sorted((n for n, b in state.items() if _spec(b) == spec), key=index)[:count]
    nxt = max((index(n) + 1 for n in state), default=0)
    return same + [f"iot{nxt + k}" for k in range(count - len(same))]


def up(home: FleetHome, count: int, *, start_index: int | None = None,
       store_mb: int = DEFAULT_STORE_MB, arch: str | None = None, cpu: str | None = None,
       cache: Path | None = None, log: Callable[[str], None] = lambda _: None
       ) -> list[LabDevice]:
    """Make ``count`` boards of one spec (running ones are kept as they are), pin their
    host keys, register them in group ``lab-iot``.

    ``start_index`` names them ``iot<start_index>``..; without it the boards of this spec
    already there are kept and the rest are added after every other board. ``arch``
    ``"arm64"`` makes Arm boards in qemu-user with CPU model ``cpu`` (default ``max``);
    ``cache`` is where their root is built and kept (:mod:`fleet.lab.arm_rootfs`).
    """
    if count < 0 or count > 256:
        raise errors.UsageError(f"--iot takes 0..256 boards, not {count}")
    spec = normalize_arch(arch, cpu)
    tools = ["ip", "tc", "nft", "nsenter", "unshare"]
    netns.require_root_and_tools(*tools, *([] if spec[0] == "arm64" else [SSHD]))
    home.ensure()
    fleet_pub = ensure_ssh_key(home.ssh_key).with_name(home.ssh_key.name + ".pub").read_text()
    known = KnownHosts(home.known_hosts)
    rootfs: Path | None = None
    if spec[0] == "arm64" and count:
        from fleet.lab import arm_rootfs

        rootfs = Path(arm_rootfs.ensure(cache, log=log)["path"])
    boards: list[dict[str, Any]] = []
    with _global_lock():
        state = load_state(home, KIND)
        taken = {int(b["slot"]) for b in state.values()}
        for name in _names(state, count, start_index, spec):
            i = int(name.removeprefix("iot"))
            old = state.get(name)
            if old is not None and _alive(old) and (
                    _spec(old)[0] != "arm64" or old.get("rootfs") == str(rootfs)):
                boards.append(old)
                continue
            if old is not None:
                _teardown(old)
                taken.discard(int(old["slot"]))
                del state[name]
            slot = _free_slot(taken)
            taken.add(slot)
            try:
                b = _make_board(home, name, slot, store_mb, fleet_pub, spec, rootfs)
            except BaseException:
                rt = _rundir(home) / name
                _teardown({"netns": f"fleetlab-{lab_tag(home)}-{name}",
                           "host_if": f"fl{lab_tag(home)[:4]}i{i}",
                           "runtime_dir": str(rt), "agent_root": str(rt / "agent"),
                           **({"root_dir": str(rt / "root"),
                               "agent_root_host": str(rt / "root/var/lib/fleet-agent"),
                               "binfmt_user": f"{lab_tag(home)}/{name}"}
                              if spec[0] == "arm64" else {})})
                save_state(home, KIND, state)
                raise
            state[name] = b
            save_state(home, KIND, state)  # after each board: a crash leaves a record
            boards.append(b)
    for b in boards:
        known.pin(b["board_addr"], 22, _pkey(b["host_key"]), replace=True)
    devices = [_device(b) for b in boards]
    register_devices(home, devices)
    return devices


def _pkey(line: str) -> paramiko.PKey:
    key_type, b64 = line.split()[:2]
    return paramiko.PKey.from_type_string(key_type, base64.b64decode(b64))


def board(home: FleetHome, name: str) -> dict[str, Any]:
    """The lab's record of one board (NotFoundError if the lab did not make it)."""
    state = load_state(home, KIND)
    if name not in state:
        raise errors.NotFoundError(f"{name!r} is not an IoT lab board of this home "
                                   f"(boards: {', '.join(sorted(state)) or 'none'})",
                                   kind="lab board", name=name)
    b: dict[str, Any] = state[name]
    return b


def update_board(home: FleetHome, name: str, **fields: Any) -> None:
    with _global_lock():
        state = load_state(home, KIND)
        if name in state:
            state[name].update(fields)
            save_state(home, KIND, state)


def down(home: FleetHome) -> list[str]:
    """Remove every board this home's lab made (and strays carrying its tag), by name."""
    tag = lab_tag(home)
    removed: list[str] = []
    with _global_lock():
        state = load_state(home, KIND)
        for name, b in sorted(state.items()):
            _teardown(b)
            removed.append(name)
        # strays from an interrupted `up`: only names with this home's prefix
        prefix = f"fleetlab-{tag}-iot"
        if netns.NETNS_DIR.is_dir():
            for entry in sorted(netns.NETNS_DIR.iterdir()):
                if entry.name.startswith(prefix):
                    name = entry.name.removeprefix(f"fleetlab-{tag}-")
                    rt = _rundir(home) / name
                    arm = (rt / "root").is_dir()
                    _teardown({"netns": entry.name, "host_if": f"fl{tag[:4]}i{name[3:]}",
                               "runtime_dir": str(rt), "agent_root": str(rt / "agent"),
                               **({"root_dir": str(rt / "root"),
                                   "agent_root_host": str(rt / "root/var/lib/fleet-agent"),
                                   "binfmt_user": f"{tag}/{name}"} if arm else {})})
                    if name not in removed:
                        removed.append(name)
        save_state(home, KIND, {})
        rd = _rundir(home)
        if rd.is_dir() and not any(rd.iterdir()):
            rd.rmdir()
    known = KnownHosts(home.known_hosts)
    for b in state.values():
        known.forget(b["board_addr"], 22)
    unregister_devices(home, removed)
    return removed


def status(home: FleetHome) -> list[dict[str, Any]]:
    rows = []
    for name, b in sorted(load_state(home, KIND).items(), key=lambda kv: int(kv[1]["slot"])):
        store: dict[str, int] = {}
        if os.path.ismount(_store_path(b)):
            st = os.statvfs(_store_path(b))
            store = {"size": st.f_blocks * st.f_frsize, "free": st.f_bavail * st.f_frsize}
        pids = netns.netns_pids(b["netns"])
        arch, cpu = _spec(b)
        extra: dict[str, Any] = {"arch": arch, "cpu_model": cpu or "host"}
        if arch == "arm64":
            from fleet.lab import arm_board

            extra.update(arm_board.status(b), agent_root_host=_store_path(b))
        rows.append({**extra,
            "name": name, "kind": KIND, "group": GROUP, "address": b["board_addr"],
            "netns": b["netns"], "host_if": b["host_if"], "host_addr": b["host_addr"],
            "link": netns.link_state(b["host_if"]), "sshd": "running" if pids else "stopped",
            "processes": len(pids), "agent_root": b["agent_root"], "store": store,
            "host_key_fingerprint": b["host_key_fingerprint"], "faults": b.get("faults", {}),
        })
    return rows
