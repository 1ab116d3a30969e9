"""Pull-mode agents on IoT lab boards: ``fleet-agent pull`` inside a board's network
namespace, calling home to a ``fleet server`` in the root namespace.

Addressing: every board has its own /30 (:mod:`fleet.lab.iot`), so the server listens on
one address of the root namespace, the controller side of a board's veth (``host_addr``,
by default the first board's: :func:`server_address`), and :func:`reach` gives each other
board a /32 route to it through its own veth (the root namespace answers for any of its
addresses on any interface; nothing is forwarded). Traffic to and from a board therefore
crosses that board's veth, where :func:`fleet.lab.faults.apply_fault` shapes it.

The pull agent's root is ``<board agent root>/pull`` (on the board's size-limited tmpfs),
apart from the ssh agent's store, so push and pull on the same board never share an
identity. Boards share the controller's filesystem: the agent is the controller's own
``fleet-agent`` (x86_64 boards only; an Arm board's agent lives in its own root).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from fleet.core import errors
from fleet.home import FleetHome
from fleet.lab import iot, netns
from fleet.lab.base import shared_agent_cmd

__all__ = ["agent_argv", "forget", "free_port", "pull_root", "reach", "run_agent",
           "server_address", "tcp_retransmits", "unreach", "wait_ready"]


def _board(home: FleetHome, name: str) -> dict[str, Any]:
    b = iot.board(home, name)
    if (b.get("arch") or "x86_64") == "arm64":
        raise errors.UsageError(f"{name} is an Arm board: run its own agent (its root's "
                                "fleet-agent), not the controller's", device=name)
    return b


def server_address(home: FleetHome, name: str = "iot0") -> str:
    """The root-namespace address the lab's ``fleet server`` listens on: the controller
    side of board ``name``'s veth."""
    return str(iot.board(home, name)["host_addr"])


def reach(home: FleetHome, name: str, addr: str) -> None:
    """Route ``addr`` (a root-namespace address) from board ``name`` through its veth
    (idempotent; nothing to do when ``addr`` is the board's own peer)."""
    b = _board(home, name)
    if addr != b["host_addr"]:
        netns.sh(["ip", "-n", b["netns"], "route", "replace", f"{addr}/32", "via",
                  b["host_addr"], "dev", "eth0"])


def unreach(home: FleetHome, name: str, addr: str) -> None:
    """Remove the route :func:`reach` added (a missing one is fine)."""
    b = _board(home, name)
    if addr != b["host_addr"]:
        netns.sh(["ip", "-n", b["netns"], "route", "del", f"{addr}/32"], check=False)


def pull_root(home: FleetHome, name: str) -> Path:
    """The pull agent's root on board ``name`` (under the board's tmpfs store)."""
    return Path(_board(home, name)["agent_root"]) / "pull"


def forget(home: FleetHome, name: str) -> None:
    """Delete the board's pull agent root (its identity, store and state)."""
    root = pull_root(home, name)
    if root.parent.is_dir() and root.name == "pull":
        shutil.rmtree(root, ignore_errors=True)


def agent_argv(home: FleetHome, name: str, server: str, ca: Path, *extra: str
               ) -> list[str]:
    """``nsenter --net=<board> -- fleet-agent --root <pull root> pull --server … --ca …``
    (``extra``: ``--token T``, ``--once``, ``--max-rate N`` …)."""
    b = _board(home, name)
    return [*netns.nsenter_argv(b["netns"]), *shared_agent_cmd(), "--root",
            str(pull_root(home, name)), "pull", "--server", server, "--ca", str(ca), *extra]


def run_agent(home: FleetHome, name: str, server: str, ca: Path, *extra: str,
              timeout: float = 300.0) -> tuple[int, dict[str, Any]]:
    """Run the agent on board ``name`` (``extra`` as for :func:`agent_argv`, usually with
    ``--once``); returns its exit code and its last JSON line. LabError when it prints
    no JSON or outlives ``timeout`` (seconds)."""
    argv = agent_argv(home, name, server, ca, *extra)
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                             check=False)
    except subprocess.TimeoutExpired as exc:
        raise errors.LabError(f"the pull agent on {name} did not finish in {timeout:g}s",
                              device=name) from exc
    lines = res.stdout.strip().splitlines()
    try:
        doc = json.loads(lines[-1])
    except (IndexError, ValueError) as exc:
        raise errors.LabError(f"the pull agent on {name} printed no JSON (exit "
                              f"{res.returncode}): {res.stderr.strip()[-500:]}",
                              device=name) from exc
    return res.returncode, doc


def tcp_retransmits(home: FleetHome, name: str) -> int:
    """TCP segments retransmitted so far in board ``name``'s network namespace
    (``RetransSegs`` of its ``/proc/net/snmp``): proof that a lossy link lost packets."""
    b = _board(home, name)
    text = netns.sh([*netns.nsenter_argv(b["netns"]), "cat", "/proc/net/snmp"]
                    ).stdout.decode()
    rows = [line.split()[1:] for line in text.splitlines() if line.startswith("Tcp:")]
    if len(rows) != 2 or "RetransSegs" not in rows[0]:
        raise errors.LabError(f"no TCP counters in {name}'s /proc/net/snmp", device=name)
    return int(rows[1][rows[0].index("RetransSegs")])


def free_port(addr: str) -> int:
    """A TCP port free on ``addr`` right now (for the lab's server)."""
    with socket.socket() as s:
        s.bind((addr, 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, ca: Path, *, timeout_s: float = 120.0,
               proc: subprocess.Popen[Any] | None = None) -> None:
    """Wait until ``url``/healthz answers 200 over TLS pinned to ``ca``; LabError when
    it does not within ``timeout_s`` or ``proc`` (the server) exits first."""
    import ssl

    import httpx

    tls = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise errors.LabError(f"fleet server exited ({proc.returncode}) before "
                                  f"answering at {url}")
        try:
            if httpx.get(f"{url}/healthz", verify=tls, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise errors.LabError(f"fleet server did not answer at {url} in {timeout_s:g}s")
