"""The controller dies (SIGKILL) or is interrupted (SIGINT) in the middle of `fleet deploy`
to three local devices; a later command sees it `interrupted`, `fleet deployment resume`
completes it, and every device's step then matches its agent's `status`.

The kill points come from the controller's test hook ``FLEET_TEST_KILL_AT``
(:mod:`fleet.rollout.deploy`); the SIGINT is sent when the registry shows a device
activating (driven by registry state, not by sleeps)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from fleet.artifacts import init_signing_key
from fleet.home import FleetHome
from fleet.registry import Registry
from fleet.registry import history as hist
from fleet.registry.db import make_engine
from fleet.registry.models import StepState
from tests.conftest import REPO, local_uri

TINY = REPO / "models" / "tiny" / "tiny.mnn"
NAMES = ("d1", "d2", "d3")

pytestmark = pytest.mark.backends  # SQLite and PostgreSQL (tests/pgfixture.py)


def _fleet(home: FleetHome, *args: str, env: dict[str, str] | None = None,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "fleet", "--home", str(home.path), *args],
                         capture_output=True, text=True, timeout=600, check=False,
                         env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200", **(env or {})})
    if check:
        assert res.returncode == 0, res.stderr[-2000:]
    return res


def _deploy_argv(home: FleetHome) -> list[str]:
    return [sys.executable, "-m", "fleet", "--home", str(home.path), "deploy", str(TINY),
            "--group", "g", "--workers", "1", "--iterations", "2", "--warmup", "1"]


@pytest.fixture
def three(home: FleetHome, tmp_path: Path) -> FleetHome:
    Registry.init(home).close()
    init_signing_key(home)
    _fleet(home, "group", "create", "g")
    for n in NAMES:
        _fleet(home, "device", "add", local_uri(tmp_path, n), "--name", n, "--group", "g")
    return home


def _agent_active(tmp_path: Path, name: str) -> int | None:
    from fleet_agent.cli import dispatch
    from fleet_agent.context import AgentContext
    doc = dispatch(AgentContext(tmp_path / "devices" / name), "status", {})
    return ((doc.get("installed") or {}).get("tiny") or {}).get("active")


def _wait(cond, what: str, limit_s: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + limit_s  # a cap for a broken run, not a timing assumption
    while not cond():
        assert time.monotonic() < end, f"gave up waiting for {what}"
        time.sleep(0.05)


def _resume_and_check(home: FleetHome, tmp_path: Path) -> uuid.UUID:
    docs = json.loads(_fleet(home, "deployment", "list", "--json").stdout)
    assert docs[0]["status"] == "interrupted", docs[0]
    dep_id = docs[0]["id"]
    out = _fleet(home, "deployment", "resume", dep_id[:10], "--json")
    assert json.loads(out.stdout)["state"] == "completed"
    show = json.loads(_fleet(home, "deployment", "show", dep_id, "--json").stdout)
    assert show["deployment"]["status"] == "completed"
    reg = Registry.open(home)
    for st, dev in hist.steps_of(reg, uuid.UUID(dep_id)):
        active = _agent_active(tmp_path, dev.name)
        assert active == 1, (dev.name, active)
        assert st.state in (StepState.OK, StepState.SKIPPED), (dev.name, st.state)
    reps = hist.deployment_reports(reg, uuid.UUID(dep_id))
    assert {r.device_id for r in reps} == {d.id for _, d in hist.steps_of(reg,
                                                                          uuid.UUID(dep_id))}
    return uuid.UUID(dep_id)


@pytest.mark.backends("sqlite")
@pytest.mark.parametrize("point", ["packaged", "pushing", "staged", "activating",
                                   "activated"])
def test_sigkill_at_each_point_then_resume_completes(three: FleetHome, tmp_path: Path,
                                                     point: str) -> None:
    _sigkill_then_resume(three, tmp_path, point)


@pytest.mark.backends("postgresql")
@pytest.mark.parametrize("point", ["pushing", "activated"])
def test_sigkill_then_resume_on_postgresql(three: FleetHome, tmp_path: Path,
                                           point: str) -> None:
    """The resume path's reads and writes on PostgreSQL, at an unfinished transfer and at
    an orphaned activation (the other points differ only in the agent's state, which is
    the same on both backends: SQLite covers them; two points save the suite a minute)."""
    _sigkill_then_resume(three, tmp_path, point)


def _sigkill_then_resume(three: FleetHome, tmp_path: Path, point: str) -> None:
    res = subprocess.run(_deploy_argv(three), capture_output=True, text=True, timeout=600,
                         check=False, env={**os.environ, "FLEET_TEST_KILL_AT": point})
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    if point in ("activating", "activated"):  # the orphaned agent finishes on its own
        _wait(lambda: _agent_active(tmp_path, "d1") == 1, "d1's orphaned activation")
    dep_id = _resume_and_check(three, tmp_path)
    if point in ("activating", "activated"):
        reg = Registry.open(three)
        step = next(s for s, d in hist.steps_of(reg, dep_id) if d.name == "d1")
        events = hist.step_events(reg, step.id)
        assert any(e.detail.get("recovered") for e in events)  # recorded what happened


def test_ctrl_c_stops_gently_prints_the_table_and_resume_finishes(
        three: FleetHome, tmp_path: Path) -> None:
    proc = subprocess.Popen([*_deploy_argv(three), "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "NO_COLOR": "1"})
    engine = make_engine(three.db_url)

    def activating() -> bool:
        try:
            with engine.connect() as con:
                return bool(con.execute(text("select count(*) from deployment_steps where "
                                             "state = 'activating'")).scalar())
        except DBAPIError:
            return False

    try:
        _wait(activating, "a device activating")
        proc.send_signal(signal.SIGINT)
        out, errs = proc.communicate(timeout=300)
    finally:
        engine.dispose()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, errs[-2000:]
    doc = json.loads(out)
    assert doc["state"] == "interrupted"
    rows = {r["device"]: r["outcome"] for r in doc["results"]}
    assert rows["d1"] == "ok"  # the activation in flight finished and was recorded
    assert rows["d2"] == rows["d3"] == "cancelled"  # never started
    assert _agent_active(tmp_path, "d2") is None
    _resume_and_check(three, tmp_path)
