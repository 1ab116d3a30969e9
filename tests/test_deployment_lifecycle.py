"""Deployment lifecycle: leases (stale by age or by a dead pid), heartbeats, Ctrl-C on the
fake fleet, cancel, id prefixes, and `fleet deployment list|show` on the registry."""

from __future__ import annotations

import json
import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fleet.core import errors
from fleet.home import FleetHome
from fleet.registry import Registry
from fleet.registry import history as hist
from fleet.registry.models import DeploymentState, StepState
from fleet.rollout.deploy import DeployJob, run_deployment
from fleet.rollout.fanout import DeviceStatus
from fleet.rollout.interrupt import CtrlC, Press
from fleet.rollout.lease import (
    Heartbeat,
    LeaseConfig,
    LeaseView,
    reap_stale,
    refresh,
    staleness,
    take_over,
)
from fleet.rollout.resume import cancel_deployment, resume_deployment
from fleet.rollout.waves import run_waves
from tests.fakes import FakeClock, FakeFleet, fake_package

T0 = datetime(2026, 1, 1, tzinfo=UTC)
CFG = LeaseConfig(interval_s=5, stale_after_s=60)

pytestmark = pytest.mark.backends  # SQLite and PostgreSQL (tests/pgfixture.py)


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# -- staleness (pure) ----------------------------------------------------------------------
def test_a_fresh_lease_of_a_live_process_holds() -> None:
    lease = LeaseView("h", 42, _at(0))
    assert staleness(lease, now=_at(59), host="h", alive=lambda p: True,
                     stale_after_s=60) is None


def test_a_lease_is_stale_past_the_heartbeat_bound_on_any_host() -> None:
    lease = LeaseView("other-host", 42, _at(0))
    why = staleness(lease, now=_at(61), host="h", alive=lambda p: True, stale_after_s=60)
    assert why is not None and "no heartbeat for 61s" in why


def test_a_dead_pid_on_this_host_is_stale_at_once_but_not_on_another_host() -> None:
    lease = LeaseView("h", 42, _at(0))
    dead = staleness(lease, now=_at(1), host="h", alive=lambda p: False, stale_after_s=60)
    assert dead is not None and "pid 42" in dead and "gone" in dead
    assert staleness(LeaseView("far", 42, _at(0)), now=_at(1), host="h",
                     alive=lambda p: False, stale_after_s=60) is None


def test_no_lease_at_all_is_stale() -> None:
    assert staleness(LeaseView(None, None, None), now=_at(0), host="h",
                     alive=lambda p: True, stale_after_s=60) is not None


# -- leases in the registry ----------------------------------------------------------------
def _dep(reg: Registry, names: list[str], who: tuple[str, int]) -> uuid.UUID:
    devs = [reg.add_device(n, f"local://{n}?root=/nonexistent") for n in names]
    dep, _ = hist.create_deployment(reg, name="m", version=1, target="t", devices=devs,
                                    artifact_id=None, lease=who)
    return dep.id


def test_reap_marks_only_stale_leases_interrupted(registry: Registry) -> None:
    live = _dep(registry, ["a"], ("h", 1))
    dead = _dep(registry, ["b"], ("h", 2))
    now = datetime.now(UTC)
    marked = reap_stale(registry, now=lambda: now + timedelta(seconds=10), host="h",
                        alive=lambda p: p == 1, config=CFG)
    assert [m[0] for m in marked] == [dead]
    assert hist.get_deployment(registry, live).status is DeploymentState.RUNNING
    gone = hist.get_deployment(registry, dead)
    assert gone.status is DeploymentState.INTERRUPTED and gone.lease_pid is None
    assert "pid 2" in (gone.status_reason or "")
    # later: the live one stops beating and ages past the bound
    marked = reap_stale(registry, now=lambda: now + timedelta(seconds=61), host="h",
                        alive=lambda p: True, config=CFG)
    assert [m[0] for m in marked] == [live]


