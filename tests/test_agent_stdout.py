"""The agent's stdout holds its one JSON document and nothing else (issue 12).

MNN prints from C++ to fd 1 on this wheel: the ``import MNN`` banner (``The device
supports: ...``), ``Can't Find type=N backend, use 0 instead`` when a backend falls back,
and more (FIELD-NOTES "Facts found since"). Each test runs real ``fleet-agent`` verbs that
import, load and run MNN, and parses stdout as exactly one JSON document.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from fleet_agent import cli
from fleet_agent.runtime_config import write_runtime_config

from fleet.artifacts import build_package
from fleet.core.mnn.session import RuntimeConfig
from tests.conftest import REPO
from tests.package_kit import make_device

TINY = REPO / "models" / "tiny"


def _agent(root: Path, *words: str, args: dict[str, Any] | None = None
           ) -> tuple[int, dict[str, Any], str]:
    """(exit status, the document, stderr); fails unless stdout is one JSON line."""
    proc = subprocess.run([sys.executable, "-m", "fleet_agent", "--root", str(root), *words,
                           "--args", json.dumps(args or {})], capture_output=True, text=True,
                          timeout=300, check=False, stdin=subprocess.DEVNULL)
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, f"stdout is not one line: {proc.stdout[:500]!r}"
    doc = json.loads(lines[0])
    assert isinstance(doc, dict) and doc.get("schema") == "fleet.agent/1"
    return proc.returncode, doc, proc.stderr


@pytest.fixture
def device(tmp_path: Path) -> Path:
    """A device root with tiny.mnn v1 staged (golden data included)."""
    signer = ed25519.Ed25519PrivateKey.generate()
    dev = make_device(tmp_path / "device", signer)
    pkg = tmp_path / "tiny-v1.fpkg"
    build_package([("model.mnn", TINY / "tiny.mnn"), ("golden.npz", TINY / "tiny.golden.npz")],
                  pkg, name="tiny", version=1, kind="model", recipients=[dev.recipient],
                  signing_key=signer, entry="model.mnn", mnn_facts={"inputs": []},
                  golden="golden.npz")
    rc, doc, _ = _agent(dev.ctx.root, "stage", args={"path": str(pkg)})
    assert rc == 0 and doc["ok"], doc
    return dev.ctx.root


def test_status_imports_mnn_and_its_banner_stays_off_stdout(tmp_path: Path) -> None:
    rc, doc, _ = _agent(tmp_path / "root", "status")
    assert rc == 0 and doc["ok"] and doc["mnn_version"]


def test_probe_activate_bench_audit_print_one_document_each(device: Path) -> None:
    quick = {"warmup": 1, "iterations": 2}
    rc, doc, _ = _agent(device, "probe")
    assert rc == 0 and doc["ok"]
    rc, doc, _ = _agent(device, "activate", args={"name": "tiny", "version": 1, **quick})
    assert rc == 0 and doc["ok"] and doc["report"]["pick"], doc
    # A configured OpenCL backend: this MNN has none, falls back and says so on fd 1.
    write_runtime_config(device / "slots" / "tiny" / "v1", RuntimeConfig("opencl"))
    rc, doc, _ = _agent(device, "bench", args=quick)
    assert rc == 0 and doc["ok"], doc
    report = json.loads((device / "reports" / "tiny.v1.health.json").read_text())
    opencl = [c for c in report["candidates"] if c["requested_backend"] == "opencl"]
    assert opencl and all(c["fell_back"] for c in opencl)
    assert any("Can't Find type=3 backend" in line for c in opencl for line in c["log"])
    rc, doc, _ = _agent(device, "audit")
    assert rc == 0 and doc["ok"]
    assert any(f["id"] == "FA002" for m in doc["models"] for f in m["findings"])


def test_a_verb_that_prints_on_fd1_cannot_break_the_document(
        tmp_path: Path, capfd: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    def noisy(ctx: Any, args: dict[str, Any]) -> dict[str, Any]:
        os.write(1, b"The device supports: i8sdot:0, fp16:0\n")  # as C++ printf does
        print("a library's print")
        return {"said": "done"}

    monkeypatch.setattr(sys.modules[__name__], "noisy", noisy, raising=False)
    monkeypatch.setitem(cli.VERBS, "noisy", f"{__name__}:noisy")
    assert cli.main(["--root", str(tmp_path / "r"), "noisy", "--args", "{}"]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out)["said"] == "done" and out.count("\n") == 1
    assert "The device supports" in err and "a library's print" in err
