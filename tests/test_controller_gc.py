"""``fleet gc``: the controller's package cache is pruned by the devices' keep policy."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from fleet.artifacts.gc import apply_gc, plan_gc
from fleet.cli.app import app
from fleet.home import FleetHome
from fleet.registry import Registry
from fleet.registry import history as hist
from fleet.registry.models import DeploymentState, StepState


def _fleet(tmp_path: Path) -> tuple[FleetHome, Registry]:
    home = FleetHome(tmp_path / "home")
    reg = Registry.init(home)
    reg.add_device("a", f"local://a?root={tmp_path / 'a'}")
    return home, reg


def _build(home: FleetHome, reg: Registry, name: str, version: int, size: int = 1000) -> Path:
    path = home.artifacts_dir / f"{name}-{version}.fpkg"
    path.write_bytes(b"x" * size)
    hist.record_artifact(reg, name=name, kind="model", version=version, digest=f"d{version}",
                         package_sha256=f"{name}{version}".ljust(64, "0"), size=size,
                         path=str(path), manifest={})
    return path


def _deploy(reg: Registry, name: str, version: int, state: StepState,
            status: DeploymentState = DeploymentState.COMPLETED) -> None:
    dev = reg.get_device("a")
    dep, steps = hist.create_deployment(reg, name=name, version=version, target="device:a",
                                        devices=[dev], artifact_id=None)
    hist.set_step(reg, steps["a"].id, state)
    with reg.session() as s:
        row = s.get(type(dep), dep.id)
        assert row is not None
        row.status = status
        s.add(row)


def test_keeps_active_previous_keep_more_and_the_newest_build(tmp_path: Path) -> None:
    home, reg = _fleet(tmp_path)
    paths = {v: _build(home, reg, "m", v) for v in range(1, 8)}
    for v in range(1, 6):
        _deploy(reg, "m", v, StepState.OK)
    _deploy(reg, "m", 6, StepState.FAILED)  # refused on the device: not kept for it
    plan = plan_gc(home, reg, keep=1)
    assert plan.keep["m"] == [3, 4, 5, 7]  # 5 active, 4 previous, 3 one more; 7 newest
    assert sorted(plan.delete) == sorted([paths[1], paths[2], paths[6]])
    assert plan.bytes_freed == 3000
    assert apply_gc(plan) == 3000
    assert [p.exists() for p in paths.values()] == [False, False, True, True, True, False,
                                                    True]


def test_an_interrupted_deployment_keeps_its_package(tmp_path: Path) -> None:
    home, reg = _fleet(tmp_path)
    paths = {v: _build(home, reg, "m", v) for v in range(1, 6)}
    for v in (3, 4, 5):
        _deploy(reg, "m", v, StepState.OK)
    _deploy(reg, "m", 1, StepState.PUSHING, DeploymentState.INTERRUPTED)
    plan = plan_gc(home, reg, keep=0)
    assert plan.keep["m"] == [1, 4, 5]
    assert plan.delete == [paths[2], paths[3]]


def test_a_package_outside_the_cache_is_never_deleted(tmp_path: Path) -> None:
    home, reg = _fleet(tmp_path)
    outside = tmp_path / "mine.fpkg"
    outside.write_bytes(b"y")
    hist.record_artifact(reg, name="m", kind="model", version=1, digest="d1",
                         package_sha256="o" * 64, size=1, path=str(outside), manifest={})
    _build(home, reg, "m", 2)
    plan = plan_gc(home, reg, keep=0)
    assert plan.delete == [] and outside.exists()


def test_cli_dry_run_deletes_nothing_and_json_lists_the_plan(tmp_path: Path) -> None:
    home, reg = _fleet(tmp_path)
    paths = [_build(home, reg, "m", v) for v in range(1, 5)]
    env = {"FLEET_HOME": str(home.path)}
    res = CliRunner().invoke(app, ["gc", "--keep", "0", "--dry-run", "--json"], env=env)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["dry_run"] is True and doc["keep"] == {"m": [4]}
    assert len(doc["delete"]) == 3 and all(p.exists() for p in paths)
    res = CliRunner().invoke(app, ["gc", "--keep", "0", "--json"], env=env)
    assert res.exit_code == 0 and [p.exists() for p in paths] == [False, False, False, True]
    res = CliRunner().invoke(app, ["gc", "--keep", "-1"], env=env)
    assert res.exit_code == 2
