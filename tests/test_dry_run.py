"""Selectors on a probed local fleet, ``--dry-run`` (plan printed, nothing written, no
device touched), deploy JSON, ``device show`` for people, and the pure plans."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fleet.artifacts import init_signing_key
from fleet.cli.app import app
from fleet.home import FleetHome
from fleet.registry import Device
from fleet.rollout.plan import plan_deploy, plan_lora_push, plan_rollback
from tests.conftest import REPO

TINY = REPO / "models" / "tiny" / "tiny.mnn"
TINY_ONNX = REPO / "models" / "tiny" / "tiny.onnx"
SEL = "hw.arch=x86_64,site=lab"


@dataclass
class Lab:
    root: Path
    home: FleetHome
    fleet: Callable[..., Any]
    probe: Any
    deploy: Any


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    """Four local devices in group ``lab``: a, b (site=lab), c (site=other) probed with the
    real native probe; d (site=lab) enrolled, never probed. tiny deployed with ``-l SEL``."""
    root = tmp_path_factory.mktemp("dry")
    home = FleetHome.from_env(root / "home")
    runner = CliRunner()

    def fleet(*args: str) -> Any:
        return runner.invoke(app, ["--home", str(home.path), *args],
                             env={"NO_COLOR": "1", "COLUMNS": "200", "FLEET_DB": None,
                                  "FLEET_HOME": str(home.path)})

    assert fleet("init").exit_code == 0
    init_signing_key(home)
    fleet("group", "create", "lab")
    for name, site in (("a", "lab"), ("b", "lab"), ("c", "other"), ("d", "lab")):
        r = fleet("device", "add", f"local://{name}?root={root / 'devices' / name}",
                  "--name", name, "-g", "lab", "--tag", f"site={site}")
        assert r.exit_code == 0, r.output
    probe = fleet("device", "probe", "-d", "a", "-d", "b", "-d", "c", "--json")
    deploy = fleet("deploy", str(TINY), "-l", SEL, "--iterations", "1", "--warmup", "0",
                   "--json")
    return Lab(root, home, fleet, probe, deploy)


def _names(result: Any) -> list[str]:
    assert result.exit_code == 0, result.output
    return [d["name"] for d in json.loads(result.stdout)]


def test_a_selector_on_probed_hardware_and_tags_picks_the_devices(lab: Lab) -> None:
    assert lab.probe.exit_code == 0, lab.probe.output
    probed = {r["device"]: r["facts"] for r in json.loads(lab.probe.stdout)}
    assert {f["hw.arch"] for f in probed.values()} == {"x86_64"}  # what this machine is
    assert _names(lab.fleet("device", "list", "-l", SEL, "--json")) == ["a", "b"]
    assert _names(lab.fleet("device", "list", "-l", "site=lab", "--json")) == ["a", "b", "d"]
    assert _names(lab.fleet("device", "list", "-l", "!hw.arch", "--json")) == ["d"]
    assert _names(lab.fleet("device", "list", "-l", "hw.arch=arm64", "--json")) == []
    # the deploy went exactly to the selected devices; its JSON names the model
    assert lab.deploy.exit_code == 0, lab.deploy.output
    doc = json.loads(lab.deploy.stdout)
    assert doc["model"] == "tiny@1" and doc["name"] == "tiny" and doc["version"] == 1
    assert doc["targets"] == {"groups": [], "devices": [], "selectors": [SEL]}
    assert [r["device"] for r in doc["results"]] == ["a", "b"]
    for row in doc["results"]:
        assert row["status"] == "ok" and row["model"] == "tiny" and row["version"] == 1
        assert isinstance(row["findings"], list)
    # facts follow the deploy: the active model is selectable
    assert _names(lab.fleet("device", "list", "-l", "model=tiny@1", "--json")) == ["a", "b"]
    deps = json.loads(lab.fleet("deployment", "list", "--json").stdout)
    assert deps[0]["targets"]["selectors"] == [SEL] and deps[0]["model"] == "tiny@1"


def _state(lab: Lab) -> tuple[list[Any], dict[str, Any]]:
    """Every table's rows and every file's bytes (home, registry after a checkpoint,
    device roots); the write-ahead log is checkpointed into the database first."""
    con = sqlite3.connect(lab.home.path / "registry.db")
    try:
        assert con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
        dump = [(t, sorted(con.execute(f'SELECT * FROM "{t}"').fetchall(), key=repr))
                for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type='table' "
                                        "ORDER BY name")]
    finally:
        con.close()
    files = {str(p.relative_to(lab.root)): (p.stat().st_mode,
                                            hashlib.sha256(p.read_bytes()).hexdigest())
             for p in sorted(lab.root.rglob("*"))
             if p.is_file() and not p.name.endswith(("-wal", "-shm"))}
    return dump, files


def _plan(result: Any, code: int = 0) -> dict[str, Any]:
    assert result.exit_code == code, result.output
    doc: dict[str, Any] = json.loads(result.stdout)
    assert doc["dry_run"] is True
    return doc


def test_dry_runs_print_the_plan_and_change_nothing(lab: Lab) -> None:
    assert lab.deploy.exit_code == 0
    before = _state(lab)
    wal = lab.home.path / "registry.db-wal"
    # a new model through the whole prepare path: ONNX conversion, check, golden data
    r = lab.fleet("deploy", str(TINY_ONNX), "--name", "tinyx", "--variant", "fp16", "-g",
                  "lab", "--waves", "1,50%,100%", "--dry-run", "--json")
    plan = _plan(r)
    assert "converting tiny.onnx (fp16)" in r.stderr
    assert plan["model"] == "tinyx@1" and plan["package"]["variant"] == "fp16"
    assert plan["waves"] == [["a"], ["b"], ["c", "d"]]
    rows = {d["device"]: d for d in plan["devices"]}
    assert [rows[n]["wave"] for n in "abcd"] == [1, 2, 3, 3]
    assert {d["action"] for d in rows.values()} == {"send"}
    assert all(d["bytes"] > 50_000 and d["version"] == 1 for d in rows.values())
    assert plan["totals"]["bytes"] == sum(d["bytes"] for d in rows.values())
    # the deployed model: a and b run it, c and d get it
    plan = _plan(lab.fleet("deploy", str(TINY), "-g", "lab", "--dry-run", "--json"))
    assert plan["package"]["size_estimated"] is False  # the built package's own size
    acts = {d["device"]: (d["action"], d["reason"]) for d in plan["devices"]}
    assert acts["a"] == acts["b"] == ("skip", "already active (as last reported)")
    assert acts["c"][0] == acts["d"][0] == "send"
    assert {d["device"]: d["bytes"] for d in plan["devices"]}["a"] == 0
    text = lab.fleet("deploy", str(TINY), "-g", "lab", "--dry-run")
    assert text.exit_code == 0 and "nothing written" in text.stdout
    assert "2 send, 2 skip, 0 refuse" in text.stdout
    # a rollback: a and b have no previous version; exit 17 (the plan refuses devices)
    plan = _plan(lab.fleet("rollback", "tiny", "-g", "lab", "--dry-run", "--json"), 17)
    acts = {d["device"]: d["action"] for d in plan["devices"]}
    assert acts == {"a": "refuse", "b": "refuse", "c": "send", "d": "send"}
    plan = _plan(lab.fleet("rollback", "tiny", "-d", "a", "--to", "1", "--dry-run", "--json"))
    assert plan["devices"][0]["action"] == "skip"
    # a LoRA push of a model package is refused before anything is sent
    pkg = next((lab.home.path / "artifacts").glob("tiny-1-*.fpkg"))
    r = lab.fleet("lora", "push", str(pkg), "-g", "lab", "--dry-run")
    assert r.exit_code == 2 and "not a LoRA pack" in r.stderr
    assert not wal.exists() or wal.stat().st_size == 0  # not even an uncommitted page
    assert _state(lab) == before  # registry byte for byte, home and device roots


def test_device_show_reads_as_text_and_its_json_is_complete(lab: Lab) -> None:
    assert lab.deploy.exit_code == 0
    r = lab.fleet("device", "show", "a")
    assert r.exit_code == 0, r.output
    for python in ("{'", "None", "True", "False", "datetime"):
        assert python not in r.stdout, python
    assert "site=lab" in r.stdout and "hw.arch" in r.stdout and "x86_64" in r.stdout
    assert "revoked        no" in r.stdout
    doc = json.loads(lab.fleet("device", "show", "a", "--json").stdout)
    assert doc["tags"] == {"site": "lab"} and doc["groups"] == ["lab"]
    assert doc["facts"]["hw.arch"] == "x86_64" and doc["facts"]["model.tiny"] == 1
    assert doc["installed"]["tiny"]["active"] == 1 and doc["revoked"] is False
    assert "BEGIN PUBLIC KEY" in doc["public_key"]
    d = json.loads(lab.fleet("device", "show", "d", "--json").stdout)
    assert not any(k.startswith("hw.") for k in d["facts"])  # never probed


def _dev(name: str, **facts: Any) -> Device:
    return Device(name=name, platform="linux", uri=f"local://{name}", status="ok",
                  public_key="PEM", fingerprint=f"fp-{name}", facts=facts)


def test_plans_refuse_with_reasons() -> None:
    seen = {"_status_at": "2026-01-01T00:00:00+00:00"}
    inst = {"active": 2, "previous": 1, "versions": [1, 2], "digest": "d2"}
    devs = [_dev("fresh", **seen),
            _dev("newer", **seen, _installed={"m": inst}),
            _dev("conflict", **seen, _installed={"m": {**inst, "active": 3, "digest": "x"}}),
            _dev("full", **seen, _disk_free=1000),
            _dev("foreign", **seen)]
    revoked = _dev("revoked")
    revoked.revoked_at = datetime.now(UTC)
    plan = plan_deploy([*devs, revoked], name="m", version=3, digest="d3", size=50_000,
                       recipients={f"fp-{n}" for n in ("fresh", "newer", "conflict", "full",
                                                       "revoked")})
    why = {d.device: (d.action, d.reason) for d in plan.devices}
    assert why["fresh"] == ("send", "not on the device")
    assert why["newer"] == ("send", "not on the device")  # 2 -> 3 is an upgrade
    assert why["conflict"][0] == "refuse" and "digest differs" in why["conflict"][1]
    assert why["full"][0] == "refuse" and "1000 bytes free" in why["full"][1]
    assert why["foreign"] == ("refuse", "not a recipient of this package")
    assert why["revoked"][0] == "refuse" and "revoked" in why["revoked"][1]
    plan = plan_deploy(devs[1:2], name="m", version=1, digest="d1", size=1)
    assert plan.devices[0].action == "refuse" and "newer" in plan.devices[0].reason
    back = plan_rollback([devs[1], devs[0]], name="m", to=None)
    assert [(d.action, d.reason) for d in back.devices] == [
        ("send", "switch m@2 -> @1"), ("refuse", "m is not active there (as last reported)")]
    assert plan_rollback(devs[1:2], name="m", to=7).devices[0].action == "refuse"
    assert plan_rollback(devs[1:2], name="m", to=1).devices[0].reason.startswith("signed")
    lora = plan_lora_push([devs[1], devs[0], devs[4]], name="ad", version=1, size=10,
                          base=("m", 2), recipients={"fp-newer", "fp-fresh"})
    assert [d.action for d in lora.devices] == ["send", "refuse", "refuse"]
    assert "base m is not installed" in lora.devices[1].reason
    doc = lora.to_dict()
    assert doc["model"] == "ad@1" and doc["totals"] == {"devices": 3, "send": 1, "skip": 0,
                                                        "refuse": 2, "bytes": 10}
