"""Farm hosts for real, without root: a private Redis (fleet.lab.redis), two `fleet worker`
processes (hosts a and b), local devices added with `--via` (enrolled through their
host's worker) and one the controller reaches itself; `fleet deploy`, `rollback`,
`audit` and `worker list` through Celery. The lab tests (tests/test_lab_farm.py) add
namespaces, phones, a worker killed mid-task and a host down."""

from __future__ import annotations

import contextlib
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
from fleet.lab import redis as lab_redis
from fleet.registry import Registry
from fleet.registry import history as hist
from fleet.registry.models import StepState
from tests.conftest import REPO

TINY = REPO / "models" / "tiny" / "tiny.mnn"
OUTLIER = REPO / "models" / "tiny" / "outlier.mnn"
VIA = {"ca": "a", "cb": "b", "ch": None}


class Farm:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = FleetHome(root / "home")
        self.redis = lab_redis.start(root / "redis")
        self.env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200",
                    "FLEET_HOME": str(self.home.path), "FLEET_BROKER": self.redis.url,
                    "FLEET_BROKER_DEADLINE": "60"}
        self.env.pop("FLEET_DB", None)
        self.workers: dict[str, subprocess.Popen[bytes]] = {}

    def fleet(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([sys.executable, "-m", "fleet", *args], capture_output=True,
                             text=True, timeout=600, check=False, env=self.env)
        if check:
            assert res.returncode == 0, res.stderr[-3000:]
        return res

    def json(self, *args: str) -> Any:
        return json.loads(self.fleet(*args, "--json").stdout)

    def start_worker(self, host: str) -> None:
        log = open(self.root / f"worker-{host}.log", "ab")  # noqa: SIM115
        with log:
            self.workers[host] = subprocess.Popen(
                [sys.executable, "-m", "fleet", "worker", "--host", host, "-c", "2"],
                env=self.env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)

    def wait_live(self, hosts: set[str]) -> dict[str, Any]:
        end = time.monotonic() + 120  # a cap for a broken run, not a timing assumption
        while True:
            doc = self.json("worker", "list")
            if {w["host"] for w in doc["workers"] if w["live"]} >= hosts:
                return doc
            assert time.monotonic() < end, (self.root / "worker-a.log").read_text()[-2000:]
            time.sleep(0.2)

    def close(self) -> None:
        for proc in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        lab_redis.stop(self.redis.root)


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    f = Farm(tmp_path_factory.mktemp("farm"))
    try:
        f.fleet("init")
        f.fleet("keys", "init")
        f.fleet("group", "create", "g")
        f.start_worker("a")
        f.start_worker("b")
        f.wait_live({"a", "b"})
        for name, via in VIA.items():
            uri = f"local://{name}?root={f.root / 'devices' / name}"
            f.fleet("device", "add", uri, "--name", name, "--group", "g",
                    *(["--via", via] if via else []))
        yield f
    finally:
        f.close()


def _registry(farm: Farm) -> Registry:
    return Registry.open(farm.home)


def test_devices_added_with_via_are_enrolled_through_their_host_and_listed(
        farm: Farm) -> None:
    rows = {r["name"]: r for r in farm.json("device", "list")}
    assert {n: rows[n]["via"] for n in VIA} == VIA
    assert all(rows[n]["fingerprint"] for n in VIA)  # enrolled, through a, b and here
    doc = farm.json("worker", "list")
    served = {w["host"]: w["devices"] for w in doc["workers"]}
    assert served == {"a": ["ca"], "b": ["cb"]}
    assert all(w["live"] and w["heartbeat_age_s"] < 20 for w in doc["workers"])
    assert doc["unserved"] == {}


def test_deploy_rollback_and_audit_run_on_each_devices_host(farm: Farm) -> None:
    out = farm.json("deploy", str(TINY), "--group", "g", "--iterations", "1",
                    "--warmup", "0")
    assert out["state"] == "completed"
    assert {r["device"]: r["status"] for r in out["results"]} == dict.fromkeys(VIA, "ok")
    reg = _registry(farm)
    dep_id = uuid.UUID(str(out["deployment"]))
    for st, dev in hist.steps_of(reg, dep_id):  # the workers wrote every step
        states = [e.state for e in hist.step_events(reg, st.id)]
        assert states[0] is StepState.PENDING and states[-1] is StepState.OK, dev.name
        assert StepState.PUSHING in states and StepState.ACTIVATING in states
    assert len(hist.deployment_reports(reg, dep_id)) == 3

    audit = farm.fleet("audit", "--group", "g", "--json")
    rows = json.loads(audit.stdout)
    rows = rows.get("rows", rows) if isinstance(rows, dict) else rows
    assert {r["device"] for r in rows if r.get("model", "").startswith("tiny")} == set(VIA)

    v2 = farm.json("deploy", str(OUTLIER), "--name", "tiny", "--group", "g",
                   "--iterations", "1", "--warmup", "0")
    assert {r["status"] for r in v2["results"]} == {"ok"}
    assert {_active(farm, n) for n in VIA} == {2}
    back = farm.fleet("rollback", "tiny", "--group", "g", "--json")
    doc = json.loads(back.stdout)
    rows = doc if isinstance(doc, list) else doc.get("data", doc.get("results", []))
    assert {r["device"]: (r["ok"], r["active"]) for r in rows} == dict.fromkeys(VIA, (True, 1))
    assert {_active(farm, n) for n in VIA} == {1}  # the agents say so, not just the table


def _active(farm: Farm, name: str) -> int | None:
    from fleet_agent.cli import dispatch
    from fleet_agent.context import AgentContext

    doc = dispatch(AgentContext(farm.root / "devices" / name), "status", {})
    return ((doc.get("installed") or {}).get("tiny") or {}).get("active")
