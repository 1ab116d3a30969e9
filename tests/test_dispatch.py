"""The Celery dispatcher behind the fan-out's seam, on fakes: the broker is
``tests.fakes.FakeBroker`` (a task runs at once through the real worker code,
:func:`fleet.worker.tasks.run_payload`, unless its queue is held), the devices are
``FakeAgent``s, time is a ``FakeClock``; the registry is real. Real Celery and Redis
run in tests/test_worker_celery.py and the lab tests (tests/test_lab_farm.py)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from fleet.core import errors
from fleet.home import FleetHome
from fleet.registry import Device, Registry
from fleet.registry import history as hist
from fleet.registry.models import DeploymentState, StepState
from fleet.rollout.deploy import DeployJob, DeployResult, run_deployment
from fleet.rollout.fanout import DeviceOutcome, DeviceStatus
from fleet.worker import roster
from fleet.worker.app import celery_conf
from fleet.worker.dispatch import CeleryDispatcher
from fleet.worker.progress import BytesReporter
from fleet.worker.settings import FarmSettings, settings_for
from fleet.worker.tasks import WorkerContext, run_payload
from fleet.worker.watch import CancelWatch
from fleet.worker.wire import outcome_doc, outcome_from_doc
from tests.fakes import FakeBroker, FakeClock, FakeFleet, fake_package

T0 = datetime(2026, 1, 1, tzinfo=UTC)
VIA = {"a1": "a", "a2": "a", "b1": "b", "h1": None}


class Farm:
    """Two farm hosts (a: a1, a2; b: b1) and a device the controller reaches (h1)."""

    def __init__(self, home: FleetHome, reg: Registry) -> None:
        self.home, self.reg = home, reg
        self.fleet = FakeFleet(list(VIA))
        self.devices: list[Device] = []
        for name, via in VIA.items():
            reg.add_device(name, f"local://{name}?root=/x")
            self.devices.append(reg.update_device(name, via=via))
        self.clock = FakeClock()
        self.settings = FarmSettings(broker_url="redis+socket:///fake",
                                     artifacts=home.artifacts_dir, deadline_s=60.0)
        self.broker = FakeBroker()
        self.worker = WorkerContext(home, reg, self.settings, "fake@test",
                                    CancelWatch(self.broker.mget), opener=self.fleet.opener,
                                    progress=BytesReporter(self.broker.hset))
        self.broker.run = lambda payload: run_payload(self.worker, payload)
        self.on_sleep: list[Any] = []
        self.dispatcher = CeleryDispatcher(self.settings, reg, self.broker, clock=self.clock,
                                           sleep=self.sleep, now=self.now)

    def now(self) -> datetime:
        return T0 + timedelta(seconds=self.clock())

    def sleep(self, seconds: float) -> None:
        self.clock.sleep(seconds)
        for hook in list(self.on_sleep):
            hook()

    def worker_up(self, host: str) -> None:
        roster.register(self.reg, name=f"{host}@m", host=host, queue=f"fleet.host.{host}",
                        hostname="m", pid=100, concurrency=2, now=self.now())

    def beat(self, host: str) -> None:
        roster.beat(self.reg, f"{host}@m", 100, now=self.now())

    def job(self, tmp_path: Path, version: int = 1) -> DeployJob:
        path, sha = fake_package(self.home.artifacts_dir, "m", version)
        return DeployJob(name="m", version=version, kind="model", package=path,
                         package_sha256=sha, digest=f"digest-m-{version}",
                         size=path.stat().st_size, bench={})

    def deploy(self, tmp_path: Path, **kw: Any) -> tuple[uuid.UUID, Any]:
        return run_deployment(self.home, self.reg, self.job(tmp_path), self.devices,
                              target="t", opener=self.fleet.opener,
                              dispatcher=self.dispatcher, retries=0, **kw)

    def step(self, dep_id: uuid.UUID, name: str) -> Any:
        return next(st for st, d in hist.steps_of(self.reg, dep_id) if d.name == name)


@pytest.fixture
def farm(home: FleetHome, registry: Registry) -> Farm:
    return Farm(home, registry)


def test_farm_devices_run_on_their_hosts_queue_and_the_others_here(
        farm: Farm, tmp_path: Path) -> None:
    farm.worker_up("a")
    farm.worker_up("b")
    dep_id, res = farm.deploy(tmp_path)
    assert [o.status for o in res] == [DeviceStatus.OK] * 4, [o.reason for o in res]
    assert list(res.outcomes) == ["a1", "a2", "b1", "h1"]  # the order given
    queues = sorted((s.payload["device"], s.queue) for s in farm.broker.sent)
    assert queues == [("a1", "fleet.host.a"), ("a2", "fleet.host.a"), ("b1", "fleet.host.b")]
    for name in VIA:  # every device really runs it, its step written by whoever ran it
        assert farm.fleet[name].models["m"]["active"] == 1
        st = farm.step(dep_id, name)
        assert st.state is StepState.OK
        states = [e.state for e in hist.step_events(farm.reg, st.id)]
        assert states[-2:] == [StepState.ACTIVATED, StepState.OK]
    report = res["b1"].result
    assert isinstance(report, DeployResult) and report.bytes_sent > 0
    assert (report.report or {}).get("version") == 1
    assert hist.get_deployment(farm.reg, dep_id).status is DeploymentState.COMPLETED


def test_a_farm_push_reports_its_bytes_to_the_controllers_progress(
        farm: Farm, tmp_path: Path) -> None:
    farm.worker_up("a")
    farm.worker_up("b")
    seen: dict[str, list[tuple[int, int]]] = {}
    dep_id, res = farm.deploy(tmp_path, on_bytes=lambda name, done, total: seen.setdefault(
        name, []).append((done, total)))
    assert [o.status for o in res] == [DeviceStatus.OK] * 4
    for name in VIA:  # farm devices through the broker's hash, h1 from this process
        sent = farm.step(dep_id, name).bytes_sent
        assert sent and seen[name][-1] == (sent, sent), (name, seen.get(name))
    reported = {d for h in farm.broker.hashes.values() for d in h}
    assert reported == {"a1", "a2", "b1"}  # the workers wrote them, the controller read them


def test_a_host_without_a_live_worker_fails_its_devices_unreachable_sending_nothing(
        farm: Farm, tmp_path: Path) -> None:
    farm.worker_up("a")  # b has no worker at all
    dep_id, res = farm.deploy(tmp_path)
    assert res["b1"].status is DeviceStatus.UNREACHABLE
    assert isinstance(res["b1"].error, errors.ConnectError)
    assert "farm host 'b' has no live worker" in res["b1"].reason
    assert [res[n].status for n in ("a1", "a2", "h1")] == [DeviceStatus.OK] * 3
    assert all(s.queue != "fleet.host.b" for s in farm.broker.sent)
    assert farm.fleet["b1"].calls == []
    st = farm.step(dep_id, "b1")
    assert (st.state, st.error_code) == (StepState.FAILED, "connect")
    assert hist.get_deployment(farm.reg, dep_id).status is DeploymentState.FAILED


def test_a_host_whose_worker_goes_silent_fails_its_pending_devices_within_the_deadline(
        farm: Farm, tmp_path: Path) -> None:
    farm.worker_up("a")
    farm.worker_up("b")
    farm.broker.held.add("fleet.host.b")  # b's worker took the task, then died
    farm.on_sleep.append(lambda: farm.beat("a"))  # a stays alive
    _, res = farm.deploy(tmp_path)
    assert res["b1"].status is DeviceStatus.UNREACHABLE
    assert "lost its last live worker" in res["b1"].reason
    assert farm.clock() < farm.settings.deadline_s  # noticed by heartbeats, not a deadline
    assert farm.clock() >= farm.settings.stale_s
    assert farm.broker.task("b1").task_id in farm.broker.revoked
    assert [res[n].status for n in ("a1", "a2", "h1")] == [DeviceStatus.OK] * 3


def test_a_started_task_that_never_ends_on_a_live_host_times_out_at_its_bound(
        farm: Farm, tmp_path: Path) -> None:
    farm.worker_up("a")
    farm.worker_up("b")
    farm.broker.held.add("fleet.host.b")
    started: list[float] = []

    def worker_b() -> None:
        farm.beat("a")
        farm.beat("b")
        if not started and farm.clock() >= 100:  # queued 100 s (no timeout), then starts
            farm.broker.start("b1")
            started.append(farm.clock())

    farm.on_sleep.append(worker_b)
    _, res = farm.deploy(tmp_path, deadline_s=30.0)
    assert res["b1"].status is DeviceStatus.TIMED_OUT
    bound = farm.settings.task_bound_s(30.0)  # redelivery bound + deadline + grace
    assert bound < farm.clock() - started[0] <= bound + 1
    assert farm.broker.task("b1").task_id in farm.broker.revoked
    assert farm.broker.task("b1").payload["deadline_s"] == 30.0


def test_a_queued_task_waits_for_its_hosts_worker_then_a_later_one_does_nothing(
        farm: Farm, tmp_path: Path) -> None:
    farm.worker_up("a")
    farm.worker_up("b")
    farm.broker.held.add("fleet.host.b")

    def busy_worker_b() -> None:  # b's worker is alive, busy for 10 minutes
        farm.beat("a")
        farm.beat("b")
        if farm.clock() >= 600 and farm.broker.task("b1").task_id not in farm.broker.results:
            farm.broker.release("b1")

    farm.on_sleep.append(busy_worker_b)
    _, res = farm.deploy(tmp_path, deadline_s=30.0)
    assert res["b1"].status is DeviceStatus.OK  # its deadline ran from its start
    assert farm.clock() >= 600
    # the fan-out is over: a copy of one of its tasks taken now is not run
    token = farm.broker.task("b1").payload["cancel"]
    assert token in farm.broker.cancelled
    calls = len(farm.fleet["b1"].calls)
    late = outcome_from_doc(run_payload(farm.worker, farm.broker.task("b1").payload),
                            DeployResult.from_doc)
    assert late.status is DeviceStatus.CANCELLED and len(farm.fleet["b1"].calls) == calls


def test_the_per_device_deadline_is_capped_by_the_brokers(farm: Farm, tmp_path: Path) -> None:
    farm.worker_up("a")
    farm.worker_up("b")
    farm.deploy(tmp_path, deadline_s=900.0)
    assert {s.payload["deadline_s"] for s in farm.broker.sent} == {60.0}
    assert farm.settings.visibility_timeout_s > 60.0 + farm.settings.grace_s


def test_cancel_revokes_queued_tasks_and_stops_started_ones_at_a_safe_point(
        farm: Farm, tmp_path: Path) -> None:
    import threading

    farm.worker_up("a")
    farm.worker_up("b")
    farm.broker.held.update({"fleet.host.a", "fleet.host.b"})
    cancel = threading.Event()

    def ctrl_c() -> None:
        farm.beat("a")
        farm.beat("b")
        if not cancel.is_set():
            farm.broker.start("b1")  # b1 is running on its worker; a1, a2 still queued
            cancel.set()
        elif farm.broker.cancelled and farm.broker.task("b1").task_id not in [
                t for t, st in farm.broker.results.items() if st.state == "SUCCESS"]:
            farm.broker.release("b1")  # its worker reads the cancel token: stops

    farm.on_sleep.append(ctrl_c)
    dep_id, res = farm.deploy(tmp_path, cancel=cancel)
    assert [res[n].status for n in ("a1", "a2", "b1")] == [DeviceStatus.CANCELLED] * 3
    queued = {farm.broker.task(n).task_id for n in ("a1", "a2")}
    assert queued <= set(farm.broker.revoked)
    assert farm.broker.task("b1").task_id not in farm.broker.revoked
    assert farm.broker.cancelled == {farm.broker.task("b1").payload["cancel"]}  # one token
    assert all(farm.fleet[n].calls == [] for n in ("a1", "a2", "b1"))
    assert hist.get_deployment(farm.reg, dep_id).status is DeploymentState.INTERRUPTED


def test_a_workers_outcome_keeps_the_error_class(farm: Farm, tmp_path: Path) -> None:
    farm.worker_up("a")
    farm.worker_up("b")
    farm.fleet["a2"].unhealthy.add(("m", 1))
    dep_id, res = farm.deploy(tmp_path)
    assert res["a2"].status is DeviceStatus.FAILED
    assert isinstance(res["a2"].error, errors.HealthCheckError)
    assert farm.step(dep_id, "a2").error_code == errors.HealthCheckError.code


def test_a_task_delivered_again_after_it_ended_does_nothing_twice(
        farm: Farm, tmp_path: Path) -> None:
    farm.worker_up("a")
    farm.worker_up("b")
    farm.broker.held.add("fleet.host.a")
    state: dict[str, Any] = {}

    def once_more() -> None:  # a1 ran; its worker died before the ack: delivered again
        farm.beat("a")
        farm.beat("b")
        if "again" not in state:
            farm.broker.release("a1")
            steps_before = len(hist.step_events(farm.reg, farm.step(
                uuid.UUID(farm.broker.task("a1").payload["args"]["deployment"]), "a1").id))
            calls = len(farm.fleet["a1"].calls)
            state["again"] = run_payload(farm.worker, farm.broker.task("a1").payload)
            state["steps"], state["calls"] = steps_before, calls
            farm.broker.release("a2")

    farm.on_sleep.append(once_more)
    dep_id, res = farm.deploy(tmp_path)
    assert res["a1"].status is DeviceStatus.OK
    again = outcome_from_doc(state["again"], DeployResult.from_doc)
    assert (again.status, again.reason) == (DeviceStatus.OK, "ok (recorded)")
    assert len(farm.fleet["a1"].calls) == state["calls"]  # the device was not asked again
    assert len(hist.step_events(farm.reg, farm.step(dep_id, "a1").id)) == state["steps"]


def test_a_task_of_a_deployment_held_by_another_controller_is_not_run(
        farm: Farm, tmp_path: Path) -> None:
    farm.worker_up("a")
    farm.worker_up("b")
    farm.deploy(tmp_path)  # finished: no longer running under anyone
    payload = {**farm.broker.task("a1").payload, "cancel": "not-cancelled"}
    calls = len(farm.fleet["a1"].calls)
    doc = run_payload(farm.worker, payload)
    out = outcome_from_doc(doc, DeployResult.from_doc)
    assert out.status is DeviceStatus.CANCELLED
    assert "no longer running under the controller that sent" in out.reason
    assert len(farm.fleet["a1"].calls) == calls


def test_audit_through_the_dispatcher(farm: Farm) -> None:
    from fleet.audit.collect import audit_each

    farm.worker_up("a")
    farm.worker_up("b")
    farm.fleet["b1"].install("m", 3)
    res = audit_each(farm.home, farm.devices, dispatcher=farm.dispatcher,
                     clock=farm.clock)
    assert [o.status for o in res] == [DeviceStatus.OK] * 4
    assert (res["b1"].result or {})["models"] == [{"name": "m", "version": 3,
                                                   "findings": []}]
    assert {s.payload["kind"] for s in farm.broker.sent} == {"audit"}


def test_outcome_documents_round_trip() -> None:
    err = errors.DiskFullError("d: full", device="d", free=3, path=Path("/x"))
    out: DeviceOutcome[DeployResult] = DeviceOutcome(
        "d", DeviceStatus.FAILED, error=err, reason="full", attempts=2, duration_s=1.5)
    back = outcome_from_doc(outcome_doc(out, DeployResult.to_doc, worker="w"),
                            DeployResult.from_doc)
    assert isinstance(back.error, errors.DiskFullError)
    assert back.error.details == {"device": "d", "free": 3, "path": "/x"}
    assert (back.status, back.attempts, back.reason) == (DeviceStatus.FAILED, 2, "full")
    ok = DeviceOutcome("d", DeviceStatus.STAGED, result=DeployResult(7, {"a": 1}))
    back = outcome_from_doc(outcome_doc(ok, DeployResult.to_doc, worker="w"),
                            DeployResult.from_doc)
    assert back.result == DeployResult(7, {"a": 1}) and back.status is DeviceStatus.STAGED
    with pytest.raises(ValueError, match=r"fleet\.task/1"):
        outcome_from_doc({"device": "d"}, DeployResult.from_doc)


def test_settings_come_from_the_environment_over_config_toml(home: FleetHome) -> None:
    home.ensure()
    (home.path / "config.toml").write_text(
        '[broker]\nurl = "redis://file:6379/0"\ndeadline_s = 120\n'
        '[artifacts]\nlocation = "/srv/fleet-artifacts"\n')
    cfg = settings_for(home, env={})
    assert (cfg.broker_url, cfg.deadline_s) == ("redis://file:6379/0", 120.0)
    assert cfg.artifacts == Path("/srv/fleet-artifacts")
    env = settings_for(home, env={"FLEET_BROKER": "redis://env:1/0"})
    assert env.broker_url == "redis://env:1/0"
    assert settings_for(FleetHome(home.path / "none"), env={}).broker_url is None
    with pytest.raises(errors.UsageError):
        settings_for(home, env={"FLEET_BROKER_DEADLINE": "soon"})


def test_celery_redelivers_within_a_bound_derived_from_the_deadline() -> None:
    s = FarmSettings(broker_url="redis://x", artifacts=Path("/a"), deadline_s=40.0)
    conf = celery_conf(s)
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1
    opts = conf["broker_transport_options"]
    assert opts["visibility_timeout"] == s.visibility_timeout_s < 3600
    assert s.deadline_s + s.grace_s < s.visibility_timeout_s  # never while it may run
    assert opts["unacked_restore_throttle"] == 1
    assert s.redelivery_bound_s == s.visibility_timeout_s + opts["unacked_restore_interval"]


def test_liveness_counts_only_fresh_heartbeats_of_running_workers(farm: Farm) -> None:
    farm.worker_up("a")
    farm.worker_up("b")
    roster.stopped(farm.reg, "b@m", 100)  # a clean stop: not live, still listed
    farm.clock.advance(10)
    views = {v.host: v for v in roster.workers(farm.reg, stale_s=20, now=farm.now())}
    assert views["a"].live and views["a"].age_s == 10
    assert not views["b"].live and views["b"].stopped_at is not None
    farm.clock.advance(11)
    assert roster.host_liveness(farm.reg, stale_s=20, now=farm.now()) == {}
    assert roster.devices_by_host(farm.reg) == {"a": ["a1", "a2"], "b": ["b1"]}
    assert not roster.beat(farm.reg, "a@m", 999)  # another process took the name


def test_cli_refuses_a_bad_farm_host_name_and_a_worker_without_broker(
        run_fleet: Any, registry: Registry, tmp_path: Path) -> None:
    res = run_fleet("device", "add", f"local://x?root={tmp_path}", "--name", "x",
                    "--via", "no spaces")
    assert res.exit_code == 2 and "invalid farm host name" in res.output
    with pytest.raises(errors.NotFoundError):
        registry.get_device("x")  # nothing written
    res = run_fleet("worker", "--host", "a")
    assert res.exit_code == 2 and "no broker configured" in res.output
    listed = run_fleet("worker", "list", "--json")
    assert listed.exit_code == 0, listed.output
    assert '"broker": false' in listed.output


def test_a_broker_gone_for_longer_than_the_liveness_bound_fails_what_is_pending(
        farm: Farm, tmp_path: Path) -> None:
    farm.worker_up("a")
    farm.worker_up("b")
    farm.broker.held.update({"fleet.host.a", "fleet.host.b"})

    def gone(task_ids: Any) -> Any:
        raise errors.ConnectError("the broker (redis://x) cannot report task states: down")

    farm.broker.states = gone  # type: ignore[method-assign]
    farm.on_sleep.extend([lambda: farm.beat("a"), lambda: farm.beat("b")])
    _, res = farm.deploy(tmp_path)
    assert [res[n].status for n in ("a1", "a2", "b1")] == [DeviceStatus.UNREACHABLE] * 3
    assert "cannot report task states" in res["b1"].reason
    assert farm.settings.stale_s < farm.clock() < farm.settings.stale_s + 1
    assert res["h1"].status is DeviceStatus.OK
