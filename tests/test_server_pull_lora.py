"""LoRA packs through the desired state: a real ``fleet server`` (uvicorn, TLS), a real
agent running ``fleet-agent pull --once``, the real LLM fixture (``models/llm``) and its
LoRA packs, and a real serve daemon on the device root.

One module-scoped lab, one flow (each step needs the one before): the base goes out in
pull mode; ``fleet lora push`` (no ``--swap``) stages adapter_a; ``--swap`` of adapter_b
while no daemon runs downloads and stages it and waits (step ``staged``); once the daemon
runs the next check-in swaps it in (the signed report: step ``ok``, ``fleet lora list``);
``--swap`` of the staged adapter_a downloads nothing and swaps. A device the pack was not
built for is refused before anything is written.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet_agent.serve_protocol import call

from fleet.core import errors
from tests.test_server_pull import Lab

FIX = Path(__file__).resolve().parents[1] / "models" / "llm"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = Lab(tmp_path_factory.mktemp("pull-lora"))
    lab.fleet("init")
    lab.fleet("keys", "init")
    lab.fleet("server", "init-tls")
    lab.proc = lab.start()
    yield lab
    lab.stop()


def _serve(root: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "fleet_agent", "--root", str(root),
                             "serve", "--args", json.dumps({"model": "llm", "thread_num": 1})],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while True:
        try:
            call(root / "run" / "serve.sock", "ping", timeout=2)
            return proc
        except errors.FleetError:
            assert proc.poll() is None and time.monotonic() < deadline, \
                proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            time.sleep(0.1)


def _show(lab: Lab, dep: Any) -> tuple[dict[str, str], str]:
    """(device -> step state, deployment status): one ``fleet deployment show``."""
    doc = lab.fleet_json("deployment", "show", str(dep))
    return {s["device"]: s["state"] for s in doc["steps"]}, doc["deployment"]["status"]


def _states(doc: dict[str, Any], name: str) -> list[str]:
    return [s["state"] for s in doc["steps"] if s.get("name") == name and "state" in s]


def test_lora_packs_are_staged_and_swapped_through_the_desired_state(lab: Lab) -> None:
    lab.fleet("group", "create", "field")
    lab.enrolled("p1", "field")
    root = lab.root / "p1"
    base = lab.fleet_json("deploy", str(FIX / "base"), "--name", "llm", "-g", "field",
                          "--iterations", "1")
    rc, doc = lab.agent("p1")
    assert rc == 0 and lab.steps(str(base["deployment"])) == {"p1": "ok"}, doc
    packs = {}
    for name in ("adapter_a", "adapter_b"):
        out = lab.fleet_json("lora", "package", str(FIX / "lora" / f"{name}.mnn"), "--base",
                             "llm@1", "--reference", str(FIX / "lora" / f"{name}.ref.json"),
                             "-o", str(lab.root / f"{name}.fpkg"), "-g", "field")
        assert out["recipients"] == ["p1"]
        packs[name] = out["path"]

    # no --swap: the pack is downloaded (Range, verified), staged by `lora add`; done
    a = lab.fleet_json("lora", "push", packs["adapter_a"], "-g", "field")
    assert (a["mode"], a["kind"], a["swap"]) == ("pull", "lora", False)
    assert [r["status"] for r in a["results"]] == ["waiting for check-in"]
    rc, doc = lab.agent("p1")
    assert rc == 0 and doc["models"] == ["adapter_a", "llm"], doc
    assert _states(doc, "adapter_a") == ["downloading", "staged"], doc
    assert any(s.get("downloaded") for s in doc["steps"] if s.get("name") == "adapter_a")
    st = json.loads((root / "state.json").read_text())
    assert st["models"]["adapter_a"]["kind"] == "lora"
    assert list(st["models"]["adapter_a"]["versions"]) == ["1"]
    assert _show(lab, a["deployment"]) == ({"p1": "staged"}, "completed")

    # --swap while no serve daemon runs: downloaded and staged, the swap waits
    b = lab.fleet_json("lora", "push", packs["adapter_b"], "-g", "field", "--swap")
    rc, doc = lab.agent("p1")
    assert rc == 0 and _states(doc, "adapter_b") == ["downloading", "staged"], doc
    assert any("waiting_for_serve" in s for s in doc["steps"]), doc
    assert _show(lab, b["deployment"]) == ({"p1": "staged"}, "running")
    daemon = _serve(root)
    try:
        rc, doc = lab.agent("p1")  # the daemon runs now: swapped, reported, signed
        assert rc == 0 and "downloading" not in _states(doc, "adapter_b"), doc
        assert call(root / "run" / "serve.sock", "status")["adapter"] == "adapter_b@1"
        assert _show(lab, b["deployment"]) == ({"p1": "ok"}, "completed")
        listing = lab.fleet_json("lora", "list", "-g", "field")
        assert listing[0]["bases"]["llm"]["adapter"] == "adapter_b@1"
        assert lab.fleet_json("reports", "p1", "--kind", "lora")  # the swap's report

        # --swap of the pack already staged: nothing downloaded, swapped in
        a2 = lab.fleet_json("lora", "push", packs["adapter_a"], "-g", "field", "--swap")
        rc, doc = lab.agent("p1")
        assert rc == 0 and _states(doc, "adapter_a") == ["staged", "activating"], doc
        ref = json.loads((FIX / "lora" / "adapter_a.ref.json").read_text())
        got = call(root / "run" / "serve.sock", "generate", ids=ref["prompts"][0],
                   max_new_tokens=ref["max_new_tokens"])
        assert got["ids"] == ref["expected"][0]
        assert lab.steps(str(a2["deployment"])) == {"p1": "ok"}
        served = lab.fleet_json("lora", "list", "-g", "field")[0]["bases"]["llm"]
        assert (served["adapter"], served["previous"]) == ("adapter_a@1", "adapter_b@1")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.communicate(timeout=30)

    # a device enrolled after the pack was built: refused, nothing written
    lab.fleet("group", "create", "later")
    lab.enrolled("p2", "later")
    before = lab.fleet_json("deployment", "list")
    res = lab.fleet("lora", "push", packs["adapter_a"], "-g", "later", "--json", check=False)
    assert res.returncode == 15 and "p2" in res.stdout + res.stderr, res
    assert lab.fleet_json("deployment", "list") == before
    assert not (lab.root / "p2" / "incoming").exists() or not any(
        (lab.root / "p2" / "incoming").iterdir())
