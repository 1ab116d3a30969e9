"""``fleet deploy`` of the LLM base, then ``fleet lora package|push|swap|rollback|list`` on a
local device whose serve daemon runs for real; the registry records what it serves."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from fleet_agent.serve_protocol import call

from fleet.artifacts import init_signing_key
from fleet.core import errors
from fleet.home import FleetHome
from fleet.registry import Registry
from fleet.rollout.lora_push import lora_state
from tests.conftest import REPO, local_uri

FIX = REPO / "models" / "llm"


def _ok(r: Any) -> Any:
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def _ref(name: str) -> dict[str, Any]:
    return dict(json.loads((FIX / "lora" / f"{name}.ref.json").read_text()))


@pytest.fixture
def served(run_fleet, home: FleetHome, tmp_path: Path):  # type: ignore[no-untyped-def]
    assert run_fleet("init").exit_code == 0
    init_signing_key(home)
    assert run_fleet("group", "create", "llm").exit_code == 0
    r = run_fleet("device", "add", local_uri(tmp_path, "p1"), "--name", "p1", "--group", "llm")
    assert r.exit_code == 0, r.output
    # the base itself goes out with `fleet deploy`: packaged with its reference outputs,
    # checked on the device (greedy tokens reproduced) before it becomes active
    out = _ok(run_fleet("deploy", str(FIX / "base"), "--name", "llm", "--group", "llm",
                        "--iterations", "1", "--json"))
    row = out["results"][0]
    assert row["status"] == "ok" and row["effective_backend"] == "cpu"
    root = tmp_path / "devices" / "p1"
    reps = Registry.open(home)
    try:
        from fleet.registry import history as hist
        body = hist.reports_for(reps, reps.get_device("p1"), kind="activate")[0].body
    finally:
        reps.close()
    assert body["reference"]["kind"] == "golden"
    assert all(c["comparison"]["prompts"] == 3 for c in body["candidates"]
               if c["status"] == "passed")
    sock = root / "run" / "serve.sock"
    proc = subprocess.Popen([sys.executable, "-m", "fleet_agent", "--root", str(root),
                             "serve", "--args", json.dumps({"model": "llm", "thread_num": 1})],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while True:
        try:
            call(sock, "ping", timeout=2)
            break
        except errors.FleetError:
            assert proc.poll() is None and time.monotonic() < deadline, \
                proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            time.sleep(0.1)
    yield run_fleet, sock
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)


def test_package_push_swap_rollback_and_registry(served, home: FleetHome,  # type: ignore[no-untyped-def]
                                                 tmp_path: Path) -> None:
    run_fleet, sock = served
    packs = {}
    for name in ("adapter_a", "adapter_b"):
        ref = FIX / "lora" / f"{name}.ref.json"
        out = _ok(run_fleet("lora", "package", str(FIX / "lora" / f"{name}.mnn"), "--base",
                            "llm@1", "--reference", str(ref), "-o",
                            str(tmp_path / f"{name}.fpkg"), "--json"))
        assert out["base"]["name"] == "llm" and out["base"]["quant_bits"] == 8
        assert out["recipients"] == ["p1"]
        packs[name] = out
    # the dry run of a real pack: a plan, and nothing written or sent
    db = home.path / "registry.db"
    before = db.read_bytes()
    plan = _ok(run_fleet("lora", "push", packs["adapter_a"]["path"], "--group", "llm",
                         "--dry-run", "--json"))
    assert [(d["device"], d["action"]) for d in plan["devices"]] == [("p1", "send")]
    assert plan["package"]["base"]["name"] == "llm"
    assert db.read_bytes() == before
    assert call(sock, "status")["adapter"] == "base"  # the daemon got nothing
    rows = _ok(run_fleet("lora", "push", packs["adapter_a"]["path"], "--group", "llm",
                         "--swap", "--json"))
    assert rows[0]["status"] == "ok" and rows[0]["adapter"] == "adapter_a@1"
    _ok(run_fleet("lora", "push", packs["adapter_b"]["path"], "--group", "llm", "--json"))
    rows = _ok(run_fleet("lora", "swap", "adapter_b", "--group", "llm", "--json"))
    assert (rows[0]["adapter"], rows[0]["previous"]) == ("adapter_b@1", "adapter_a@1")
    r = _ref("adapter_b")
    assert call(sock, "generate", ids=r["prompts"][0], max_new_tokens=8)["ids"] == \
        r["expected"][0]
    rows = _ok(run_fleet("lora", "rollback", "--group", "llm", "--json"))
    assert rows[0]["adapter"] == "adapter_a@1"
    listing = _ok(run_fleet("lora", "list", "--group", "llm", "--json"))
    assert listing[0]["bases"]["llm"]["adapter"] == "adapter_a@1"
    assert listing[0]["bases"]["llm"]["previous"] == "adapter_b@1"
    reg = Registry.open(home)
    try:
        assert lora_state(reg, reg.get_device("p1"))["llm"]["adapter_name"] == "adapter_a"
    finally:
        reg.close()


def test_pack_without_lora_layers_or_for_unknown_base_is_refused(served, tmp_path: Path  # type: ignore[no-untyped-def]
                                                                 ) -> None:
    run_fleet, _ = served
    r = run_fleet("lora", "package", str(FIX / "base" / "llm.mnn"), "--base", "llm@1",
                  "-o", str(tmp_path / "x.fpkg"))
    assert r.exit_code != 0 and "no LoRA layers" in r.output
    r = run_fleet("lora", "package", str(FIX / "lora" / "adapter_a.mnn"), "--base", "nope@3",
                  "-o", str(tmp_path / "y.fpkg"))
    assert r.exit_code != 0 and "nope@3" in r.output


def test_serve_started_by_fleet_and_outputs_follow_the_adapter(run_fleet, home: FleetHome,  # type: ignore[no-untyped-def]
                                                               tmp_path: Path) -> None:
    """`fleet lora serve` starts the daemon through the agent; `fleet lora check` shows the
    outputs switch from the base's references to the adapter's; audit names the adapter."""
    import os

    assert run_fleet("init").exit_code == 0
    init_signing_key(home)
    assert run_fleet("device", "add", local_uri(tmp_path, "s1"), "--name", "s1").exit_code == 0
    _ok(run_fleet("deploy", str(FIX / "base"), "--name", "llm", "--device", "s1",
                  "--iterations", "1", "--json"))
    rows = _ok(run_fleet("lora", "serve", "llm", "--device", "s1", "--json"))
    assert rows[0]["status"] == "ok" and rows[0]["started"] is True
    try:
        again = _ok(run_fleet("lora", "serve", "llm", "--device", "s1", "--json"))
        assert again[0]["started"] is False  # idempotent: the running daemon is kept
        base = _ok(run_fleet("lora", "check", str(FIX / "base.ref.json"), "--device", "s1",
                             "--json"))
        assert base[0]["matches"] == base[0]["prompts"] == 3
        pack = _ok(run_fleet("lora", "package", str(FIX / "lora" / "adapter_b.mnn"), "--base",
                             "llm@1", "--reference", str(FIX / "lora" / "adapter_b.ref.json"),
                             "-o", str(tmp_path / "b.fpkg"), "--json"))
        _ok(run_fleet("lora", "push", pack["path"], "--device", "s1", "--swap", "--json"))
        now = _ok(run_fleet("lora", "check", str(FIX / "lora" / "adapter_b.ref.json"),
                            "--device", "s1", "--json"))
        assert now[0]["matches"] == 3 and now[0]["adapter"] == "adapter_b@1"
        r = run_fleet("lora", "check", str(FIX / "base.ref.json"), "--device", "s1", "--json")
        assert r.exit_code == 20  # the outputs no longer match the base's references
        assert json.loads(r.stdout)[0]["matches"] < 3
        audit = _ok(run_fleet("audit", "--device", "s1", "--json"))
        assert audit["rows"][0]["adapter"] == "adapter_b@1"
    finally:
        st = call(tmp_path / "devices" / "s1" / "run" / "serve.sock", "status", timeout=5)
        os.kill(int(st["pid"]), signal.SIGTERM)
