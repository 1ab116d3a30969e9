"""Farm hosts on the lab: `fleet lab up --farm 2` puts two IoT boards, an Android phone
and an iPhone behind two farm hosts (network namespaces, each with a supervised worker,
its own adb server and usbmuxd socket), with Redis and PostgreSQL started by the lab and
named in the home's config.toml, so these `fleet` commands run with no environment.

One lab for the module; the tests run in order and each states what it starts from:
a deploy across both hosts; a worker SIGKILLed mid-task (its supervisor restarts it, the
broker delivers the task again, the device ends right, nothing twice); one host down
(its worker stopped: its devices fail as unreachable, the other host's succeed); a
deployment whose controller died, resumed across the workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet.home import FleetHome
from fleet.lab import farm as lab_farm
from fleet.lab.base import load_state
from fleet.registry import Registry
from fleet.registry import history as hist
from fleet.registry.models import DeploymentState, StepState
from tests.conftest import REPO

pytestmark = [pytest.mark.lab, pytest.mark.slow]

TINY = REPO / "models" / "tiny" / "tiny.mnn"  # tiny@1
OUTLIER = REPO / "models" / "tiny" / "outlier.mnn"  # deployed as tiny@2
DEADLINE = "40"  # per device; the broker redelivers a dead worker's task ~60 s later
DEVICES = ("android-0", "iot0", "iot1", "iphone-0")


class Lab:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = FleetHome(root / "home")
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("FLEET_DB", "FLEET_BROKER", "FLEET_TEST_KILL_AT")}
        self.env.update(NO_COLOR="1", COLUMNS="200", FLEET_HOME=str(self.home.path))

    def fleet(self, *args: str, check: bool = True, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([sys.executable, "-m", "fleet", *args], capture_output=True,
                             text=True, timeout=900, check=False,
                             env={**self.env, **(env or {})})
        if check:
            assert res.returncode == 0, res.stderr[-3000:]
        return res

    def json(self, *args: str, check: bool = True) -> Any:
        return json.loads(self.fleet(*args, "--json", check=check).stdout)

    def registry(self) -> Registry:
        return Registry.open(FleetHome(self.home.path))

    def via(self) -> dict[str, str]:
        return {r["name"]: r["via"] for r in self.json("device", "list")}

    def board_active(self, name: str) -> int | None:
        """What the board's own agent says (its store is a tmpfs on this machine)."""
        from fleet_agent.cli import dispatch
        from fleet_agent.context import AgentContext

        root = Path(load_state(self.home, "iot")[name]["agent_root"])
        doc = dispatch(AgentContext(root), "status", {})
        return ((doc.get("installed") or {}).get("tiny") or {}).get("active")

    def deploy_args(self, model: Path) -> list[str]:
        return ["deploy", str(model), "--name", "tiny", "--group", "farm", "--deadline",
                DEADLINE, "--iterations", "1", "--warmup", "0"]


def _wait(cond: Any, what: str, limit_s: float = 300.0) -> None:
    end = time.monotonic() + limit_s  # a cap for a broken run, not a timing assumption
    while not cond():
        assert time.monotonic() < end, f"gave up waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.fail("the lab tests need root (network namespaces); CI runs as root")
    lab = Lab(tmp_path_factory.mktemp("farmlab"))
    lab.fleet("init")
    lab.fleet("keys", "init")
    try:
        lab.fleet("lab", "up", "--farm", "2", "--iot", "2", "--android", "1", "--ios", "1",
                  "--farm-deadline", DEADLINE)
        lab.fleet("group", "create", "farm")
        lab.fleet("group", "add", "farm", *DEVICES)
        yield lab
    finally:
        down = lab.fleet("lab", "down", "--json", check=False)
        assert down.returncode == 0, down.stderr[-2000:]
        assert not lab_farm.services_running(lab.home)


def test_lab_up_puts_devices_behind_two_farm_hosts_with_servers_in_config(lab: Lab) -> None:
    assert lab.via() == {"android-0": "farm0", "iot1": "farm0", "iot0": "farm1",
                         "iphone-0": "farm1"}
    text = (lab.home.path / "config.toml").read_text()
    assert "postgresql+psycopg://" in text and "redis+socket://" in text
    doc = lab.json("worker", "list")
    assert {w["host"]: w["devices"] for w in doc["workers"]} == {
        "farm0": ["android-0", "iot1"], "farm1": ["iot0", "iphone-0"]}
    # a board behind a farm host is reached from that host's namespace only
    boards = load_state(lab.home, "iot")
    assert not Path("/sys/class/net", boards["iot1"]["host_if"]).exists()
    assert boards["iot1"]["farm_netns"].endswith("-farm0")


