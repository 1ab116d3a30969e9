"""A model that crashes MNN natively fails its candidates, never the agent (issue 12, 3).

The crashing model is real: an ONNX MaxPool without its optional ``strides`` (ONNX default
1), converted by MNN's converter; MNN 3.6.1 dies with SIGFPE creating a session for it
(FIELD-NOTES "MNN can crash natively"). The test builds it with ``onnx.helper`` and
converts it with ``_tools.mnnconvert`` in a child process; the golden outputs come from
onnxruntime. If a future MNN stops crashing on it, the end-to-end test is skipped and the
containment tests with a self-killing job still run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from fleet_agent import healthbench
from fleet_agent.contained import run_contained
from fleet_agent.healthbench import health_check

from fleet.artifacts import build_package
from fleet.core.golden import Golden
from tests.conftest import REPO
from tests.package_kit import Device, make_device

TINY = REPO / "models" / "tiny"
PROBE: dict[str, Any] = {"schema": "fleet.probe/1",
                         "cpu": {"arch": "x86_64", "usable_cores": 2, "features": {}},
                         "gpu": {}}
CRASH_SIGNALS = {"SIGFPE", "SIGILL", "SIGSEGV", "SIGBUS", "SIGABRT"}
_CONVERT = """
import sys
import MNN  # noqa: F401  (load MNN's library before _tools, which shares it)
import _tools
_tools.mnnconvert(["mnnconvert", "-f", "ONNX", "--modelFile", sys.argv[1],
                   "--MNNModel", sys.argv[2], "--bizCode", "crash-test"])
"""


@pytest.fixture(scope="module")
def crashing(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Golden]:
    """(maxpool_nostrides.mnn, its golden data from onnxruntime)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    out = tmp_path_factory.mktemp("crash")
    node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3])  # no strides
    graph = helper.make_graph(
        [node], "maxpool_nostrides",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 6, 6])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    src, dst = out / "maxpool_nostrides.onnx", out / "maxpool_nostrides.mnn"
    onnx.save(model, str(src))
    subprocess.run([sys.executable, "-c", _CONVERT, str(src), str(dst)], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    assert dst.is_file() and dst.stat().st_size > 0, "MNN's converter made no model"
    x = np.random.default_rng(1).standard_normal((1, 2, 8, 8)).astype(np.float32)
    y = ort.InferenceSession(str(src)).run(None, {"x": x})[0]
    return dst, Golden([{"x": x}], [{"y": y}], {"reference": "onnxruntime CPU fp32"})


def _mnn_crashes_on(path: Path) -> bool:
    code = ("import sys, MNN; i = MNN.Interpreter(sys.argv[1]); "
            "i.createSession({'backend': 0, 'numThread': 1})")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                          timeout=120, check=False)
    return proc.returncode < 0


# --- the containment primitive (targets below run in the child process) -----------------

def _dies(spec: dict[str, Any], arrays: dict[str, np.ndarray]) -> Any:
    print("last words", flush=True)
    os.kill(os.getpid(), signal.SIGSEGV)


def _echo(spec: dict[str, Any], arrays: dict[str, np.ndarray]) -> Any:
    return {"n": spec["n"], "pid": os.getpid()}, {"a": arrays["a"] * 2}


def _refuses(spec: dict[str, Any], arrays: dict[str, np.ndarray]) -> Any:
    from fleet.core.errors import InvalidModelError

    raise InvalidModelError("no such model")


def _hangs(spec: dict[str, Any], arrays: dict[str, np.ndarray]) -> Any:
    signal.pause()


def _reads_fd(spec: dict[str, Any], arrays: dict[str, np.ndarray]) -> Any:
    return {"text": Path(spec["path"]).read_text()}, {}


def _measure_or_crash(spec: dict[str, Any], arrays: dict[str, np.ndarray]) -> Any:
    """The real candidate job, except that the 2-thread candidate dies like MNN does."""
    if spec["config"]["threads"] == 2:
        os.kill(os.getpid(), signal.SIGFPE)
    return healthbench.candidate_target(spec, arrays)


def test_a_job_killed_by_a_signal_is_reported_with_its_name() -> None:
    out = run_contained(f"{__name__}:_dies", {}, timeout_s=60)
    assert not out.ok and out.crashed
    assert out.signal == "SIGSEGV" and out.signum == signal.SIGSEGV
    assert "SIGSEGV" in out.describe()
    assert "last words" in out.log  # the child's stdout is evidence, not our stdout


def test_a_job_returns_data_and_arrays_and_errors_come_back_as_their_class() -> None:
    from fleet.core.errors import InvalidModelError

    ok = run_contained(f"{__name__}:_echo", {"n": 3}, {"a": np.arange(4, dtype=np.int64)},
                       timeout_s=60)
    assert ok.ok and ok.data["n"] == 3 and ok.data["pid"] != os.getpid()
    np.testing.assert_array_equal(ok.arrays["a"], np.arange(4) * 2)
    failed = run_contained(f"{__name__}:_refuses", {}, timeout_s=60)
    assert not failed.ok and not failed.crashed
    with pytest.raises(InvalidModelError, match="no such model"):
        failed.raise_error()


def test_a_hanging_job_is_killed_at_its_deadline() -> None:
    out = run_contained(f"{__name__}:_hangs", {}, timeout_s=3)
    assert out.timed_out and out.crashed and "timed out" in out.describe()


