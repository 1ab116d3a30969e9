"""Model inspection: a real MNN file is described; anything else renamed .mnn is refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fleet.artifacts.mnninfo import validate_mnn
from fleet.core import errors
from tests.package_kit import make_tiny_mnn


def _onnx_model(path: Path) -> Path:
    """Conv 32->64 3x3 and a 1024x128 MatMul: big enough for MNN to quantize."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("W", (64, 32, 3, 3)), ("B", (64,)), ("M", (1024, 128)))]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("MatMul", ["f", "M"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 128])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import _tools  # MNN's converter extension (never MNN.tools: telemetry)

    d = tmp_path_factory.mktemp("variants")
    src = _onnx_model(d / "m.onnx")
    out = {}
    for tag, extra in (("fp32", []), ("fp16", ["--fp16"]), ("wq8", ["--weightQuantBits", "8"]),
                       ("wq4", ["--weightQuantBits", "4"]),
                       ("wq4b", ["--weightQuantBits", "4", "--weightQuantBlock", "128"])):
        out[tag] = d / f"{tag}.mnn"
        _tools.mnnconvert(["mnnconvert", "-f", "ONNX", "--modelFile", str(src), "--MNNModel",
                           str(out[tag]), "--bizCode", "fleet-test", *extra])
    return out


def test_tiny_model_facts(tmp_path: Path) -> None:
    facts = validate_mnn(make_tiny_mnn(tmp_path / "tiny.mnn"))
    assert facts["inputs"] == [{"name": "input", "shape": [1, 3, 4, 4], "dtype": "float",
                                "format": "NCHW"}]
    assert facts["outputs"][0]["name"] == "output"
    assert facts["outputs"][0]["shape"] == [8, 16]
    assert facts["mnn_version"].startswith("3.")
    assert facts["quant_bits"] is None and facts["fp16"] is False


@pytest.mark.parametrize(("tag", "bits", "block", "fp16"), [
    ("fp32", None, None, False), ("fp16", None, None, True), ("wq8", 8, None, False),
    ("wq4", 4, None, False), ("wq4b", 4, 128, False)])
def test_weight_storage_of_converted_variants(variants: dict[str, Path], tag: str,
                                              bits: int | None, block: int | None,
                                              fp16: bool) -> None:
    facts = validate_mnn(variants[tag])
    assert (facts["quant_bits"], facts["quant_block"], facts["fp16"]) == (bits, block, fp16)
    assert facts["biz_code"] == "fleet-test"
    assert facts["inputs"][0]["shape"] == [1, 32, 4, 4]


@pytest.mark.parametrize("content", [b"", b"hello, I am a text file\n",
                                     bytes(range(256)) * 40, b"PK\x03\x04" + b"\x00" * 600])
def test_non_mnn_file_renamed_mnn_is_refused(tmp_path: Path, content: bytes) -> None:
    fake = tmp_path / "model.mnn"
    fake.write_bytes(content)
    with pytest.raises(errors.InvalidModelError):
        validate_mnn(fake)


def test_mnn_banner_stays_off_stdout(tmp_path: Path) -> None:
    """MNN prints a banner on C stdout at import; JSON output must not carry it."""
    model = make_tiny_mnn(tmp_path / "tiny.mnn")
    code = ("import json,sys; from fleet.artifacts.mnninfo import validate_mnn; "
            "print(json.dumps(validate_mnn(sys.argv[1])['inputs']))")
    proc = subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True,
                          text=True, timeout=120, check=True)
    assert proc.stdout.startswith("[{") and "device supports" not in proc.stdout