def test_heartbeat_keeps_the_lease_and_reports_it_lost(registry: Registry) -> None:
    who = ("h", 7)
    dep_id = _dep(registry, ["a"], who)
    clock = FakeClock(1000.0)
    lost: list[bool] = []
    hb = Heartbeat(registry, dep_id, who, on_lost=lambda: lost.append(True), config=CFG,
                   now=lambda: _at(clock()))
    assert hb.beat() and hist.get_deployment(registry, dep_id).heartbeat_at == _at(1000)
    # someone else marks it interrupted (a stale-lease verdict while we slept)
    reap_stale(registry, now=lambda: _at(2000), host="h", alive=lambda p: True, config=CFG)
    assert not hb.beat() and lost == [True]
    assert not hb.beat() and lost == [True]  # once
    assert not refresh(registry, dep_id, who)  # never overwrites the verdict
    assert take_over(registry, dep_id, ("h", 8)) and not take_over(registry, dep_id, ("h", 9))


# -- Ctrl-C --------------------------------------------------------------------------------
def test_ctrl_c_first_press_is_gentle_second_within_2s_is_hard() -> None:
    clock = FakeClock()
    hard: list[bool] = []
    ctl = CtrlC(on_hard=lambda: hard.append(True), clock=clock)
    assert ctl.press() is Press.EARLY  # no deployment yet: a plain KeyboardInterrupt
    ctl.created(uuid.uuid4())
    assert ctl.press() is Press.FIRST and ctl.cancel.is_set() and not hard
    clock.advance(2.5)
    assert ctl.press() is Press.FIRST and not hard  # too late for "twice": a new first
    clock.advance(1.9)
    assert ctl.press(gentle_only=True) is Press.FIRST  # SIGTERM never stops hard
    clock.advance(0.5)
    assert ctl.press() is Press.HARD and hard == [True]


def _job(tmp_path: Path, version: int = 1) -> DeployJob:
    path, sha = fake_package(tmp_path, "m", version)
    return DeployJob(name="m", version=version, kind="model", package=path,
                     package_sha256=sha, digest=f"digest-m-{version}",
                     size=path.stat().st_size, bench={})


def test_ctrl_c_on_the_fake_fleet_interrupts_and_resume_finishes(
        registry: Registry, home: FleetHome, tmp_path: Path) -> None:
    names = ["a", "b", "c"]
    devs = [registry.add_device(n, f"local://{n}?root=/x") for n in names]
    fleet = FakeFleet(names)
    cancel = threading.Event()
    fleet["a"].on_call("stage", cancel.set)  # Ctrl-C while a is staging
    dep_id, res = run_deployment(home, registry, _job(tmp_path), devs, target="t",
                                 opener=fleet.opener, workers=1, cancel=cancel)
    assert res["a"].status is DeviceStatus.CANCELLED  # reached a safe point: staged
    assert "before its activation" in (res["a"].error.message if res["a"].error else "")
    assert [res[n].status for n in ("b", "c")] == [DeviceStatus.CANCELLED] * 2
    assert fleet["b"].calls == [] and fleet["c"].calls == []
    dep = hist.get_deployment(registry, dep_id)
    assert dep.status is DeploymentState.INTERRUPTED and dep.lease_pid is None
    steps = {d.name: s.state for s, d in hist.steps_of(registry, dep_id)}
    assert steps == {"a": StepState.STAGED, "b": StepState.PENDING, "c": StepState.PENDING}
    out = resume_deployment(home, registry, dep_id, opener=fleet.opener)
    assert out.deployment.status is DeploymentState.COMPLETED
    assert fleet["a"].verbs()[-2:] == ["status", "activate"]  # no second push
    assert {fleet[n].models["m"]["active"] for n in names} == {1}


def test_a_wave_rollout_is_one_deployment_and_a_cancel_between_waves_interrupts(
        registry: Registry, home: FleetHome, tmp_path: Path) -> None:
    names = ["a", "b", "c"]
    devs = [registry.add_device(n, f"local://{n}?root=/x") for n in names]
    fleet = FakeFleet(names)
    cancel = threading.Event()
    fleet["a"].on_call("activate", cancel.set)
    out = run_waves(home, registry, _job(tmp_path), devs, spec="1,100%", max_failed=0,
                    target="t", opener=fleet.opener, cancel=cancel)
    assert out.halted_at is None and out.interrupted_at == 2
    dep_id, = out.deployments
    steps = {d.name: (s.wave, s.state) for s, d in hist.steps_of(registry, dep_id)}
    assert steps == {"a": (1, StepState.OK), "b": (2, StepState.PENDING),
                     "c": (2, StepState.PENDING)}
    assert hist.get_deployment(registry, dep_id).status is DeploymentState.INTERRUPTED
    again = resume_deployment(home, registry, dep_id, opener=fleet.opener)
    assert again.deployment.status is DeploymentState.COMPLETED
    assert fleet["a"].verbs() == ["status", "stage", "activate"]  # wave 1 not redone


