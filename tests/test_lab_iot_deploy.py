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


OTHER = TINY.with_name("outlier.mnn")


def _fleet(iot_lab: IotLab, *args: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    res = CliRunner().invoke(app, ["--home", str(iot_lab.home.path), *args])
    return res.exit_code, json.loads(res.stdout) if res.stdout.strip().startswith("{") else {}


def _installed(iot_lab: IotLab, name: str) -> dict:  # type: ignore[type-arg]
    from fleet.connect import open_device
    from fleet.registry import Registry
    transport, agent = open_device(iot_lab.home, Registry.open(iot_lab.home).get_device(name))
    with transport:
        return agent.call("status")["installed"]  # type: ignore[no-any-return]


def test_disk_full_board_fails_alone_and_keeps_its_model(iot_lab: IotLab) -> None:
    import os
    boards = iot_lab.boards(3)
    names = [b.name for b in boards]
    CliRunner().invoke(app, ["--home", str(iot_lab.home.path), "keys", "init"])
    devs = [a for n in names for a in ("--device", n)]
    code, out = _fleet(iot_lab, "deploy", str(TINY), "--name", "dfull", *devs, "--json",
                       "--iterations", "1", "--warmup", "0")
    assert code == 0, out
    victim = boards[1]
    filler = Path(victim.agent_root) / "filler"
    st = os.statvfs(victim.agent_root)
    try:
        with open(filler, "wb") as f:  # leave 32 KiB: less than the package
            f.truncate(0)
            left = st.f_bavail * st.f_frsize - 32 * 1024
            chunk = b"\0" * (1 << 20)
            while left > 0:
                f.write(chunk[:min(left, len(chunk))])
                left -= len(chunk)
        code, out = _fleet(iot_lab, "deploy", str(OTHER), "--name", "dfull", *devs, "--json",
                           "--iterations", "1", "--warmup", "0", "--retries", "0")
    finally:
        filler.unlink(missing_ok=True)
    assert code == PARTIAL_FAILURE, out
    rows = {r["device"]: r for r in out["results"]}
    assert rows[victim.name]["status"] == "failed"
    assert rows[victim.name]["error"]["code"] in ("remote_disk_full", "disk_full")
    assert "free" in rows[victim.name]["reason"]  # says how much room there is
    assert {n: rows[n]["status"] for n in names if n != victim.name} == {
        n: "ok" for n in names if n != victim.name}
    assert _installed(iot_lab, victim.name)["dfull"]["version"] == 1


def _big_model(path: Path, mib: int) -> None:
    """A MatMul with an fp32 weight of ``mib`` MiB: big on the wire, cheap to run."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from fleet.artifacts.convert import mnnconvert

    n = int((mib * (1 << 20) / 4) ** 0.5)
    w = np.random.default_rng(3).standard_normal((n, n)).astype(np.float32) * 0.01
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        initializer=[numpy_helper.from_array(w, "w")])
    onnx_path = path.with_suffix(".onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]),
              str(onnx_path))
    mnnconvert(["-f", "ONNX", "--modelFile", str(onnx_path), "--MNNModel", str(path),
                "--bizCode", "test"])


def test_link_down_mid_transfer_then_up_resumes_and_completes(iot_lab: IotLab,
                                                               tmp_path: Path) -> None:
    import os
    import subprocess
    import sys
    import time
    import uuid

    from fleet.registry import Registry
    from fleet.registry import history as hist

    board = iot_lab.boards(8)[5]
    model = tmp_path / "big.mnn"
    _big_model(model, 6)
    reg = Registry.open(iot_lab.home)
    reg.update_device(board.name, uri=board.uri + "&io_timeout=3")
    CliRunner().invoke(app, ["--home", str(iot_lab.home.path), "keys", "init"])
    incoming = Path(board.agent_root) / "incoming"
    try:
        faults.apply_fault(iot_lab.home, board.name, bandwidth="8mbit")
        proc = subprocess.Popen(
            [sys.executable, "-m", "fleet", "deploy", str(model), "--device", board.name,
             "--retries", "6", "--iterations", "1", "--warmup", "0", "--json"],
            env=dict(os.environ, FLEET_HOME=str(iot_lab.home.path)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until part of the package has landed
            parts = list(incoming.glob("*.part")) if incoming.exists() else []
            if parts and parts[0].stat().st_size > (1 << 20):
                break
            time.sleep(0.2)
        else:
            proc.kill()
            raise AssertionError("the push never started")
        faults.apply_fault(iot_lab.home, board.name, down=True)
        time.sleep(6)  # longer than io_timeout: the connection is declared lost
        faults.apply_fault(iot_lab.home, board.name, up=True)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        iot_lab.heal(board.name)
        reg.update_device(board.name, uri=board.uri)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    out = json.loads(stdout)
    assert out["results"][0]["status"] == "ok"
    (step, _), = hist.steps_of(reg, uuid.UUID(out["deployment"]))
    events = hist.step_events(reg, step.id)
    assert [e.state for e in events].count("connecting") >= 2  # it was retried
    pushed = [e for e in events if e.state == "pushed"]
    assert pushed and pushed[-1].detail["resumed_from"] > (1 << 20)  # sent bytes not resent
    assert out["results"][0]["bytes_sent"] < model.stat().st_size