def test_deploy_across_both_hosts(lab: Lab) -> None:
    out = lab.json(*lab.deploy_args(TINY))
    assert out["state"] == "completed", out
    assert {r["device"]: r["status"] for r in out["results"]} == dict.fromkeys(DEVICES, "ok")
    assert lab.board_active("iot0") == lab.board_active("iot1") == 1


def test_a_worker_killed_mid_task_is_restarted_and_the_task_delivered_again(
        lab: Lab) -> None:
    reg = lab.registry()
    starts = (Path(lab.home.lab_dir) / "farm" / "farm0" / "starts").read_text().splitlines()
    proc = subprocess.Popen([sys.executable, "-m", "fleet", *lab.deploy_args(OUTLIER),
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=lab.env)
    dep: dict[str, uuid.UUID] = {}

    def activating() -> bool:  # iot1 (on farm0) is being activated by farm0's worker
        deps = hist.list_deployments(reg, limit=1)
        if not deps or deps[0][0].version != 2:
            return False
        dep["id"] = deps[0][0].id
        return any(d.name == "iot1" and st.state is StepState.ACTIVATING
                   for st, d in hist.steps_of(reg, dep["id"]))

    _wait(activating, "iot1 activating")
    victim = lab_farm.worker_pid(lab.home, "farm0")
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    out, errs = proc.communicate(timeout=600)
    assert proc.returncode == 0, errs[-3000:]
    doc = json.loads(out)
    assert doc["state"] == "completed"
    assert {r["device"]: r["status"] for r in doc["results"]} == dict.fromkeys(DEVICES, "ok")
    # the supervisor started a new worker; the device ended right, nothing done twice
    now = (Path(lab.home.lab_dir) / "farm" / "farm0" / "starts").read_text().splitlines()
    assert len(now) == len(starts) + 1
    assert lab_farm.worker_pid(lab.home, "farm0") not in (None, victim)
    assert lab.board_active("iot1") == 2
    step = next(st for st, d in hist.steps_of(reg, dep["id"]) if d.name == "iot1")
    states = [e.state for e in hist.step_events(reg, step.id)]
    assert states.count(StepState.CONNECTING) >= 2  # delivered again
    assert states.count(StepState.OK) == 1 and states[-1] is StepState.OK
    reports = [r for r in hist.deployment_reports(reg, dep["id"])
               if r.device_id == step.device_id]
    assert len(reports) == 1


def test_one_host_down_fails_its_devices_unreachable_and_the_other_hosts_succeed(
        lab: Lab) -> None:
    lab.fleet("lab", "fault", "farm1", "--down")  # its worker stopped, not restarted
    assert lab_farm.worker_pid(lab.home, "farm1") is None
    try:
        res = lab.fleet("rollback", "tiny", "--group", "farm", "--json", check=False)
        assert res.returncode == 20, res.stderr[-2000:]
        doc = json.loads(res.stdout)
        rows = doc if isinstance(doc, list) else doc.get("data", doc.get("results", []))
        by = {r["device"]: r for r in rows}
        assert {n for n, r in by.items() if r["ok"]} == {"android-0", "iot1"}
        for name in ("iot0", "iphone-0"):
            assert by[name]["ok"] is False
            assert "farm host 'farm1' has no live worker" in json.dumps(by[name]["error"])
        assert lab.board_active("iot1") == 1 and lab.board_active("iot0") == 2
    finally:
        lab.fleet("lab", "fault", "farm1", "--up")
    _wait(lambda: any(w["host"] == "farm1" and w["live"]
                      for w in lab.json("worker", "list")["workers"]), "farm1's worker")


def test_resume_carries_a_dead_controllers_deployment_on_across_the_workers(
        lab: Lab) -> None:
    killed = lab.fleet(*lab.deploy_args(OUTLIER), check=False,
                       env={"FLEET_TEST_KILL_AT": "packaged"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    deps = lab.json("deployment", "list")
    assert deps[0]["status"] == "interrupted", deps[0]
    out = lab.json("deployment", "resume", deps[0]["id"])
    assert out["state"] == "completed", out
    reg = lab.registry()
    dep = hist.get_deployment(reg, uuid.UUID(deps[0]["id"]))
    assert dep.status is DeploymentState.COMPLETED
    states = {d.name: st.state for st, d in hist.steps_of(reg, dep.id)}
    assert states == {"android-0": StepState.OK, "iot1": StepState.OK,  # back on 2
                      "iot0": StepState.SKIPPED, "iphone-0": StepState.SKIPPED}
    assert lab.board_active("iot0") == lab.board_active("iot1") == 2
