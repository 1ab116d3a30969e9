"""The one fan-out on in-memory fakes: retries, deadlines, cancellation, waves, results.

No MNN, no root, no network; time is a :class:`FakeClock`, peers are :class:`FakeAgent`s
whose faults each test scripts, so nothing here depends on how fast the machine is.
"""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet.agent_client import AgentClient, AgentStatus
from fleet.cli._exit import exit_code_for
from fleet.core import errors
from fleet.home import FleetHome
from fleet.registry import Device, Registry
from fleet.registry import history as hist
from fleet.rollout.deploy import DeployJob, run_deployment
from fleet.rollout.fanout import (
    Backoff,
    Deadline,
    DeviceOutcome,
    DeviceStatus,
    FleetResult,
    TaskContext,
    call_each,
)
from fleet.rollout.waves import run_waves
from tests.fakes import FakeClock, FakeFleet, fake_package


def _status_task(fleet: FakeFleet) -> Any:
    def task(name: str, ctx: TaskContext) -> AgentStatus:
        with fleet.opener(name, ctx) as agent:
            return agent.status()
    return task


def _each(fleet: FakeFleet, clock: FakeClock, **kw: Any) -> FleetResult[AgentStatus]:
    names = list(fleet.agents)
    return call_each({n: n for n in names}, _status_task(fleet), clock=clock,
                     sleep=clock.sleep, **kw)


# -- retries ----------------------------------------------------------------------------
def test_retryable_error_is_retried_with_capped_exponential_backoff() -> None:
    fleet, clock = FakeFleet(["a"]), FakeClock()
    fleet["a"].fail("status", 4, errors.ConnectionLostError("a: dropped"))
    res = _each(fleet, clock, retries=4, backoff=Backoff(base=0.5, cap=2.0, jitter=1.0))
    out = res["a"]
    assert out.status is DeviceStatus.OK and out.attempts == 5
    assert clock.sleeps == [0.5, 1.0, 2.0, 2.0]  # doubled, then capped
    assert out.duration_s == pytest.approx(5.5)  # on the fake clock: the pauses only
    assert fleet["a"].verbs() == ["status"] * 5


def test_backoff_jitter_stays_within_its_band() -> None:
    fleet, clock = FakeFleet(["a"]), FakeClock()
    fleet["a"].fail("status", 3, errors.DeviceOfflineError("a: offline"))
    _each(fleet, clock, retries=3, backoff=Backoff(base=1.0, cap=3.0, jitter=0.5),
          rng=random.Random(7))
    for pause, full in zip(clock.sleeps, [1.0, 2.0, 3.0], strict=True):
        assert full * 0.5 <= pause <= full
    assert len(set(clock.sleeps)) == 3


def test_retries_stop_at_the_limit_and_say_unreachable() -> None:
    fleet, clock = FakeFleet(["a"]), FakeClock()
    fleet["a"].fail("status", -1, errors.ConnectError("a: refused"))
    out = _each(fleet, clock, retries=2)["a"]
    assert out.status is DeviceStatus.UNREACHABLE and out.status.label == "failed"
    assert out.attempts == 3 and len(clock.sleeps) == 2
    assert isinstance(out.error, errors.ConnectError)


@pytest.mark.parametrize("error", [errors.DiskFullError("a: no space left"),
                                   errors.RollbackError("a: older than installed"),
                                   errors.AuthError("a: key refused")])
def test_non_retryable_error_is_not_retried(error: errors.FleetError) -> None:
    fleet, clock = FakeFleet(["a"]), FakeClock()
    if isinstance(error, errors.TransportError):
        fleet["a"].fail("status", 1, error)
    else:
        fleet["a"].refuse("status", error)  # an error document from the agent
    out = _each(fleet, clock, retries=5)["a"]
    assert out.attempts == 1 and clock.sleeps == []
    assert type(out.error) is type(error)
    assert out.status in (DeviceStatus.FAILED, DeviceStatus.UNREACHABLE)


def test_a_bug_in_a_task_fails_that_device_only() -> None:
    def task(name: str, ctx: TaskContext) -> int:
        if name == "b":
            raise KeyError("oops")
        return 1

    res = call_each({"a": "a", "b": "b"}, task, retries=3)
    assert res["a"].ok and res["a"].result == 1
    assert res["b"].status is DeviceStatus.FAILED and res["b"].attempts == 1
    assert res["b"].error is not None and "KeyError" in res["b"].error.message


