"""Thin, bounded wrappers over ``ip``, ``tc`` and ``nft`` for the IoT lab.

Every call has a timeout; failures become :class:`fleet.core.errors.LabError` with the command
and its stderr. Nothing here picks names or addresses: :mod:`fleet.lab.iot` does, and only
ever passes the names it made.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from fleet.core import errors

__all__ = [
    "add_veth_pair",
    "delete_link",
    "kill_netns_processes",
    "link_exists",
    "link_state",
    "netns_add",
    "netns_delete",
    "netns_exists",
    "netns_pids",
    "nsenter_argv",
    "require_root_and_tools",
    "sh",
    "used_ipv4",
]

NETNS_DIR = Path("/run/netns")


def sh(argv: Sequence[str], *, check: bool = True, input: bytes | None = None,
       timeout: float = 20.0) -> subprocess.CompletedProcess[bytes]:
    try:
        res = subprocess.run(list(argv), input=input, capture_output=True, timeout=timeout,
                             check=False)
    except subprocess.TimeoutExpired as exc:
        raise errors.LabError(f"{' '.join(argv)} did not finish in {timeout:g}s",
                              argv=list(argv)) from exc
    except FileNotFoundError as exc:
        raise errors.LabError(f"{argv[0]} is not installed (apt-get install iproute2 "
                              "nftables openssh-server)", argv=list(argv)) from exc
    if check and res.returncode != 0:
        raise errors.LabError(
            f"{' '.join(argv)} failed ({res.returncode}): "
            f"{res.stderr.decode(errors='replace').strip()}", argv=list(argv),
            exit_code=res.returncode)
    return res


def require_root_and_tools(*tools: str) -> None:
    if os.geteuid() != 0:
        raise errors.UsageError("the IoT lab needs root (network namespaces, veth, tmpfs)")
    missing = [t for t in tools if shutil.which(t) is None and not Path(t).exists()]
    if missing:
        raise errors.LabError(f"missing tools for the lab: {', '.join(missing)} "
                              "(apt-get install iproute2 nftables openssh-server)",
                              missing=missing)


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def netns_add(name: str) -> None:
    sh(["ip", "netns", "add", name])


def netns_delete(name: str) -> None:
    if netns_exists(name):
        sh(["ip", "netns", "delete", name])


def nsenter_argv(name: str) -> list[str]:
    """Enter only the network namespace (not a mount namespace, unlike ``ip netns exec``):
    a board sees the controller's filesystem, tmpfs mounts included."""
    return ["nsenter", f"--net={NETNS_DIR / name}", "--"]


def netns_pids(name: str) -> list[int]:
    if not netns_exists(name):
        return []
    res = sh(["ip", "netns", "pids", name], check=False)
    return [int(p) for p in res.stdout.split() if p.strip().isdigit()]


def kill_netns_processes(name: str, *, grace_s: float = 2.0) -> list[int]:
    """SIGTERM every process in the namespace (all of them are the lab's), then SIGKILL."""
    pids = netns_pids(name)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and netns_pids(name):
        time.sleep(0.05)
    for pid in netns_pids(name):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def link_exists(ifname: str) -> bool:
    return Path("/sys/class/net", ifname).exists()


def link_state(ifname: str) -> str:
    try:
        return Path("/sys/class/net", ifname, "operstate").read_text().strip()
    except OSError:
        return "absent"


def add_veth_pair(host_if: str, netns: str, *, host_addr: str, board_addr: str,
                  prefix: int) -> None:
    """``host_if`` in the root namespace, ``eth0`` inside ``netns``, both up, addressed."""
    sh(["ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0",
        "netns", netns])
    sh(["ip", "addr", "add", f"{host_addr}/{prefix}", "dev", host_if])
    sh(["ip", "link", "set", host_if, "up"])
    sh(["ip", "-n", netns, "addr", "add", f"{board_addr}/{prefix}", "dev", "eth0"])
    sh(["ip", "-n", netns, "link", "set", "eth0", "up"])
    sh(["ip", "-n", netns, "link", "set", "lo", "up"])


def delete_link(ifname: str) -> None:
    if link_exists(ifname):
        sh(["ip", "link", "delete", ifname], check=False)


def used_ipv4() -> list[ipaddress.IPv4Interface]:
    """Every IPv4 address configured in the root namespace."""
    res = sh(["ip", "-o", "-4", "addr", "show"])
    out = []
    for line in res.stdout.decode().splitlines():
        fields = line.split()
        if "inet" in fields:
            out.append(ipaddress.IPv4Interface(fields[fields.index("inet") + 1]))
    return out
