"""``fleet deploy`` to 8 lab boards in parallel over real ssh, one board's sshd killed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from typer.testing import CliRunner

from fleet.cli._exit import PARTIAL_FAILURE
from fleet.cli.app import app
from fleet.lab import faults

pytest_plugins = ("tests.lab_fixtures",)

if TYPE_CHECKING:
    from tests.lab_fixtures import IotLab

pytestmark = [pytest.mark.lab, pytest.mark.slow]

TINY = Path(__file__).resolve().parents[1] / "models" / "tiny" / "tiny.mnn"


def test_deploy_to_8_boards_one_without_sshd(iot_lab: IotLab) -> None:
    boards = iot_lab.boards(8)
    dead = boards[3].name
    runner = CliRunner()
    base = ["--home", str(iot_lab.home.path)]
    runner.invoke(app, [*base, "keys", "init"])
    try:
        faults.apply_fault(iot_lab.home, dead, stop_sshd=True)
        res = runner.invoke(app, [*base, "deploy", str(TINY), "--group", "lab-iot",
                                  "--workers", "8", "--retries", "1", "--iterations", "2",
                                  "--warmup", "1", "--json"])
    finally:
        iot_lab.heal(dead)
    assert res.exit_code == PARTIAL_FAILURE, res.output
    rows = {r["device"]: r for r in json.loads(res.stdout)["results"]}
    assert rows[dead]["status"] == "failed"
    assert {n: r["status"] for n, r in rows.items() if n != dead} == {
        b.name: "ok" for b in boards if b.name != dead}
