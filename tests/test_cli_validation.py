"""Every option is checked before any work: a bad value exits 2 (unknown names 5, targets
that select nothing 26) before enrolling, converting or packaging, and changes nothing."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from fleet.artifacts import init_signing_key
from fleet.home import FleetHome
from tests.conftest import REPO, local_uri

TINY_ONNX = REPO / "models" / "tiny" / "tiny.onnx"
WORK = ("converting", "packaging", "enrolling", "deploying", "golden")


@pytest.fixture
def fleet(run_fleet, home: FleetHome, tmp_path: Path):  # type: ignore[no-untyped-def]
    assert run_fleet("init").exit_code == 0
    init_signing_key(home)
    run_fleet("group", "create", "g")
    for n in ("a", "b"):  # not enrolled: any contact would enroll them first
        r = run_fleet("device", "add", local_uri(tmp_path, n), "--name", n, "-g", "g",
                      "--tag", "site=lab", "--no-enroll")
        assert r.exit_code == 0, r.output
    return run_fleet


def _rows(home: FleetHome, table: str) -> int:
    with sqlite3.connect(home.path / "registry.db") as con:
        return int(con.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


CASES = {
    "waves not a size": (["-g", "g", "--waves", "abc"], 2, "neither a device count"),
    "waves shrinking": (["-g", "g", "--waves", "50%,25%"], 2, "must grow"),
    "waves after 100%": (["-g", "g", "--waves", "25%,100%,3"], 2, "nothing can follow"),
    "waves over 100%": (["-g", "g", "--waves", "150%"], 2, "over 100%"),
    "no iterations": (["-g", "g", "--iterations", "0"], 2, "--iterations"),
    "negative warm-up": (["-g", "g", "--warmup", "-1"], 2, "--warmup"),
    "no workers": (["-g", "g", "--workers", "0"], 2, "--workers"),
    "version 0": (["-g", "g", "--version", "0"], 2, "--version"),
    "unknown variant": (["-g", "g", "--variant", "int8"], 2, "unknown variant 'int8'"),
    "no targets": ([], 2, "name the targets"),
    "unknown group": (["-g", "nope"], 5, "no group named 'nope'"),
    "unknown device": (["-g", "g", "-d", "ghost"], 5, "no device named 'ghost'"),
    "unknown hw key": (["-l", "hw.ramgb>=4"], 2, "hw.ram_gb"),
    "bad selector": (["-g", "g", "-l", "site=lab,,x"], 2, "empty term"),
    "selects nothing": (["-g", "g", "-l", "site=mars"], 26, "no device matches"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_deploy_refuses_bad_options_before_any_work(fleet, home: FleetHome,  # type: ignore[no-untyped-def]
                                                    tmp_path: Path, case: str) -> None:
    args, code, message = CASES[case]
    r = fleet("deploy", str(TINY_ONNX), *args)
    assert r.exit_code == code, (case, r.output)
    assert message in r.stderr, (case, r.stderr)
    assert not any(w in r.output.lower() for w in WORK), (case, r.output)
    assert _rows(home, "artifact_versions") == 0 and _rows(home, "deployments") == 0
    assert not (tmp_path / "devices").exists()  # no device was contacted (or enrolled)


def test_other_commands_check_before_work(fleet, home: FleetHome, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "x.fpkg"
    checks = [
        (["package", str(TINY_ONNX), "-o", str(out), "-g", "g", "--variant", "int8"], 2),
        (["package", str(TINY_ONNX), "-o", str(out), "-l", "hw.gpu.tpu"], 2),
        (["package", str(TINY_ONNX), "-o", str(out), "--for", "nope"], 5),
        (["rollback", "tiny", "-g", "g", "--to", "0"], 2),
        (["rollback", "tiny", "-l", "site=mars"], 26),
        (["lora", "push", str(out), "-l", "hw.x=1"], 2),
        (["audit", "-l", "site=mars"], 26),
        (["reports", "-l", "hw.arch=arm64", "--candidates"], 26),
        (["deployment", "resume", "abc", "-l", "hw.arch>x"], 2),
    ]
    for args, code in checks:
        r = fleet(*args)
        assert r.exit_code == code, (args, r.output)
        assert not any(w in r.output.lower() for w in WORK), (args, r.output)
    assert not out.exists() and not (tmp_path / "devices").exists()
    assert _rows(home, "deployments") == 0


def test_listing_with_a_selector_that_matches_nothing_is_empty(fleet) -> None:  # type: ignore[no-untyped-def]
    r = fleet("device", "list", "-l", "site=mars", "--json")
    assert r.exit_code == 0 and r.stdout.strip() == "[]"
    r = fleet("device", "list", "-l", "hw.gpu.cuda", "--json")  # none probed: no hw.* fact
    assert r.exit_code == 0 and r.stdout.strip() == "[]"
    r = fleet("device", "list", "-l", "site=lab", "--json")
    assert [d["name"] for d in json.loads(r.stdout)] == ["a", "b"]


def test_audit_takes_every_group_named(fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fleet("group", "create", "h")
    fleet("device", "add", local_uri(tmp_path, "c"), "--name", "c", "-g", "h", "--no-enroll")
    fleet("device", "add", local_uri(tmp_path, "z"), "--name", "z", "--no-enroll")
    r = fleet("audit", "-g", "g", "-g", "h", "--offline", "--json")  # nothing stored yet
    for name in ("a", "b", "c"):
        assert f'"{name}"' in r.stdout, (name, r.stdout)
    assert '"z"' not in r.stdout


def test_device_tag_sets_and_removes_tags(fleet) -> None:  # type: ignore[no-untyped-def]
    r = fleet("device", "tag", "a", "rack=3", "site=lab2", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["tags"] == {"rack": "3", "site": "lab2"}
    r = fleet("device", "tag", "a", "site-", "room=b-", "--json")  # KEY- removes, k=v- sets
    assert json.loads(r.stdout)["tags"] == {"rack": "3", "room": "b-"}
    assert json.loads(r.stdout)["removed"] == ["site"]
    for bad in ("hw.arch=arm64", "platform=x", "model.x=1", "a b=1", "k=v,w", "-"):
        r = fleet("device", "tag", "a", bad)
        assert r.exit_code == 2, (bad, r.output)
    assert fleet("device", "tag", "ghost", "k=v").exit_code == 5
    table = fleet("device", "list")
    assert "rack=3,room=b-" in table.stdout and "site=lab" in table.stdout
    r = fleet("device", "list", "-l", "rack=3", "--json")
    assert [d["name"] for d in json.loads(r.stdout)] == ["a"]
    assert [d["name"] for d in json.loads(fleet("device", "list", "-l", "site=lab",
                                                "--json").stdout)] == ["b"]