# -- deadlines --------------------------------------------------------------------------
def test_deadline_closes_the_transport_of_a_hung_device_and_spares_the_others() -> None:
    # one worker, "fine" first: the hung device's jump of the shared fake clock cannot
    # touch the other device's deadline
    fleet, clock = FakeFleet(["fine", "hung"]), FakeClock()
    fleet["hung"].hang("status", clock, advance_s=100.0)  # the peer stops answering
    res = _each(fleet, clock, workers=1, deadline_s=10.0, grace_s=5.0, retries=3,
                poll_s=0.01)
    out = res["hung"]
    assert out.status is DeviceStatus.TIMED_OUT and out.status.label == "failed"
    assert out.attempts == 1  # no retry past the deadline
    # the watchdog closed the transport, which ended the blocked call (the fake's own
    # safety net would have raised TransportTimeout instead)
    assert isinstance(out.error, errors.ConnectionLostError)
    assert fleet.transports["hung"][0].closed.is_set()
    assert res["fine"].ok


def test_task_checks_its_deadline_between_steps() -> None:
    clock = FakeClock()
    steps: list[str] = []

    def task(name: str, ctx: TaskContext) -> None:
        steps.append("first")
        clock.advance(31.0)  # the first step took longer than the device's deadline
        ctx.check()
        steps.append("second")

    out = call_each({"a": "a"}, task, deadline_s=30.0, retries=2, clock=clock,
                    sleep=clock.sleep)["a"]
    assert steps == ["first"]
    assert out.status is DeviceStatus.TIMED_OUT and out.attempts == 1


def test_a_refusal_that_comes_late_keeps_its_own_status() -> None:
    clock = FakeClock()

    def task(name: str, ctx: TaskContext) -> None:
        clock.advance(31.0)
        raise errors.HealthCheckError("a: no backend passed")

    out = call_each({"a": "a"}, task, deadline_s=30.0, clock=clock, sleep=clock.sleep)["a"]
    assert out.status is DeviceStatus.FAILED
    assert isinstance(out.error, errors.HealthCheckError)


# -- cancellation -----------------------------------------------------------------------
def test_cancel_stops_new_devices_and_lets_the_one_in_flight_finish() -> None:
    fleet, clock = FakeFleet(["a", "b", "c"]), FakeClock()
    cancel = threading.Event()
    fleet["a"].on_call("status", cancel.set)  # cancelled while a's call is in flight
    res = _each(fleet, clock, workers=1, cancel=cancel)
    assert res["a"].status is DeviceStatus.OK and res["a"].result is not None
    for name in ("b", "c"):
        assert res[name].status is DeviceStatus.CANCELLED and res[name].attempts == 0
        assert isinstance(res[name].error, errors.RolloutCancelledError)
        assert fleet[name].calls == []  # never started
    assert [o.device for o in res] == ["a", "b", "c"]


def test_cancel_starts_no_new_retry() -> None:
    fleet, clock = FakeFleet(["a"]), FakeClock()
    cancel = threading.Event()
    fleet["a"].on_call("status", cancel.set)
    fleet["a"].fail("status", 3, errors.ConnectionLostError("a: dropped"))
    out = _each(fleet, clock, retries=3, cancel=cancel)["a"]
    assert out.attempts == 1 and clock.sleeps == []
    assert out.status is DeviceStatus.UNREACHABLE


# -- result shape and the one exit rule -------------------------------------------------
def test_result_keeps_target_order_statuses_and_timings() -> None:
    clock = FakeClock(100.0)

    def task(name: str, ctx: TaskContext) -> str:
        clock.advance(2.0)
        if name == "s":
            ctx.finish_as(DeviceStatus.SKIPPED, "already there")
        if name == "f":
            raise errors.HealthCheckError("f: unhealthy")
        return name.upper()

    res = call_each({n: n for n in ("z", "s", "f")}, task, clock=clock, sleep=clock.sleep)
    assert [o.device for o in res] == ["z", "s", "f"]
    assert [o.device for o in res.succeeded] == ["z", "s"]
    assert [o.device for o in res.failed] == ["f"]
    assert res["z"].result == "Z" and res["z"].status is DeviceStatus.OK
    assert (res["s"].status, res["s"].reason) == (DeviceStatus.SKIPPED, "already there")
    assert res["f"].result is None and res["f"].error_text() == "health_check: f: unhealthy"
    assert all(o.duration_s == pytest.approx(2.0) for o in res)
    assert all(o.started_at is not None and o.started_at >= 100.0 for o in res)
    with pytest.raises(ValueError):  # a failure is raised, never declared
        TaskContext("x", Deadline(1.0, clock)).finish_as(DeviceStatus.FAILED)


