"""Real link faults on an IoT lab board: ``tc tbf`` for bandwidth, nftables random drop for
loss, ``ip link`` for down/up, and stopping/starting the board's sshd.

netem is not in this kernel, so loss comes from nftables (``numgen random mod 100 < P``),
applied in the board's namespace on ``eth0`` in both directions; bandwidth is a token
bucket on both ends of the veth (controller -> board on the root side, board -> controller
inside the namespace). Faults touch only the veth and namespace the lab made.
"""

from __future__ import annotations

import re
from typing import Any

from fleet.core import errors
from fleet.home import FleetHome
from fleet.lab import iot, netns

__all__ = ["apply_fault", "parse_rate"]

NFT_TABLE = "fleetlab_fault"
_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)$")
_FACTOR = {"bit": 1, "kbit": 1_000, "mbit": 1_000_000, "gbit": 1_000_000_000}


def parse_rate(rate: str) -> int:
    """``2mbit`` -> 2000000 (bits per second); the units tc understands, lower case."""
    m = _RATE.fullmatch(rate.strip().lower())
    if not m:
        raise errors.UsageError(f"bandwidth {rate!r} is not like 2mbit, 500kbit, 1gbit")
    bits = int(float(m.group(1)) * _FACTOR[m.group(2)])
    if not 8_000 <= bits <= 10_000_000_000:
        raise errors.UsageError(f"bandwidth {rate!r} out of range (8kbit..10gbit)")
    return bits


def _tbf(ns: str | None, dev: str, bits: int) -> None:
    # bucket >= 10 ms of traffic and >= a few MTUs; tbf segments GSO packets larger than it
    burst = max(bits // 8 // 100, 16 * 1024)
    base = ["tc"] + (["-n", ns] if ns else [])
    netns.sh([*base, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", str(bits),
              "burst", str(burst), "latency", "200ms"])


def _clear_tbf(ns: str | None, dev: str) -> None:
    base = ["tc"] + (["-n", ns] if ns else [])
    netns.sh([*base, "qdisc", "del", "dev", dev, "root"], check=False)


def _nft(ns: str, script: str) -> None:
    netns.sh([*netns.nsenter_argv(ns), "nft", "-f", "-"], input=script.encode())


def _set_loss(ns: str, percent: int) -> None:
    _clear_loss(ns)
    _nft(ns, f"""table inet {NFT_TABLE} {{
  chain in {{
    type filter hook input priority 0; policy accept;
    iifname "eth0" numgen random mod 100 < {percent} drop
  }}
  chain out {{
    type filter hook output priority 0; policy accept;
    oifname "eth0" numgen random mod 100 < {percent} drop
  }}
}}
""")


def _clear_loss(ns: str) -> None:
    netns.sh([*netns.nsenter_argv(ns), "nft", "delete", "table", "inet", NFT_TABLE],
             check=False)


def apply_fault(home: FleetHome, device: str, *, bandwidth: str | None = None,
                loss: int | None = None, down: bool = False, up: bool = False,
                clear: bool = False, stop_sshd: bool = False, start_sshd: bool = False
                ) -> dict[str, Any]:
    """Apply the requested faults to one board; returns the board's faults afterwards."""
    if down and up:
        raise errors.UsageError("--down and --up together make no sense")
    if loss is not None and not 0 <= loss <= 100:
        raise errors.UsageError(f"--loss is a percentage 0..100, not {loss}")
    b = iot.board(home, device)
    ns, host_if = b["netns"], b["host_if"]
    faults: dict[str, Any] = dict(b.get("faults", {}))
    if clear:
        _clear_tbf(None, host_if)
        _clear_tbf(ns, "eth0")
        _clear_loss(ns)
        netns.sh(["ip", "link", "set", host_if, "up"])
        faults = {}
    if bandwidth is not None:
        bits = parse_rate(bandwidth)
        _tbf(None, host_if, bits)
        _tbf(ns, "eth0", bits)
        faults["bandwidth"] = bandwidth
    if loss is not None:
        if loss == 0:
            _clear_loss(ns)
            faults.pop("loss", None)
        else:
            _set_loss(ns, loss)
            faults["loss"] = loss
    if down:
        netns.sh(["ip", "link", "set", host_if, "down"])
        faults["link"] = "down"
    if up:
        netns.sh(["ip", "link", "set", host_if, "up"])
        faults.pop("link", None)
    if stop_sshd:
        netns.kill_netns_processes(ns)
        faults["sshd"] = "stopped"
    if start_sshd:
        if not netns.netns_pids(ns):
            iot.start_sshd(b)
        faults.pop("sshd", None)
    iot.update_board(home, device, faults=faults)
    return {"name": device, "faults": faults, "link": netns.link_state(host_if)}
