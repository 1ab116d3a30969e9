"""A device's status follows from its last contact and that contact's error class
(issue 13, fault 8): an offline board is ``unreachable``, a full disk ``degraded``."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fleet.core import errors
from fleet.home import FleetHome
from fleet.registry import Registry
from fleet.registry.status import DeviceState, answered, device_status

SEEN = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("error", "expected"), [
    (None, DeviceState.OK),
    (errors.ConnectError, DeviceState.UNREACHABLE),
    (errors.DeviceOfflineError, DeviceState.UNREACHABLE),
    (errors.TransportTimeout, DeviceState.UNREACHABLE),
    (errors.ConnectionLostError, DeviceState.UNREACHABLE),
    (errors.AuthError, DeviceState.UNREACHABLE),
    (errors.ChangedHostKeyError, DeviceState.UNREACHABLE),
    (errors.MailboxPendingError, DeviceState.UNREACHABLE),
    (errors.DiskFullError, DeviceState.DEGRADED),
    (errors.RemoteDiskFullError, DeviceState.DEGRADED),  # a TransportError, yet not offline
    (errors.BusyError, DeviceState.OK),  # a DeviceError, yet the device is fine
    (errors.HealthCheckError, DeviceState.OK),  # the model failed; the device keeps its old
    (errors.ReplayError, DeviceState.OK),  # it refused a package: it works as it should
    (errors.BadSignatureError, DeviceState.OK),
    (errors.StoreError, DeviceState.FAILED),
    (errors.AgentError, DeviceState.FAILED),
    (errors.AppNotInstalledError, DeviceState.FAILED),
])
def test_status_from_the_last_contacts_error_class(error: type[errors.FleetError] | None,
                                                   expected: DeviceState) -> None:
    for previous in DeviceState:
        assert device_status(error, SEEN, previous=previous) is expected, previous


@pytest.mark.parametrize("error", [errors.RegistryFullError, errors.UsageError,
                                   errors.PlanError, errors.RolloutCancelledError,
                                   errors.KeyMaterialError, errors.FleetError])
def test_an_error_that_is_not_about_the_device_keeps_its_status(
        error: type[errors.FleetError]) -> None:
    for previous in DeviceState:
        assert device_status(error, SEEN, previous=previous) is previous
    assert not answered(error)


def test_a_device_never_heard_keeps_registered_or_enrolled() -> None:
    assert device_status(None, None, previous="enrolled") is DeviceState.ENROLLED
    assert device_status(None, None, previous="registered") is DeviceState.REGISTERED
    assert device_status(errors.ConnectError, None,
                         previous="enrolled") is DeviceState.UNREACHABLE


def test_an_unknown_stored_status_is_decided_afresh() -> None:
    assert device_status(errors.ConnectError, SEEN, previous="bogus") is DeviceState.UNREACHABLE
    assert device_status(None, None, previous="bogus") is DeviceState.REGISTERED


def test_only_contacts_that_heard_the_device_move_last_seen() -> None:
    assert answered(None) and answered(errors.DiskFullError) and answered(errors.ReplayError)
    assert not answered(errors.ConnectError) and not answered(errors.TransportTimeout)


# -- the registry writes it -------------------------------------------------------------
@pytest.mark.backends  # SQLite and PostgreSQL (tests/pgfixture.py)
def test_record_contact_sets_status_error_and_last_seen(registry: Registry,
                                                        tmp_path: Path) -> None:
    registry.add_device("b", f"local://b?root={tmp_path / 'b'}", public_key="pem",
                        fingerprint="fp")
    assert registry.get_device("b").status == "enrolled"
    assert registry.record_contact("b") is DeviceState.OK
    ok = registry.get_device("b")
    assert ok.status == "ok" and ok.last_error is None and ok.last_seen is not None
    off = registry.record_contact("b", errors.ConnectError("no route to host"))
    d = registry.get_device("b")
    assert off is DeviceState.UNREACHABLE and d.status == "unreachable"
    assert d.last_error == "connect" and d.last_seen == ok.last_seen  # not heard: unchanged
    registry.record_contact("b", errors.PlanError("newer version installed"))
    assert registry.get_device("b").status == "unreachable"  # not a contact: kept
    registry.record_contact("b", errors.DiskFullError("100 bytes free"))
    full = registry.get_device("b")
    assert full.status == "degraded" and full.last_error == "disk_full"
    assert full.last_seen is not None and ok.last_seen is not None
    assert full.last_seen >= ok.last_seen  # heard
    registry.record_contact("b")
    assert (registry.get_device("b").status, registry.get_device("b").last_error) == ("ok",
                                                                                      None)


@pytest.mark.backends  # SQLite and PostgreSQL (tests/pgfixture.py)
def test_device_list_and_status_show_it(run_fleet, registry: Registry,  # type: ignore[no-untyped-def]
                                        home: FleetHome, tmp_path: Path) -> None:
    for n in ("a", "b", "c"):
        registry.add_device(n, f"local://{n}?root={tmp_path / n}")
    registry.create_group("g")
    registry.add_to_group("g", ["a", "b"])
    registry.record_contact("a")
    registry.record_contact("b", errors.DeviceOfflineError("gone"))
    registry.record_contact("c", errors.RemoteDiskFullError("ENOSPC"))
    r = run_fleet("device", "list", "--ndjson")
    assert r.exit_code == 0, r.output
    rows = {x["name"]: x for x in map(json.loads, r.stdout.splitlines())}
    assert {n: (x["status"], x["last_error"]) for n, x in rows.items()} == {
        "a": ("ok", None), "b": ("unreachable", "device_offline"),
        "c": ("degraded", "remote_disk_full")}
    assert rows["a"]["groups"] == ["g"] and rows["c"]["groups"] == []
    r = run_fleet("device", "list")
    assert "unreachable (device_offline)" in r.stdout
    r = run_fleet("status", "--json")
    doc = json.loads(r.stdout)
    assert doc["by_status"] == {"ok": 1, "unreachable": 1, "degraded": 1}
    assert doc["groups"] == {"g": 2}
    assert {a["name"]: a["status"] for a in doc["attention"]} == {"b": "unreachable",
                                                                 "c": "degraded"}
    r = run_fleet("status")
    assert "needs attention" in r.stdout and "device_offline" in r.stdout


@pytest.mark.backends  # SQLite and PostgreSQL (tests/pgfixture.py)
def test_device_list_takes_a_fixed_number_of_queries(registry: Registry,
                                                     tmp_path: Path) -> None:
    """`device list` and `status` read the fleet in a fixed number of statements,
    whatever its size (no per-device query loop)."""
    from sqlalchemy import event

    def count(n: int) -> int:
        for i in range(n):
            registry.add_device(f"q{n}-{i}", f"local://q{i}?root={tmp_path / str(i)}",
                                groups=["g"], create_groups=True)
        seen: list[str] = []

        def on_exec(*args: object) -> None:
            seen.append(str(args[2]))

        event.listen(registry.engine, "before_cursor_execute", on_exec)
        try:
            registry.list_devices()
            registry.groups_by_device()
            registry.list_groups()
        finally:
            event.remove(registry.engine, "before_cursor_execute", on_exec)
        return len(seen)

    assert count(3) == count(30)
