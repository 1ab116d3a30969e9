"""Two processes writing the registry at once lose nothing: SQLite (WAL + BEGIN
IMMEDIATE) and PostgreSQL (row locks, advisory locks: fleet.registry.db.serialize)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fleet.home import FleetHome
from fleet.registry import Registry

pytestmark = pytest.mark.backends

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


RACER = r"""
import sys, uuid
from fleet.core import errors
from fleet.home import FleetHome
from fleet.registry import Registry
from fleet.registry import history as hist
from fleet.rollout.lease import take_over
reg = Registry.open(FleetHome.from_env(sys.argv[1]))
mode, arg, n = sys.argv[2], sys.argv[3], int(sys.argv[4])
won = 0
for i in range(n):
    if mode == "group":
        try:
            reg.create_group(f"{arg}{i}")
            won += 1
        except errors.DuplicateError:
            pass
    elif mode == "attempt":
        hist.record_attempt(reg, uuid.UUID(arg), i)
    elif mode == "take":
        won += take_over(reg, uuid.UUID(arg.split(",")[i]), ("racer", int(sys.argv[5])))
print(won)
"""


def _race(home: FleetHome, *args: str, procs: int = 2) -> list[int]:
    """Run RACER in ``procs`` processes at once; what each printed."""
    ps = [subprocess.Popen([sys.executable, "-c", RACER, str(home.path), *args, str(k)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for k in range(procs)]
    outs = []
    for p in ps:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        outs.append(int(out.strip()))
    return outs


def test_a_group_created_by_two_processes_at_once_is_made_once(home: FleetHome,
                                                                registry: Registry) -> None:
    """The second creator gets DuplicateError, never the database's raw IntegrityError."""
    won = _race(home, "group", "g", "40")
    assert sum(won) == 40
    assert len([g for g, _ in registry.list_groups()]) == 40


def test_attempts_counted_by_two_processes_lose_no_count(home: FleetHome,
                                                         registry: Registry) -> None:
    """``attempts += 1`` is a read and a write: the step's row lock keeps both counts."""
    from fleet.registry import history as hist

    registry.create_group("g")
    dev = registry.add_device("d", "local://d?root=/tmp/x", groups=["g"])
    _, steps = hist.create_deployment(registry, name="m", version=1, target="-g g",
                                      devices=[dev], artifact_id=None)
    _race(home, "attempt", str(steps["d"].id), "60")
    assert hist.steps_of(registry, _dep_of(registry))[0][0].attempts == 120


def _dep_of(reg: Registry):  # type: ignore[no-untyped-def]
    from fleet.registry import history as hist

    return hist.list_deployments(reg)[0][0].id


def test_an_interrupted_deployment_is_taken_over_by_one_process(home: FleetHome,
                                                                registry: Registry) -> None:
    from fleet.registry import history as hist
    from fleet.rollout.lease import abandon

    ids = []
    for i in range(15):
        dep, _ = hist.create_deployment(registry, name=f"m{i}", version=1, target="-g g",
                                        devices=[], artifact_id=None, lease=("h", 1))
        assert abandon(registry, dep.id, ("h", 1), "interrupted: test")
        ids.append(str(dep.id))
    won = _race(home, "take", ",".join(ids), "15")
    assert sum(won) == 15  # each deployment once, whichever process got it