def test_the_memfd_reaches_the_child_under_its_own_number() -> None:
    fd = os.memfd_create("plaintext", os.MFD_CLOEXEC)  # close-on-exec, like the store's
    try:
        os.write(fd, b"decrypted model bytes")
        path = f"/proc/self/fd/{fd}"
        out = run_contained(f"{__name__}:_reads_fd", {"path": path}, fd_paths=[path],
                            timeout_s=60)
        assert out.ok, out.describe()
        assert out.data["text"] == "decrypted model bytes"
    finally:
        os.close(fd)


# --- the health check: one crashing candidate, the others still measured ----------------

def test_one_crashing_candidate_fails_alone_and_the_others_are_measured(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(healthbench, "CANDIDATE_TARGET", f"{__name__}:_measure_or_crash")
    doc = health_check(str(TINY / "tiny.mnn"), probe=PROBE, golden=Golden.load(
        TINY / "tiny.golden.npz"), cache_dir=tmp_path / "cache", warmup=1, iterations=2,
        device_id="dev-1").to_dict()
    by_threads = {c["config"]["threads"]: c for c in doc["candidates"]}
    assert set(by_threads) == {1, 2}
    crashed, fine = by_threads[2], by_threads[1]
    assert crashed["status"] == "failed" and crashed["crash"]["signal"] == "SIGFPE"
    assert "SIGFPE" in crashed["error"] and any("SIGFPE" in r for r in crashed["reasons"])
    assert fine["status"] == "passed" and fine["timing"]["iterations"] == 2
    assert fine["conditions"]["contained"] == "child process"
    assert doc["pick"]["threads"] == 1


def test_crashing_model_fails_every_candidate_with_the_signal(
        tmp_path: Path, crashing: tuple[Path, Golden]) -> None:
    model, golden = crashing
    # mnn==3.6.1 is pinned and crashes here (FIELD-NOTES); if a new MNN stops crashing,
    # this test needs another crashing model rather than a silent skip
    assert _mnn_crashes_on(model), "this MNN no longer crashes on a MaxPool without strides"
    doc = health_check(str(model), probe=PROBE, golden=golden, cache_dir=tmp_path / "c",
                       warmup=1, iterations=2, device_id="dev-1").to_dict()
    assert doc["pick"] is None and doc["candidates"]
    for cand in doc["candidates"]:
        assert cand["status"] == "failed"
        assert cand["crash"]["signal"] in CRASH_SIGNALS
    assert doc["reference"]["cpu_reference"]["signal"] in CRASH_SIGNALS
    assert any("crashed MNN natively" in r for r in doc["pick_reasons"])
    assert not any("model file itself" in r for r in doc["pick_reasons"])


# --- the agent, end to end: one JSON document, HealthCheckError, v1 still active ---------

def _agent(root: Path, verb: str, args: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Run ``fleet-agent`` as the device does; stdout must be exactly one JSON document."""
    proc = subprocess.run([sys.executable, "-m", "fleet_agent", "--root", str(root), verb,
                           "--args", json.dumps(args)], capture_output=True, text=True,
                          timeout=300, check=False, stdin=subprocess.DEVNULL)
    doc = json.loads(proc.stdout)  # raises on a banner, a log line or a second document
    assert isinstance(doc, dict) and proc.stdout.count("\n") == 1, proc.stdout
    return proc.returncode, doc


def _package(tmp: Path, dev: Device, signer: ed25519.Ed25519PrivateKey, version: int,
             model: Path, golden: Golden) -> Path:
    golden_file = tmp / f"golden-v{version}.npz"
    golden.save(golden_file)
    out = tmp / f"m-v{version}.fpkg"
    build_package([("model.mnn", model), ("golden.npz", golden_file)], out, name="m",
                  version=version, kind="model", recipients=[dev.recipient],
                  signing_key=signer, entry="model.mnn", mnn_facts={"inputs": []},
                  golden="golden.npz")
    return out


def test_agent_activate_of_a_crashing_model_keeps_v1_and_answers_once(
        tmp_path: Path, crashing: tuple[Path, Golden]) -> None:
    model, golden = crashing
    # mnn==3.6.1 is pinned and crashes here (FIELD-NOTES); if a new MNN stops crashing,
    # this test needs another crashing model rather than a silent skip
    assert _mnn_crashes_on(model), "this MNN no longer crashes on a MaxPool without strides"
    signer = ed25519.Ed25519PrivateKey.generate()
    dev = make_device(tmp_path / "device", signer)
    root = dev.ctx.root
    v1 = _package(tmp_path, dev, signer, 1, TINY / "tiny.mnn",
                  Golden.load(TINY / "tiny.golden.npz"))
    v2 = _package(tmp_path, dev, signer, 2, model, golden)
    quick = {"warmup": 1, "iterations": 2}
    for pkg in (v1, v2):
        rc, doc = _agent(root, "stage", {"path": str(pkg)})
        assert rc == 0 and doc["ok"], doc
    rc, doc = _agent(root, "activate", {"name": "m", "version": 1, **quick})
    assert rc == 0 and doc["ok"], doc

    rc, doc = _agent(root, "activate", {"name": "m", "version": 2, **quick})
    assert rc == 1 and not doc["ok"]
    assert doc["error"]["code"] == "health_check"
    cands = doc["error"]["details"]["candidates"]
    assert cands and all(status == "failed" for _, status, _ in cands)
    assert all(any(sig in " ".join(reasons) for sig in CRASH_SIGNALS)
               for _, _, reasons in cands)
    report = json.loads((root / "reports" / "m.v2.health.json").read_text())
    assert {c["crash"]["signal"] for c in report["candidates"]} <= CRASH_SIGNALS

    rc, status = _agent(root, "status", {})
    assert rc == 0 and status["installed"]["m"]["version"] == 1