def test_cancel_signals_a_running_controller_and_ends_an_interrupted_one(
        registry: Registry) -> None:
    import os
    import socket
    sent: list[int] = []
    me = (socket.gethostname(), os.getppid())  # a live process on this host, not us
    dep_id = _dep(registry, ["a"], me)
    dep, did = cancel_deployment(registry, dep_id, signal_process=sent.append)
    assert sent == [me[1]] and "SIGTERM" in did and dep.status is DeploymentState.CANCELLED
    # the controller's final write does not overwrite the cancel; its pending step ends
    assert hist.finish_deployment(registry, dep_id, lease=me) is DeploymentState.CANCELLED
    assert [s.state for s, _ in hist.steps_of(registry, dep_id)] == [StepState.CANCELLED]
    with pytest.raises(errors.UsageError, match="nothing to cancel"):
        cancel_deployment(registry, dep_id)


def test_ids_take_an_unambiguous_prefix(registry: Registry) -> None:
    ids = [_dep(registry, [f"d{i}"], ("h", 1)) for i in range(20)]
    first = ids[0].hex
    assert hist.find_deployment(registry, first[:12]).id == ids[0]
    assert hist.find_deployment(registry, str(ids[0])).id == ids[0]
    firsts = [i.hex[0] for i in ids]  # 20 ids, 16 hex digits: some first digit repeats
    shared = next(c for c in firsts if firsts.count(c) > 1)
    with pytest.raises(errors.UsageError, match="ambiguous"):
        hist.find_deployment(registry, shared)
    unused = next(f"{a}{b}" for a in "0123456789abcdef" for b in "0123456789abcdef"
                  if not any(i.hex.startswith(f"{a}{b}") for i in ids))
    with pytest.raises(errors.NotFoundError):
        hist.find_deployment(registry, unused)
    with pytest.raises(errors.UsageError, match="not a deployment id"):
        hist.find_deployment(registry, "xyz")


def test_list_and_show_json(run_fleet, registry: Registry, home: FleetHome,  # type: ignore[no-untyped-def]
                            tmp_path: Path) -> None:
    names = ["a", "b"]
    devs = [registry.add_device(n, f"local://{n}?root=/x") for n in names]
    fleet = FakeFleet(names)
    fleet["b"].unhealthy.add(("m", 1))
    dep_id, _ = run_deployment(home, registry, _job(tmp_path), devs, target="g",
                               opener=fleet.opener, retries=0)
    dead = _dep(registry, ["c"], ("nowhere", 1))  # another host, silent for long: stale
    with registry.session() as s:
        from fleet.registry.models import Deployment
        row = s.get(Deployment, dead)
        assert row is not None
        row.heartbeat_at = datetime.now(UTC) - timedelta(hours=1)
        s.add(row)
    r = run_fleet("deployment", "list", "--json")
    assert r.exit_code == 0, r.output
    docs = {d["id"]: d for d in json.loads(r.stdout)}
    assert docs[str(dep_id)]["status"] == "failed" and docs[str(dep_id)]["model"] == "m@1"
    assert docs[str(dep_id)]["steps"] == {"failed": 1, "ok": 1}
    assert docs[str(dead)]["status"] == "interrupted"
    r = run_fleet("deployment", "show", str(dep_id)[:8], "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    steps = {s["device"]: s for s in doc["steps"]}
    assert steps["a"]["state"] == "ok" and steps["a"]["bytes_sent"] > 0
    assert steps["a"]["attempts"] == 1 and steps["a"]["duration_s"] is not None
    assert steps["b"]["error_code"] == "health_check"
    assert [e["state"] for e in steps["a"]["events"]][-2:] == ["activated", "ok"]
    assert run_fleet("deployment", "show", "0123456789abcdef0123").exit_code == 5
    assert run_fleet("deployment", "resume", str(dep_id)).exit_code == 2  # failed: finished
