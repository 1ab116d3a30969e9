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


# --- inputs in the dtype of MNN's own session tensor (issue 12, fault 2) -----------------

_CAST_TYPES = ("bool", "uint8", "int8", "float16", "int32", "int64", "float32")
_CONVERT_ALL = """
import sys
import MNN  # noqa: F401  (MNN's library before _tools, which shares it)
import _tools
for src in sys.argv[1:]:
    _tools.mnnconvert(["mnnconvert", "-f", "ONNX", "--modelFile", src,
                       "--MNNModel", src[:-5] + ".mnn", "--bizCode", "dtype-test"])
"""


@pytest.fixture(scope="module")
def cast_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One model per input dtype: ``x: <dtype> [1, 8] -> Cast(float) -> y``, converted by
    MNN's converter in a child process."""
    import onnx
    from onnx import TensorProto, helper

    out = tmp_path_factory.mktemp("cast")
    onnx_types = {"bool": TensorProto.BOOL, "uint8": TensorProto.UINT8,
                  "int8": TensorProto.INT8, "float16": TensorProto.FLOAT16,
                  "int32": TensorProto.INT32, "int64": TensorProto.INT64,
                  "float32": TensorProto.FLOAT}
    sources = []
    for name in _CAST_TYPES:
        graph = helper.make_graph(
            [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)], f"cast_{name}",
            [helper.make_tensor_value_info("x", onnx_types[name], [1, 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        src = out / f"{name}.onnx"
        onnx.save(model, str(src))
        sources.append(str(src))
    subprocess.run([sys.executable, "-c", _CONVERT_ALL, *sources], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    models = {name: out / f"{name}.mnn" for name in _CAST_TYPES}
    assert all(p.is_file() for p in models.values())
    return models


def _cast_feed(name: str) -> np.ndarray:
    values = np.array([[-3, -2, -1, 0, 1, 2, 3, 4]])
    if name == "bool":
        return (values % 2).astype(np.bool_)
    if name == "uint8":
        return (values + 3).astype(np.uint8)
    return values.astype(name)


@pytest.mark.parametrize("dtype", _CAST_TYPES)
def test_each_input_dtype_is_fed_in_the_session_tensors_dtype(
        cast_models: dict[str, Path], dtype: str) -> None:
    model = LoadedModel.open(str(cast_models[dtype]), RuntimeConfig())
    # MNN's own tensor: int64 and bool inputs are int32, float16 is float32 (FIELD-NOTES).
    expected = {"int64": "int32", "bool": "int32", "float16": "float32", "int8": "unknown"}
    assert model.inputs["x"].dtype == expected.get(dtype, dtype)
    feed = _cast_feed(dtype)
    out, log = model.run_quiet({"x": feed})
    np.testing.assert_array_equal(out["y"], feed.astype(np.float32))
    assert not any("type not match" in line for line in log), log
    prepared = model.prepare({"x": feed})["x"]
    out2, _ = model.run_quiet({"x": prepared})  # prepared once, then copied as is
    np.testing.assert_array_equal(out2["y"], out["y"])


def test_int64_values_that_do_not_fit_the_int32_tensor_are_refused(
        cast_models: dict[str, Path]) -> None:
    model = LoadedModel.open(str(cast_models["int64"]), RuntimeConfig())
    too_big = np.full((1, 8), 2**40, np.int64)
    with pytest.raises(UsageError, match="do not fit"), capture_fds():
        model.run({"x": too_big})
    with pytest.raises(UsageError, match="integer"), capture_fds():
        model.run({"x": np.zeros((1, 8), np.float32)})


def test_dynamic_input_is_resized_before_its_shape_or_dtype_is_read(tmp_path: Path) -> None:
    import MNN

    F = MNN.expr
    x = F.placeholder([1, 1, -1, -1], F.NCHW, F.float)
    x.name = "x"
    y = F.relu(x)
    y.name = "y"
    path = tmp_path / "dyn.mnn"
    with capture_fds():
        F.save([y], str(path))
    model = LoadedModel.open(str(path), RuntimeConfig())  # no shape: must not raise
    assert model.inputs["x"].dynamic and model.inputs["x"].dtype == "unknown"
    feed = np.linspace(-1, 1, 6 * 10, dtype=np.float32).reshape(1, 1, 6, 10)
    out, _ = model.run_quiet({"x": feed})
    np.testing.assert_array_equal(out["y"], np.maximum(feed, 0))
    assert model.inputs["x"].shape == (1, 1, 6, 10) and model.inputs["x"].dtype == "float32"
    sized = LoadedModel.open(str(path), RuntimeConfig(), input_shapes={"x": (1, 1, 4, 4)})
    assert sized.inputs["x"].shape == (1, 1, 4, 4) and not sized.inputs["x"].dynamic
