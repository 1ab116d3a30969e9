"""The reconcile table (``next_action``), and resume driving it on the fake transport."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from fleet.core import errors
from fleet.home import FleetHome
from fleet.registry import Registry
from fleet.registry import history as hist
from fleet.registry.models import DeploymentState, StepState
from fleet.rollout.deploy import DeployJob
from fleet.rollout.fanout import DeviceStatus
from fleet.rollout.lease import abandon, holder
from fleet.rollout.reconcile import DeviceState, Do, Goal, Observed, next_action, observe
from fleet.rollout.resume import resume_deployment
from tests.fakes import FakeFleet, fake_package

A, S, X, N, C = (Observed.ACTIVE, Observed.STAGED, Observed.ABSENT, Observed.NEWER,
                 Observed.CONFLICT)
P = StepState
#: the whole table for goal "active": step -> {device -> (do, record)}
TABLE: dict[StepState, dict[Observed, tuple[Do, StepState | None]]] = {
    P.PENDING: {A: (Do.SKIP, None), S: (Do.PUSH, None), X: (Do.PUSH, None)},
    P.CONNECTING: {A: (Do.SKIP, None), S: (Do.PUSH, None), X: (Do.PUSH, None)},
    P.PUSHING: {A: (Do.SKIP, None), S: (Do.ACTIVATE, P.STAGED), X: (Do.PUSH, None)},
    P.PUSHED: {A: (Do.SKIP, None), S: (Do.ACTIVATE, P.STAGED), X: (Do.PUSH, None)},
    P.STAGED: {A: (Do.SKIP, None), S: (Do.ACTIVATE, None), X: (Do.PUSH, None)},
    P.ACTIVATING: {A: (Do.RECORD_ACTIVE, P.ACTIVATED), S: (Do.ACTIVATE, None),
                   X: (Do.PUSH, None)},
    P.ACTIVATED: {A: (Do.RECORD_ACTIVE, P.ACTIVATED), S: (Do.ACTIVATE, None),
                  X: (Do.PUSH, None)},
}
TERMINAL = [s for s in StepState if s.terminal]

pytestmark = pytest.mark.backends  # SQLite and PostgreSQL (tests/pgfixture.py)


def test_the_table_covers_every_state() -> None:
    assert set(TABLE) | set(TERMINAL) | {P.ROLLING_BACK} == set(StepState)


@pytest.mark.parametrize("step", list(TABLE))
@pytest.mark.parametrize("seen", list(Observed))
def test_next_action_for_unfinished_steps(step: StepState, seen: Observed) -> None:
    act = next_action(step, DeviceState(seen, 3))
    if seen in (N, C):  # a newer or a different build: refused whatever the step says
        assert act.do is Do.REFUSE and act.record is None
        return
    assert (act.do, act.record) == TABLE[step][seen], act


@pytest.mark.parametrize("step", TERMINAL)
@pytest.mark.parametrize("seen", list(Observed))
def test_finished_steps_are_left_alone(step: StepState, seen: Observed) -> None:
    assert next_action(step, DeviceState(seen)).do is Do.NOTHING


@pytest.mark.parametrize(("step", "seen", "want"), [
    (P.PENDING, S, Do.PUSH), (P.PUSHING, S, Do.RECORD_STAGED), (P.PUSHED, S, Do.RECORD_STAGED),
    (P.STAGED, S, Do.NOTHING), (P.STAGED, A, Do.NOTHING), (P.PUSHING, A, Do.SKIP),
    (P.PUSHING, X, Do.PUSH)])
def test_stage_only_goal(step: StepState, seen: Observed, want: Do) -> None:
    assert next_action(step, DeviceState(seen), goal=Goal.STAGED).do is want


@pytest.mark.parametrize(("row", "want"), [
    (None, X), ({}, X), ({"active": 1, "versions": [1]}, X),
    ({"active": 1, "versions": [1, 2]}, S), ({"active": None, "versions": [2]}, S),
    ({"active": 2, "version": 2, "digest": "d2", "versions": [2]}, A),
    ({"active": 2, "version": 2, "digest": "other", "versions": [2]}, C),
    ({"active": 3, "version": 3, "digest": "d3", "versions": [2, 3]}, N)])
def test_observe_reads_the_agents_status(row: dict | None, want: Observed) -> None:  # type: ignore[type-arg]
    assert observe(row, version=2, digest="d2").observed is want


# -- resume on the fake transport ----------------------------------------------------------
def _job(tmp_path: Path) -> DeployJob:
    path, sha = fake_package(tmp_path, "m", 2)
    return DeployJob(name="m", version=2, kind="model", package=path, package_sha256=sha,
                     digest="digest-m-2", size=path.stat().st_size, bench={})


def _interrupted(reg: Registry, job: DeployJob, names: list[str], step: StepState
                 ) -> tuple[uuid.UUID, dict[str, uuid.UUID]]:
    devs = [reg.add_device(n, f"local://{n}?root=/nonexistent") for n in names]
    who = holder()
    dep, steps = hist.create_deployment(reg, name="m", version=2, target="t", devices=devs,
                                        artifact_id=None, lease=who,
                                        options={"job": job.to_options(), "retries": 0})
    for st in steps.values():
        if step is not P.PENDING:
            hist.set_step(reg, st.id, step)
    assert abandon(reg, dep.id, who, "test")
    return dep.id, {n: st.id for n, st in steps.items()}


# (step the controller recorded, what the agent did meanwhile, verbs resume sends, outcome)
CASES = [
    (P.PENDING, "v1", ["status", "stage", "activate"], DeviceStatus.OK),
    (P.PUSHING, "v1", ["status", "stage", "activate"], DeviceStatus.OK),
    (P.PUSHED, "staged", ["status", "activate"], DeviceStatus.OK),
    (P.STAGED, "staged", ["status", "activate"], DeviceStatus.OK),
    (P.ACTIVATING, "staged", ["status", "activate"], DeviceStatus.OK),
    (P.ACTIVATING, "active", ["status", "audit"], DeviceStatus.OK),
    (P.STAGED, "active", ["status"], DeviceStatus.SKIPPED),
    (P.ACTIVATING, "newer", ["status"], DeviceStatus.FAILED),
]


@pytest.mark.parametrize(("step", "device", "verbs", "status"), CASES)
def test_resume_makes_the_step_match_the_agent(registry: Registry, home: FleetHome,
                                               tmp_path: Path, step: StepState, device: str,
                                               verbs: list[str], status: DeviceStatus) -> None:
    job = _job(tmp_path)
    dep_id, _ = _interrupted(registry, job, ["a"], step)
    fleet = FakeFleet(["a"])
    agent = fleet["a"]
    agent.install("m", 1)
    if device in ("staged", "active"):
        agent.models["m"]["versions"][2] = "digest-m-2"
    if device == "active":
        agent.install("m", 2)
    if device == "newer":
        agent.install("m", 3)
    out = resume_deployment(home, registry, dep_id, opener=fleet.opener)
    assert out.result["a"].status is status
    assert agent.verbs() == verbs
    st = {d.name: s for s, d in hist.steps_of(registry, dep_id)}["a"]
    active = agent.models["m"]["active"]
    if status is DeviceStatus.OK:
        assert st.state is P.OK and active == 2
        assert out.deployment.status is DeploymentState.COMPLETED
        reps = hist.deployment_reports(registry, dep_id)
        assert len(reps) == 1 and reps[0].model_version == 2
        recovered = device == "active"
        assert bool(reps[0].body.get("recovered")) is recovered
        events = hist.step_events(registry, st.id)
        assert any(e.detail.get("recovered") for e in events) is recovered
    elif status is DeviceStatus.SKIPPED:
        assert st.state is P.SKIPPED and active == 2
    else:
        assert st.state is P.FAILED and st.error_code == "plan_refused" and active == 3
        assert out.deployment.status is DeploymentState.FAILED
    assert out.deployment.lease_pid is None  # the lease is dropped at the end


def test_resume_skips_finished_devices_and_refuses_a_finished_deployment(
        registry: Registry, home: FleetHome, tmp_path: Path) -> None:
    from fleet.core import errors
    job = _job(tmp_path)
    dep_id, steps = _interrupted(registry, job, ["a", "b"], P.PENDING)
    hist.set_step(registry, steps["a"], P.OK)
    fleet = FakeFleet(["a", "b"])
    out = resume_deployment(home, registry, dep_id, opener=fleet.opener)
    assert fleet["a"].calls == [] and out.result["a"].reason == "ok (recorded)"
    assert out.result["b"].status is DeviceStatus.OK
    with pytest.raises(errors.UsageError, match="completed"):
        resume_deployment(home, registry, dep_id, opener=fleet.opener)


@pytest.mark.parametrize("meanwhile", ["active", "staged"])
def test_a_version_another_run_installed_meanwhile_is_not_a_failure(
        registry: Registry, home: FleetHome, tmp_path: Path, meanwhile: str) -> None:
    # two deploys of one package to one device at once: the other run stages (and maybe
    # activates) between this run's status and its stage, which the agent then refuses as
    # a replay; the status read again decides (concurrent-deploys case)
    job = _job(tmp_path)
    dep_id, _ = _interrupted(registry, job, ["a"], P.PENDING)
    fleet = FakeFleet(["a"])
    agent = fleet["a"]
    agent.install("m", 1)

    def other_run() -> None:
        agent.models["m"]["versions"][2] = "digest-m-2"
        if meanwhile == "active":
            agent.install("m", 2)

    agent.on_call("stage", other_run)
    agent.refuse("stage", errors.ReplayError("m version 2 was already installed here"),
                 times=1)
    out = resume_deployment(home, registry, dep_id, opener=fleet.opener)
    st = {d.name: s for s, d in hist.steps_of(registry, dep_id)}["a"]
    if meanwhile == "active":
        assert out.result["a"].status is DeviceStatus.SKIPPED and st.state is P.SKIPPED
        assert agent.verbs() == ["status", "stage", "status"]
    else:  # staged by the other run: this one activates it
        assert out.result["a"].status is DeviceStatus.OK and st.state is P.OK
        assert agent.verbs() == ["status", "stage", "status", "activate"]
    assert agent.models["m"]["active"] == 2
    assert out.deployment.status is DeploymentState.COMPLETED
