"""`fleet deploy --group phones`: 3 emulated Android phones (Debian's adb server, adbutils)
and 2 emulated iPhones (tidevice over an emulated usbmuxd), end to end, with faults."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fleet.artifacts import init_signing_key
from fleet.cli.app import app
from fleet.home import FleetHome
from fleet.lab import android, ios
from fleet.registry import Registry
from fleet.registry import history as hist
from tests.android_fixtures import AndroidLab
from tests.conftest import REPO
from tests.ios_fixtures import IosLab

TINY = REPO / "models" / "tiny" / "tiny.mnn"
OTHER = REPO / "models" / "tiny" / "outlier.mnn"


class Phones:
    def __init__(self, home: FleetHome) -> None:
        self.home = home
        self.runner = CliRunner()

    def fleet(self, *args: str, **env: str) -> Any:
        return self.runner.invoke(app, ["--home", str(self.home.path), *args],
                                  env={"FLEET_HOME": str(self.home.path), "NO_COLOR": "1",
                                       "COLUMNS": "200", **env})

    def deploy(self, *args: str, **env: str) -> tuple[int, dict[str, Any]]:
        r = self.fleet("deploy", *args, "--json", "--iterations", "2", "--warmup", "1",
                       "--retries", "2", **env)
        return r.exit_code, json.loads(r.stdout) if r.stdout.strip() else {"err": r.output}

    def installed(self, name: str) -> dict[str, Any]:
        from fleet.connect import open_device
        reg = Registry.open(self.home)
        transport, agent = open_device(self.home, reg.get_device(name))
        with transport:
            doc: dict[str, Any] = agent.call("status")
        return doc["installed"]


@pytest.fixture(scope="module")
def phones(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Phones]:
    home = FleetHome.from_env(tmp_path_factory.mktemp("phones") / "home")
    Registry.init(home).close()
    init_signing_key(home)
    droid, apple = AndroidLab(home), IosLab(home)
    try:
        droid.register(droid.phones(3), group="phones")
        apple.register(apple.phones(2), group="phones")
        yield Phones(home)
    finally:
        android.down(home)
        ios.down(home)


def _rows(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["device"]: r for r in out["results"]}


def test_deploy_to_phones_group_end_to_end(phones: Phones) -> None:
    code, out = phones.deploy(str(TINY), "--group", "phones")
    assert code == 0, out
    rows = _rows(out)
    assert len(rows) == 5
    assert sum(1 for n in rows if n.startswith("android")) == 3
    assert sum(1 for n in rows if n.startswith("iphone")) == 2
    assert {r["status"] for r in rows.values()} == {"ok"}
    assert all(r["median_ms"] > 0 and r["effective_backend"] == "cpu" for r in rows.values())
    reg = Registry.open(phones.home)
    for dev in reg.list_devices("phones"):
        rep = hist.reports_for(reg, dev, kind="activate")[0]
        assert rep.recommended_backend == "cpu" and rep.model_name == "tiny"
    audit = phones.fleet("audit", "--group", "phones", "--json")
    assert audit.exit_code == 0, audit.output
    assert {(r["device"], r["name"], r["effective"])
            for r in json.loads(audit.stdout)["rows"]} == {(n, "tiny", "cpu") for n in rows}


def test_android_phone_offline_mid_push_fails_clearly_and_keeps_its_model(
        phones: Phones) -> None:
    code, _ = phones.deploy(str(TINY), "--group", "phones")
    assert code == 0
    victim = "android-1"
    android.drop_after(phones.home, victim, 16 * 1024)
    try:
        code, out = phones.deploy(str(OTHER), "--name", "tiny", "--group", "phones")
        assert code == 20, out
        rows = _rows(out)
        assert rows[victim]["status"] == "failed"
        assert rows[victim]["error"]["code"] in ("connection_lost", "device_offline")
        assert all(r["status"] == "ok" for n, r in rows.items() if n != victim)
        reg = Registry.open(phones.home)
        steps = {d.name: s for s, d in hist.steps_of(reg, uuid.UUID(out["deployment"]))}
        events = [e.state for e in hist.step_events(reg, steps[victim].id)]
        assert events.count("connecting") == 3  # two retries before giving up
        assert "pushing" in events
    finally:
        android.heal(phones.home, victim)
    assert phones.installed(victim)["tiny"]["version"] == 1  # previous model still active
    code, out = phones.deploy(str(OTHER), "--name", "tiny", "--device", victim)
    assert code == 0, out
    assert phones.installed(victim)["tiny"]["version"] == 2


def test_iphone_app_not_answering_is_pending_not_success(phones: Phones) -> None:
    victim = "iphone-1"
    ios.set_app(phones.home, victim, "mute")
    try:
        r = phones.fleet("audit", "--group", "phones", "--json", FLEET_MAILBOX_TIMEOUT="3")
        assert r.exit_code == 20
        rows = {row["device"]: row for row in json.loads(r.stdout)["rows"]}
        assert rows[victim]["error"].startswith("mailbox_pending")
        assert rows["iphone-0"]["error"] is None
    finally:
        ios.heal(phones.home, victim)


def test_iphone_app_missing_is_a_clear_error(phones: Phones, tmp_path: Path) -> None:
    victim = "iphone-0"
    ios.set_app(phones.home, victim, "missing")
    try:
        r = phones.fleet("audit", "--device", victim, "--json")
        assert r.exit_code == 12  # its one device: app_not_installed, a transport error
        row = json.loads(r.stdout)["rows"][0]
        assert row["error"].startswith("app_not_installed")
        assert "not installed" in row["error"] or "ApplicationLookupFailed" in row["error"]
    finally:
        ios.heal(phones.home, victim)
