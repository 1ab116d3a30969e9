"""``fleet device bootstrap`` on a real lab board: wheelhouse pushed over ssh, offline venv.

The wheelhouse is cached in ``build/wheelhouse-cache`` (ignored by git): the first run
downloads the dependency wheels and builds the project wheel (about a minute here); later
runs rebuild only the project wheel when its sources changed (a few seconds).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from typer.testing import CliRunner

from fleet.cli.app import app
from fleet.registry import Registry

pytest_plugins = ("tests.lab_fixtures",)

if TYPE_CHECKING:
    from tests.lab_fixtures import IotLab

pytestmark = [pytest.mark.lab, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "build" / "wheelhouse-cache"


def test_bootstrap_installs_an_isolated_agent_on_a_board(iot_lab: IotLab,
                                                          tmp_path: Path) -> None:
    dev = iot_lab.boards(1)[0]
    # the board shares this filesystem: give it a venv directory of its own
    venv = tmp_path / "board" / "fleet-agent-venv"
    runner = CliRunner()
    base = ["--home", str(iot_lab.home.path), "device", "bootstrap", dev.name,
            "--venv", str(venv), "--cache", str(CACHE), "--json"]
    try:
        res = runner.invoke(app, [*base, "--keep-wheels"])
        assert res.exit_code == 0, res.output
        first = json.loads(res.stdout)
        print("bootstrap timings:", first["timings"], "wheelhouse build s:",
              first["wheelhouse_build_s"])
        assert first["venv"] == str(venv)
        assert first["agent_status"]["ok"] is True
        assert first["agent_status"]["root"] == dev.agent_root
        assert first["wheels_sent"] == first["wheels"] and first["bytes_sent"] > 0
        # the installed agent is the board's own copy, not the controller's editable one
        probe = subprocess.run(
            [str(venv / "bin" / "python"), "-c",
             "import fleet_agent, fleet.core.errors; print(fleet_agent.__file__)"],
            capture_output=True, text=True, timeout=60, check=True)
        assert probe.stdout.strip().startswith(str(venv))
        reg = Registry.open(iot_lab.home)
        try:
            assert reg.get_device(dev.name).agent_cmd == [str(venv / "bin" / "fleet-agent")]
        finally:
            reg.close()
        # a second bootstrap finds the wheels on the board already: none is sent again,
        # except the project wheel when its sources changed in between (shared checkout)
        res = runner.invoke(app, base)
        assert res.exit_code == 0, res.output
        second = json.loads(res.stdout)
        project = max(CACHE.glob("project-*/mnn_fleet-*.whl"), key=lambda p: p.stat().st_mtime)
        assert second["wheels_sent"] <= 1
        assert second["bytes_sent"] in (0, project.stat().st_size)
        assert second["agent_status"]["ok"] is True
        assert not Path(str(venv) + ".wheels").exists()  # cleaned up without --keep-wheels
    finally:
        reg = Registry.open(iot_lab.home)
        try:  # later tests in the session use the shared agent again
            reg.update_device(dev.name, agent_cmd=dev.agent_cmd)
        finally:
            reg.close()
