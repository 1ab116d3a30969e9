"""MNN session adapter on the real pymnn wheel: quiet import, integer configs, fallbacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fleet_agent.backends import build_backend_details, build_cpu_kernels, detect_build_backends

from fleet.core.errors import InvalidModelError, UsageError
from fleet.core.mnn.fdcapture import capture_fds
from fleet.core.mnn.session import LoadedModel, RuntimeConfig, parse_fallbacks

TINY = Path(__file__).resolve().parents[1] / "models" / "tiny" / "tiny.mnn"


def test_capture_fds_sees_c_level_writes_on_both_descriptors() -> None:
    with capture_fds() as cap:
        os.write(1, b"one\n")
        os.write(2, b"two\n")
    assert cap.text[1] == "one\n"
    assert cap.text[2] == "two\n"
    assert cap.lines() == ["one", "two"]


def test_import_mnn_keeps_agent_stdout_clean() -> None:
    # pymnn prints a CPU feature line to fd 1 at import; the agent's stdout is its JSON.
    code = ("from fleet.core.mnn.session import mnn_version; import json; "
            "print(json.dumps({'v': mnn_version()}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().startswith("{") and out.count("\n") == 1


def test_runtime_config_gives_pymnn_integers_never_strings() -> None:
    cfg = RuntimeConfig(backend="OPENCL", precision="low", memory="low", power="high",
                        threads=4)
    assert cfg.schedule() == {"backend": 3, "numThread": 4, "precision": 2, "memory": 2,
                              "power": 1}
    assert RuntimeConfig.from_dict({"backend_type": "metal", "thread_num": 2,
                                    "memory": 2}).memory == "low"
    with pytest.raises(UsageError):
        RuntimeConfig(memory="tiny")
    with pytest.raises(UsageError):
        RuntimeConfig(backend="tpu")


def test_requesting_opencl_on_this_wheel_is_seen_as_a_fallback() -> None:
    model = LoadedModel.open(str(TINY), RuntimeConfig(backend="opencl", threads=4))
    assert model.fell_back
    assert model.effective_backend == "cpu"
    assert [f.requested for f in model.fallbacks][:1] == [3]
    assert any("Can't Find type=3 backend" in line for line in model.log)
    cpu = LoadedModel.open(str(TINY), RuntimeConfig(backend="cpu"))
    assert not cpu.fell_back and cpu.fallbacks == []


def test_parse_fallbacks_decodes_the_log_line() -> None:
    (fb,) = parse_fallbacks("x\nCan't Find type=7 backend, use 0 instead\n")
    assert fb.to_dict()["requested"] == "vulkan" and fb.to_dict()["used"] == "cpu"


def test_load_from_memfd_and_run() -> None:
    fd = os.memfd_create("model")
    try:
        os.write(fd, TINY.read_bytes())
        model = LoadedModel.open(f"/proc/self/fd/{fd}", RuntimeConfig(threads=2))
        assert model.inputs["input"].shape == (1, 3, 64, 64)
        out, _ = model.run_quiet({"input": np.zeros((1, 3, 64, 64), np.float32)})
        assert out["prob"].shape == (1, 10)
        assert abs(float(out["prob"].sum()) - 1.0) < 1e-4
    finally:
        os.close(fd)


def test_corrupt_model_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mnn"
    bad.write_bytes(TINY.read_bytes()[:4000])
    with pytest.raises(InvalidModelError, match="cannot load"):
        LoadedModel.open(str(bad), RuntimeConfig())


def test_build_backends_found_by_trying_and_cached_per_version(tmp_path: Path) -> None:
    found = detect_build_backends(tmp_path)
    assert found["cpu"] is True
    # The PyPI x86-64 wheel has only the CPU backend: every GPU request falls back.
    assert found["opencl"] is False and found["vulkan"] is False and found["cuda"] is False
    doc = build_backend_details(tmp_path)
    cached = list(tmp_path.glob("mnn-build-backends-*.json"))
    assert len(cached) == 1 and doc["mnn_version"] in cached[0].name
    assert doc["detail"]["opencl"]["effective"] == "cpu"
    # A second call reads the cache: make the cache say something only it could say.
    cached[0].write_text(cached[0].read_text().replace('"metal": false', '"metal": true'))
    assert detect_build_backends(tmp_path)["metal"] is True
    assert detect_build_backends(tmp_path, refresh=True)["metal"] is False


def test_x86_wheel_kernels_stop_at_avx2() -> None:
    kernels = build_cpu_kernels()
    assert kernels["avx2"] is True
    assert kernels["avx512"] is False
