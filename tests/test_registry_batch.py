"""The registry's set-at-a-time writes and reads (no per-device query in a loop) do what
the one-at-a-time ones did, on SQLite and PostgreSQL: a deployment's steps made in bulk,
step moves recorded in batches, a cancel of every unfinished step, each device's latest
report, group membership changes by name lists."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.core import errors
from fleet.registry import Registry
from fleet.registry import history as hist
from fleet.registry.models import DeploymentState, StepState

pytestmark = pytest.mark.backends


@pytest.fixture
def devs(registry: Registry, tmp_path: Path) -> Registry:
    registry.create_group("g")
    for i in range(12):
        registry.add_device(f"d{i:02d}", f"local://d?root={tmp_path}", groups=["g"])
    return registry


def test_a_deployment_gets_a_pending_step_and_event_per_device(devs: Registry) -> None:
    targets = devs.list_devices("g")
    dep, steps = hist.create_deployment(devs, name="m", version=1, target="-g g",
                                        devices=targets, artifact_id=None,
                                        waves={"d00": 1, "d01": 2})
    rows = hist.steps_of(devs, dep.id)
    assert [d.name for _, d in rows] == [d.name for d in targets] == sorted(steps)
    assert {st.id for st, _ in rows} == {st.id for st in steps.values()}
    assert all(st.state is StepState.PENDING for st, _ in rows)
    assert {d.name: st.wave for st, d in rows}["d01"] == 2
    assert [e.state for e in hist.step_events(devs, steps["d05"].id)] == [StepState.PENDING]


def test_recorded_batches_move_steps_as_set_step_does(devs: Registry) -> None:
    dep, steps = hist.create_deployment(devs, name="m", version=1, target="-g g",
                                        devices=devs.list_devices("g"), artifact_id=None)
    ids = [steps[n].id for n in sorted(steps)]
    hist.record_steps(devs, [hist.StepChange(i, StepState.PUSHING, {"k": 1}) for i in ids])
    hist.record_steps(devs, [hist.StepChange(ids[0], StepState.OK, bytes_sent=10),
                             hist.StepChange(ids[1], StepState.FAILED, error_code="connect",
                                             error_message="refused")])
    by_id = {st.id: st for st, _ in hist.steps_of(devs, dep.id)}
    ok, failed, pushing = by_id[ids[0]], by_id[ids[1]], by_id[ids[2]]
    assert (ok.state, ok.bytes_sent, ok.finished_at is not None) == (StepState.OK, 10, True)
    assert ok.started_at is not None and ok.started_at <= ok.finished_at  # type: ignore[operator]
    assert (failed.state, failed.error_code) == (StepState.FAILED, "connect")
    assert pushing.state is StepState.PUSHING and pushing.finished_at is None
    events = hist.step_events(devs, ids[1])
    assert [e.state for e in events] == [StepState.PENDING, StepState.PUSHING,
                                         StepState.FAILED]
    assert events[-1].detail["error_code"] == "connect" and events[1].detail == {"k": 1}


def test_cancel_ends_every_unfinished_step_with_its_event(devs: Registry) -> None:
    from fleet.rollout.lease import abandon
    from fleet.rollout.resume import cancel_deployment

    dep, steps = hist.create_deployment(devs, name="m", version=1, target="-g g",
                                        devices=devs.list_devices("g"), artifact_id=None,
                                        lease=("elsewhere", 1))
    hist.set_step(devs, steps["d00"].id, StepState.OK)
    assert abandon(devs, dep.id, ("elsewhere", 1), "interrupted: test")
    got, _ = cancel_deployment(devs, dep.id)
    assert got.status is DeploymentState.CANCELLED
    states = {d.name: st.state for st, d in hist.steps_of(devs, dep.id)}
    assert states.pop("d00") is StepState.OK
    assert set(states.values()) == {StepState.CANCELLED}
    assert hist.step_events(devs, steps["d07"].id)[-1].detail == {
        "reason": "deployment cancelled"}


def test_latest_reports_are_each_devices_newest_of_the_kinds(devs: Registry) -> None:
    targets = devs.list_devices("g")
    for dev in targets[:3]:
        hist.add_report(devs, dev, "activate", {"name": "m", "version": 1})
        hist.add_report(devs, dev, "audit", {"name": "m", "version": 1, "n": dev.name})
        hist.add_report(devs, dev, "bench", {"name": "m"})
    got = hist.latest_reports(devs, targets[:4], ("activate", "audit"))
    assert got["d03"] is None
    assert all(got[d.name] is not None and got[d.name].kind == "audit"  # type: ignore[union-attr]
               and got[d.name].body["n"] == d.name for d in targets[:3])  # type: ignore[union-attr]


def test_group_membership_changes_take_name_lists(devs: Registry) -> None:
    devs.create_group("h")
    assert devs.add_to_group("h", ["d03", "d01", "d03"]) == ["d03", "d01"]
    assert devs.add_to_group("h", ["d01", "d02"]) == ["d02"]
    assert devs.remove_from_group("h", ["d02", "d04"]) == ["d02"]
    assert [d.name for d in devs.list_devices("h")] == ["d01", "d03"]
    with pytest.raises(errors.NotFoundError, match="nope"):
        devs.add_to_group("h", ["d05", "nope"])
    assert [d.name for d in devs.list_devices("h")] == ["d01", "d03"]  # nothing added
    assert [d.name for d in devs.resolve_targets(["h"], ["d07", "d01"])] == [
        "d01", "d03", "d07"]
    devs.delete_group("h")
    assert devs.groups_of("d01") == ["g"]
    with pytest.raises(errors.DuplicateError):
        devs.create_group("g")
