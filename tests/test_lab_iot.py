"""The IoT lab itself: layout, registration, faults, and ``down`` removing all it made."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from fleet.core import errors
from fleet.home import FleetHome
from fleet.lab import faults, iot, kind_module, netns
from fleet.lab.base import lab_tag
from fleet.registry import Registry
from fleet.transports._known_hosts import KnownHosts

pytest_plugins = ("tests.lab_fixtures",)

if TYPE_CHECKING:
    from tests.lab_fixtures import IotLab

pytestmark = pytest.mark.lab


def _sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True,
                          timeout=20).stdout


def test_boards_have_their_own_address_sshd_and_store(iot_lab: IotLab) -> None:
    devs = iot_lab.boards(2)
    rows = {r["name"]: r for r in iot.status(iot_lab.home)}
    addrs = set()
    for dev in devs:
        row = rows[dev.name]
        board = ipaddress.IPv4Address(row["address"])
        assert board in iot.SUBNET and board not in addrs
        addrs.add(board)
        assert ipaddress.IPv4Address(row["host_addr"]) + 1 == board
        assert row["sshd"] == "running" and row["link"] == "up"
        # sshd listens on the board address only, inside the board's namespace
        listening = _sh("ip", "netns", "exec", row["netns"], "ss", "-Hltn")
        assert f"{board}:22" in listening and "0.0.0.0:22" not in listening
        # the store is a tmpfs of the requested size
        assert os.path.ismount(dev.agent_root)
        assert row["store"]["size"] == iot.DEFAULT_STORE_MB << 20
        assert "tmpfs" in _sh("stat", "-f", "-c", "%T", dev.agent_root)
        # the host key is the board's own, pinned in the fleet's known_hosts
        pinned = KnownHosts(iot_lab.home.known_hosts).lookup(str(board), 22)
        assert len(pinned) == 1
    fps = {rows[d.name]["host_key_fingerprint"] for d in devs}
    assert len(fps) == 2


def test_boards_are_registered_with_agent_root_and_command(iot_lab: IotLab) -> None:
    devs = iot_lab.boards(2)
    reg = Registry.open(iot_lab.home)
    try:
        rows = {d.name: d for d in reg.list_devices(iot.GROUP)}
    finally:
        reg.close()
    for dev in devs:
        row = rows[dev.name]
        assert (row.uri, row.platform, row.agent_root, row.agent_cmd) == (
            dev.uri, "linux", dev.agent_root, dev.agent_cmd)


def test_agent_runs_on_a_board_over_ssh(iot_lab: IotLab) -> None:
    dev = iot_lab.boards(1)[0]
    with iot_lab.transport(dev) as t:
        res = t.run([*t.agent_cmd(), "--root", t.agent_root(), "status"], timeout=60)
    doc = json.loads(res.stdout)
    assert res.ok and doc["ok"] and doc["root"] == dev.agent_root


def test_up_is_idempotent_and_keeps_running_boards(iot_lab: IotLab) -> None:
    before = iot_lab.boards(2)
    again = iot.up(iot_lab.home, 2)
    assert [d.uri for d in again] == [d.uri for d in before]
    assert [d.extra["host_key_fingerprint"] for d in again] == [
        d.extra["host_key_fingerprint"] for d in before]


def test_faults_change_the_real_link(iot_lab: IotLab) -> None:
    dev = iot_lab.boards(2)[1]
    b = iot.board(iot_lab.home, dev.name)
    try:
        faults.apply_fault(iot_lab.home, dev.name, bandwidth="2mbit", loss=30)
        assert "tbf" in _sh("tc", "qdisc", "show", "dev", b["host_if"])
        assert "tbf" in _sh("tc", "-n", b["netns"], "qdisc", "show", "dev", "eth0")
        rules = _sh("ip", "netns", "exec", b["netns"], "nft", "list", "table", "inet",
                    faults.NFT_TABLE)
        assert "numgen random mod 100 < 30" in rules and "drop" in rules
        res = faults.apply_fault(iot_lab.home, dev.name, down=True)
        assert res["link"] == "down" and netns.link_state(b["host_if"]) == "down"
        row = {r["name"]: r for r in iot.status(iot_lab.home)}[dev.name]
        assert row["faults"] == {"bandwidth": "2mbit", "loss": 30, "link": "down"}
    finally:
        iot_lab.heal(dev.name)
    assert "tbf" not in _sh("tc", "qdisc", "show", "dev", b["host_if"])
    assert faults.NFT_TABLE not in _sh("ip", "netns", "exec", b["netns"], "nft", "list",
                                       "tables")
    assert netns.link_state(b["host_if"]) in ("up", "unknown")
    assert {r["name"]: r for r in iot.status(iot_lab.home)}[dev.name]["faults"] == {}


def test_bad_fault_arguments_are_usage_errors(iot_lab: IotLab) -> None:
    dev = iot_lab.boards(1)[0]
    with pytest.raises(errors.UsageError):
        faults.apply_fault(iot_lab.home, dev.name, bandwidth="fast")
    with pytest.raises(errors.UsageError):
        faults.apply_fault(iot_lab.home, dev.name, loss=130)
    with pytest.raises(errors.NotFoundError):
        faults.apply_fault(iot_lab.home, "not-a-board", down=True)


def test_unknown_lab_kind_is_a_clear_error() -> None:
    with pytest.raises(errors.UsageError, match="unknown lab kind"):
        kind_module("mainframe")


def test_down_removes_everything_it_made(tmp_path: Path) -> None:
    """A second, private lab (own home, own tag): up 2, fault one, down, nothing left."""
    home = FleetHome(tmp_path / "home")
    Registry.init(home).close()
    devs = iot.up(home, 2, store_mb=16)
    records = [iot.board(home, d.name) for d in devs]
    faults.apply_fault(home, devs[0].name, bandwidth="1mbit", loss=5)
    removed = iot.down(home)
    assert sorted(removed) == ["iot0", "iot1"]
    for b in records:
        assert not netns.netns_exists(b["netns"])
        assert not netns.link_exists(b["host_if"])
        assert not os.path.ismount(b["agent_root"])
        assert not Path(b["runtime_dir"]).exists()
        assert KnownHosts(home.known_hosts).lookup(b["board_addr"], 22) == {}
    assert not (iot.RUN_ROOT / lab_tag(home)).exists()
    reg = Registry.open(home)
    try:
        assert reg.list_devices() == []
    finally:
        reg.close()
    assert iot.status(home) == []
    assert iot.down(home) == []  # idempotent


def test_cli_lab_status_and_fault(iot_lab: IotLab) -> None:
    from typer.testing import CliRunner

    from fleet.cli.app import app

    dev = iot_lab.boards(1)[0]
    runner = CliRunner()
    base = ["--home", str(iot_lab.home.path)]
    res = runner.invoke(app, [*base, "lab", "status", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert dev.name in {r["name"] for r in rows if r["kind"] == "iot"}
    try:
        res = runner.invoke(app, [*base, "lab", "fault", dev.name, "--bandwidth", "5mbit",
                                  "--json"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["faults"] == {"bandwidth": "5mbit"}
    finally:
        iot_lab.heal(dev.name)
    res = runner.invoke(app, [*base, "lab", "fault", dev.name])
    assert res.exit_code != 0
