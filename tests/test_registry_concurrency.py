"""Two processes writing the registry at once lose nothing (WAL + BEGIN IMMEDIATE)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fleet.home import FleetHome
from fleet.registry import Registry

WRITER = r"""
import sys
from fleet.home import FleetHome
from fleet.registry import Registry
home = FleetHome.from_env(sys.argv[1])
reg = Registry.open(home)
prefix, n = sys.argv[2], int(sys.argv[3])
for i in range(n):
    reg.add_device(f"{prefix}-{i:03d}", f"local://{prefix}{i}?root=/tmp/x", groups=["g"])
    reg.touch_device(f"{prefix}-{i:03d}", status="ok")
"""


def test_two_writer_processes_lose_nothing(home: FleetHome, registry: Registry) -> None:
    registry.create_group("g")
    n = 60
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(home.path), p, str(n)],
                              stderr=subprocess.PIPE) for p in ("a", "b")]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
    names = [d.name for d in registry.list_devices("g")]
    assert len(names) == 2 * n
    assert all(d.status == "ok" for d in registry.list_devices())
    assert Path(home.path / "registry.db").exists()