def test_partial_failure_exit_code_is_chosen_in_one_place() -> None:
    ok: FleetResult[int] = FleetResult()
    ok.add(DeviceOutcome("a", DeviceStatus.OK, result=1))
    ok.add(DeviceOutcome("b", DeviceStatus.SKIPPED))
    ok.raise_for_failures("deploy")  # nothing failed: no error
    mixed: FleetResult[int] = FleetResult()
    mixed.extend(ok)
    disk = errors.DiskFullError("c: no space")
    mixed.add(DeviceOutcome("c", DeviceStatus.FAILED, error=disk))
    mixed.add(DeviceOutcome("d", DeviceStatus.NOT_STARTED))
    with pytest.raises(errors.PartialFailureError) as info:
        mixed.raise_for_failures("deploy")
    assert exit_code_for(info.value) == 20
    assert info.value.details["failed"] == {"c": "disk_full", "d": "not_started"}
    # nothing succeeded and every device failed the same way: that error's exit code
    full: FleetResult[int] = FleetResult()
    for name in ("e", "f"):
        full.add(DeviceOutcome(name, DeviceStatus.FAILED,
                               error=errors.DiskFullError(f"{name}: no space")))
    with pytest.raises(errors.PartialFailureError) as info_full:
        full.raise_for_failures("deploy")
    assert exit_code_for(info_full.value) == 16
    # nothing succeeded but the causes differ: the fan-out's own code
    mixed_causes: FleetResult[int] = FleetResult()
    mixed_causes.add(DeviceOutcome("g", DeviceStatus.FAILED, error=errors.DiskFullError("g")))
    mixed_causes.add(DeviceOutcome("h", DeviceStatus.FAILED,
                                   error=errors.ConnectError("h: refused")))
    with pytest.raises(errors.PartialFailureError) as info_mixed:
        mixed_causes.raise_for_failures("deploy")
    assert exit_code_for(info_mixed.value) == 20
    assert info.value.__cause__ is disk
    assert "2 of 4" in info.value.message


# -- deploy and waves on fakes, with a real registry ------------------------------------
@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FleetHome, Registry]]:
    home = FleetHome.from_env(tmp_path_factory.mktemp("fanout") / "home")
    reg = Registry.init(home)
    yield home, reg
    reg.close()


def _devices(reg: Registry, n: int) -> list[Device]:
    tag = uuid.uuid4().hex[:6]
    return [reg.add_device(f"{tag}-d{i}", f"local://{tag}-d{i}?root=/nonexistent")
            for i in range(1, n + 1)]


def _job(tmp_path: Path, version: int) -> DeployJob:
    path, sha = fake_package(tmp_path, "m", version)
    return DeployJob(name="m", version=version, kind="model", package=path,
                     package_sha256=sha, digest=f"digest-m-{version}",
                     size=path.stat().st_size, bench={"iterations": 1, "warmup": 0})


def test_deploy_records_a_step_event_per_attempt(registry: tuple[FleetHome, Registry],
                                                 tmp_path: Path) -> None:
    home, reg = registry
    devs = _devices(reg, 2)
    fleet = FakeFleet([d.name for d in devs])
    fleet[devs[0].name].fail("stage", 1, errors.ConnectionLostError("dropped"))
    clock = FakeClock()
    dep_id, res = run_deployment(home, reg, _job(tmp_path, 1), devs, target="t",
                                 opener=fleet.opener, clock=clock, sleep=clock.sleep)
    assert [o.status for o in res] == [DeviceStatus.OK, DeviceStatus.OK]
    assert res[devs[0].name].attempts == 2 and res[devs[1].name].attempts == 1
    retried, plain = res[devs[0].name].result, res[devs[1].name].result
    assert retried is not None and retried.report is not None
    assert retried.bytes_sent == 0  # the retry resumed the push that had completed
    assert plain is not None and plain.bytes_sent > 0
    steps = {d.name: s for s, d in hist.steps_of(reg, dep_id)}
    events = [e.state for e in hist.step_events(reg, steps[devs[0].name].id)]
    assert events.count("connecting") == 2 and events[-1] == "ok"
    # the same version again: skipped, nothing pushed
    before = {n: dict(a.files) for n, a in fleet.agents.items()}
    _, again = run_deployment(home, reg, _job(tmp_path, 1), devs, target="t",
                              opener=fleet.opener)
    assert {o.status for o in again} == {DeviceStatus.SKIPPED}
    assert {n: a.files for n, a in fleet.agents.items()} == before


