"""`fleet deploy` and `fleet audit` end to end on local devices: real MNN, real reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleet.artifacts import init_signing_key
from fleet.home import FleetHome
from fleet.registry import Registry
from fleet.registry import history as hist
from tests.conftest import REPO, local_uri

TINY = REPO / "models" / "tiny" / "tiny.mnn"
OUTLIER_ONNX = REPO / "models" / "tiny" / "outlier.onnx"
OTHER_MNN = REPO / "models" / "tiny" / "outlier.mnn"

pytestmark = pytest.mark.backends  # SQLite and PostgreSQL (tests/pgfixture.py)


@pytest.fixture
def fleet3(run_fleet, home: FleetHome, tmp_path: Path):  # type: ignore[no-untyped-def]
    assert run_fleet("init").exit_code == 0
    init_signing_key(home)
    assert run_fleet("group", "create", "demo").exit_code == 0
    for i in (1, 2, 3):
        r = run_fleet("device", "add", local_uri(tmp_path, f"d{i}"), "--name", f"d{i}",
                      "--group", "demo")
        assert r.exit_code == 0, r.output
    return run_fleet


def _deploy(run_fleet, *args: str) -> tuple[int, dict]:  # type: ignore[no-untyped-def,type-arg]
    r = run_fleet("deploy", *args, "--json", "--iterations", "3", "--warmup", "1")
    return r.exit_code, json.loads(r.stdout) if r.stdout.strip() else {}


def _status(tmp_path: Path, name: str) -> dict:  # type: ignore[type-arg]
    from fleet_agent.cli import dispatch
    from fleet_agent.context import AgentContext
    return dispatch(AgentContext(tmp_path / "devices" / name), "status", {})


def test_deploy_benchmarks_reports_and_redeploy_sends_nothing(fleet3, home: FleetHome,  # type: ignore[no-untyped-def]
                                                               tmp_path: Path) -> None:
    code, out = _deploy(fleet3, str(TINY), "--group", "demo")
    assert code == 0, out
    rows = {r["device"]: r for r in out["results"]}
    assert set(rows) == {"d1", "d2", "d3"}
    for r in rows.values():
        assert r["status"] == "ok"
        assert r["backend"].startswith("cpu/")
        assert r["effective_backend"] == "cpu"
        assert r["median_ms"] > 0
        assert r["bytes_sent"] > 100_000
    # the device keeps the package encrypted and nothing in the root is the plaintext model
    plain = TINY.read_bytes()
    for f in (tmp_path / "devices" / "d1").rglob("*"):
        if f.is_file():
            assert plain[:4096] not in f.read_bytes()
    # reports stored in the registry, with the health data
    reg = Registry.open(home)
    dev = reg.get_device("d1")
    reps = hist.reports_for(reg, dev, kind="activate")
    assert reps and reps[0].recommended_backend == "cpu" and reps[0].median_ms
    assert reps[0].body["reference"]["kind"] == "golden"
    # again: same payload, same version, nothing sent
    code, again = _deploy(fleet3, str(TINY), "--group", "demo")
    assert code == 0
    assert {r["status"] for r in again["results"]} == {"skipped"}
    assert sum(r["bytes_sent"] for r in again["results"]) == 0
    assert _status(tmp_path, "d2")["installed"]["tiny"]["version"] == 1


def test_audit_shows_configured_effective_recommended(fleet3, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert _deploy(fleet3, str(TINY), "--group", "demo")[0] == 0
    r = fleet3("audit", "--group", "demo", "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["rows"]
    assert {row["device"] for row in rows} == {"d1", "d2", "d3"}
    for row in rows:
        assert row["model"] == "tiny@1" and row["name"] == "tiny" and row["version"] == 1
        assert row["configured"] == "cpu" and row["effective"] == "cpu"
        assert row["recommended"] == "cpu"
        assert all({"code", "severity", "message", "fix"} <= set(f) for f in row["findings"])
    stored = fleet3("audit", "--group", "demo", "--offline", "--json")
    assert json.loads(stored.stdout)["rows"][0]["source"] == "stored"
    reports = json.loads(fleet3("reports", "d1", "--json").stdout)
    assert {x["kind"] for x in reports} >= {"activate", "audit"}


def test_corrupt_model_is_refused_before_anything_moves(fleet3, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert _deploy(fleet3, str(TINY), "--group", "demo")[0] == 0
    bad = tmp_path / "broken.mnn"
    bad.write_bytes(TINY.read_bytes()[:5000])  # truncated: not a loadable model
    r = fleet3("deploy", str(bad), "--group", "demo", "--name", "tiny")
    assert r.exit_code == 9, r.output
    assert "broken.mnn" in r.stderr
    assert _status(tmp_path, "d1")["installed"]["tiny"]["version"] == 1


def test_quantized_variant_that_breaks_is_not_picked_and_previous_stays(  # type: ignore[no-untyped-def]
        fleet3, tmp_path: Path) -> None:
    code, out = _deploy(fleet3, str(OUTLIER_ONNX), "--group", "demo", "--name", "det")
    assert code == 0, out
    code, out = _deploy(fleet3, str(OUTLIER_ONNX), "--group", "demo", "--name", "det",
                        "--variant", "wq4", "--device", "d1")
    # the only target failed its health check: the exit code says so (16, device-side);
    # the table says which and why
    assert code == 16
    rows = {r["device"]: r for r in out["results"]}
    assert rows["d1"]["status"] == "failed"
    assert rows["d1"]["error"]["code"] == "health_check"
    st = _status(tmp_path, "d1")["installed"]["det"]
    assert st["version"] == 1 and st["active"] == 1


def test_one_broken_device_fails_alone(fleet3, home: FleetHome, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    reg = Registry.open(home)
    reg.update_device("d2", agent_cmd=["/nonexistent/fleet-agent"])
    code, out = _deploy(fleet3, str(TINY), "--group", "demo")
    assert code == 20
    rows = {r["device"]: r for r in out["results"]}
    assert rows["d2"]["status"] == "failed"
    assert rows["d1"]["status"] == rows["d3"]["status"] == "ok"
    # every state change of every step is a row
    dep = out["deployment"]
    import uuid
    steps = hist.steps_of(reg, uuid.UUID(dep))
    states = {d.name: [e.state for e in hist.step_events(reg, s.id)] for s, d in steps}
    assert states["d1"][:1] == ["pending"] and states["d1"][-1] == "ok"
    assert "pushing" in states["d1"] and "staged" in states["d1"]
    assert states["d2"][-1] == "failed"


def test_waves_halt_at_a_failed_gate_and_roll_back(fleet3, home: FleetHome,  # type: ignore[no-untyped-def]
                                                    tmp_path: Path) -> None:
    """v1 everywhere; v2 in waves 2,100%: d2 (wave 1) breaks, so the gate halts the rollout,
    d1 (activated in wave 1) is rolled back to v1 and d3 (wave 2) is never touched."""
    assert _deploy(fleet3, str(TINY), "--group", "demo")[0] == 0
    reg = Registry.open(home)
    reg.update_device("d2", agent_cmd=["/nonexistent/fleet-agent"])
    code, out = _deploy(fleet3, str(OTHER_MNN), "--name", "tiny", "--group", "demo",
                        "--waves", "2,100%", "--retries", "0")
    assert code == 20
    assert out["halted_at_wave"] == 1
    rows = {r["device"]: r for r in out["results"]}
    assert rows["d1"]["status"] == "rolled back"
    assert rows["d2"]["status"] == "failed"
    assert rows["d3"]["status"] == "not started"
    assert _status(tmp_path, "d1")["installed"]["tiny"]["active"] == 1  # back on v1
    assert _status(tmp_path, "d3")["installed"]["tiny"]["versions"] == [1]  # never got v2
    # the gate passes when the wave is healthy: all three get v2
    reg.update_device("d2", agent_cmd=None)
    code, out = _deploy(fleet3, str(OTHER_MNN), "--name", "tiny", "--group", "demo",
                        "--waves", "1,100%")
    assert code == 0, out
    assert out["halted_at_wave"] is None
    assert {_status(tmp_path, n)["installed"]["tiny"]["active"] for n in ("d1", "d2", "d3")} \
        == {2}
