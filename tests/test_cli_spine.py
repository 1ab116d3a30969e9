"""The CLI through CliRunner on a temp FLEET_HOME: devices, groups, --json, bad input; on
SQLite and on PostgreSQL (tests/pgfixture.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import inspect, text

from fleet.home import FleetHome
from fleet.registry.db import make_engine
from tests.conftest import local_uri

pytestmark = pytest.mark.backends


def _dump(home: FleetHome) -> list[tuple[str, list[tuple[object, ...]]]]:
    """Every table's rows, sorted: what a command that refused must leave unchanged."""
    engine = make_engine(home.db_url)
    out = []
    with engine.connect() as con:
        for t in sorted(inspect(con).get_table_names()):
            rows = con.execute(text(f'SELECT * FROM "{t}"')).fetchall()
            out.append((t, sorted((tuple(r) for r in rows), key=repr)))
    engine.dispose()
    return out


def test_init_then_device_and_group_lifecycle(run_fleet, home: FleetHome,  # type: ignore[no-untyped-def]
                                              tmp_path: Path) -> None:
    assert run_fleet("init").exit_code == 0
    assert run_fleet("group", "create", "phones").exit_code == 0
    r = run_fleet("device", "add", local_uri(tmp_path, "a"), "--name", "a", "--group", "phones",
                  "--tag", "site=lab", "--json")
    assert r.exit_code == 0, r.output
    added = json.loads(r.stdout)
    assert added["name"] == "a" and added["groups"] == ["phones"]
    assert added["fingerprint"].startswith("SHA256:")
    assert added["tags"] == {"site": "lab"}
    # the device made its key on its own root, 0600
    key = tmp_path / "devices" / "a" / "identity" / "device_key.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    assert run_fleet("device", "add", local_uri(tmp_path, "b"), "--name", "b").exit_code == 0
    assert run_fleet("group", "add", "phones", "b").exit_code == 0

    rows = json.loads(run_fleet("device", "list", "--json").stdout)
    assert [d["name"] for d in rows] == ["a", "b"]
    nd = run_fleet("device", "list", "--ndjson").stdout.strip().splitlines()
    assert [json.loads(line)["name"] for line in nd] == ["a", "b"]
    group = json.loads(run_fleet("group", "show", "phones", "--json").stdout)
    assert sorted(d["name"] for d in group["devices"]) == ["a", "b"]
    groups = json.loads(run_fleet("group", "list", "--json").stdout)
    assert groups == [{"name": "phones", "devices": 2, "description": ""}]
    shown = json.loads(run_fleet("device", "show", "a", "--json").stdout)
    assert "BEGIN PUBLIC KEY" in shown["public_key"]

    assert run_fleet("group", "rm", "phones", "a").exit_code == 0
    group = json.loads(run_fleet("group", "show", "phones", "--json").stdout)
    assert [d["name"] for d in group["devices"]] == ["b"]
    assert run_fleet("device", "rm", "b", "--yes").exit_code == 0
    assert [d["name"] for d in json.loads(run_fleet("device", "list", "--json").stdout)] == ["a"]
    status = json.loads(run_fleet("status", "--json").stdout)
    assert status["devices"] == 1 and status["groups"] == {"phones": 0}


def test_bad_input_has_clear_message_distinct_code_and_changes_nothing(  # type: ignore[no-untyped-def]
        run_fleet, home: FleetHome, tmp_path: Path) -> None:
    run_fleet("init")
    run_fleet("group", "create", "g")
    assert run_fleet("device", "add", local_uri(tmp_path, "a"), "--name", "a").exit_code == 0
    before = _dump(home)
    cases = {
        "unknown group": (["device", "add", local_uri(tmp_path, "x"), "--name", "x",
                           "--group", "nope"], "no group named 'nope'"),
        "duplicate": (["device", "add", local_uri(tmp_path, "a2"), "--name", "a"],
                      "already exists"),
        "malformed": (["device", "add", "local:/nowhere", "--name", "y"], "not a device URI"),
        "unknown scheme": (["device", "add", "ftp://host", "--name", "z"],
                           "unknown transport scheme"),
    }
    codes = {}
    for label, (args, message) in cases.items():
        r = run_fleet(*args)
        assert r.exit_code not in (0, 1), (label, r.output)
        assert message in r.stderr, (label, r.stderr)
        codes[label] = r.exit_code
    assert len(set(codes.values())) == len(codes), codes
    assert _dump(home) == before


def test_newer_database_is_refused_with_its_own_code(run_fleet, home: FleetHome) -> None:  # type: ignore[no-untyped-def]
    run_fleet("init")
    engine = make_engine(home.db_url)
    with engine.begin() as con:
        con.exec_driver_sql("UPDATE alembic_version SET version_num='deadbeef0000'")
    engine.dispose()
    r = run_fleet("device", "list")
    assert r.exit_code == 7
    assert "newer than this fleet" in r.stderr


def test_enroll_failure_leaves_registry_unchanged(run_fleet, home: FleetHome,  # type: ignore[no-untyped-def]
                                                  tmp_path: Path) -> None:
    run_fleet("init")
    before = _dump(home)
    r = run_fleet("device", "add", local_uri(tmp_path, "bad"), "--name", "bad",
                  "--agent-cmd", "/nonexistent/fleet-agent")
    assert r.exit_code != 0
    assert _dump(home) == before