def test_deploy_refused_by_the_plan_fails_with_a_rollout_error(
        registry: tuple[FleetHome, Registry], tmp_path: Path) -> None:
    home, reg = registry
    devs = _devices(reg, 1)
    fleet = FakeFleet([devs[0].name])
    fleet[devs[0].name].install("m", 3)  # newer than what we deploy
    _, res = run_deployment(home, reg, _job(tmp_path, 2), devs, target="t",
                            opener=fleet.opener)
    out = res[devs[0].name]
    assert out.status is DeviceStatus.FAILED and isinstance(out.error, errors.PlanError)
    assert out.attempts == 1 and fleet[devs[0].name].files == {}  # nothing was sent
    assert fleet[devs[0].name].verbs() == ["status"]


def test_waves_gate_halts_and_rolls_back_what_it_activated(
        registry: tuple[FleetHome, Registry], tmp_path: Path) -> None:
    home, reg = registry
    devs = _devices(reg, 4)
    names = [d.name for d in devs]
    fleet = FakeFleet(names)
    for n in names:
        fleet[n].install("m", 1)
    fleet[names[1]].unhealthy.add(("m", 2))  # wave 1's second device fails its health check
    said: list[str] = []
    out = run_waves(home, reg, _job(tmp_path, 2), devs, spec="2,3,100%", max_failed=0,
                    target="t", say=said.append, opener=fleet.opener)
    assert out.waves == [names[:2], names[2:3], names[3:]]
    assert out.halted_at == 1 and len(out.deployments) == 1
    res = out.result
    assert [o.device for o in res] == names
    assert res[names[0]].status is DeviceStatus.ROLLED_BACK
    assert res[names[0]].status.label == "rolled back"
    assert res[names[1]].status is DeviceStatus.FAILED
    assert isinstance(res[names[1]].error, errors.HealthCheckError)
    assert [res[n].status for n in names[2:]] == [DeviceStatus.NOT_STARTED] * 2
    assert fleet[names[0]].models["m"]["active"] == 1  # switched back
    assert fleet[names[1]].models["m"]["active"] == 1  # refused: v1 stayed
    assert all(fleet[n].calls == [] for n in names[2:])  # later waves never touched
    assert [o.device for o in out.rolled_back] == [names[0]]
    assert any("halting and rolling back 1 device" in m for m in said)
    with pytest.raises(errors.PartialFailureError):
        res.raise_for_failures("deploy")


def test_waves_pass_their_gate_within_max_failed(registry: tuple[FleetHome, Registry],
                                                 tmp_path: Path) -> None:
    home, reg = registry
    devs = _devices(reg, 3)
    names = [d.name for d in devs]
    fleet = FakeFleet(names)
    fleet[names[0]].fail("status", -1, errors.ConnectError("refused"))
    out = run_waves(home, reg, _job(tmp_path, 1), devs, spec="1,100%", max_failed=1,
                    target="t", opener=fleet.opener, retries=0)
    assert out.halted_at is None and len(out.deployments) == 1  # waves live inside one deployment
    assert out.result[names[0]].status is DeviceStatus.UNREACHABLE
    assert [out.result[n].status for n in names[1:]] == [DeviceStatus.OK] * 2


def test_agent_client_speaks_the_documented_wire() -> None:
    fleet = FakeFleet(["a"])
    fleet["a"].install("m", 1)
    fleet["a"].install("m", 2)
    with fleet.opener("a") as agent:
        assert isinstance(agent, AgentClient)
        assert agent.argv("lora swap", {})[:4] == ["fleet-agent", "--root", "/fake/agent",
                                                   "lora"]
        assert agent.status().installed["m"]["version"] == 2
        back = agent.rollback("m")
        assert (back.current, back.previous) == (1, 2)
        with pytest.raises(errors.StoreError):
            agent.activate("m", 9)
    verb, args = fleet["a"].calls[1]
    assert verb == "rollback" and {k: args[k] for k in ("name", "order")} == \
        {"name": "m", "order": None}
    # the controller's clock travels with a rollback, so a device far off can be told so
    assert set(args) <= {"name", "order", "controller_time", "trust"}
    assert "controller_time" in args
