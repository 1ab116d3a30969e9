"""ONNX -> MNN conversion checked against onnxruntime; variants; refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fleet.artifacts import convert as convert_mod
from fleet.artifacts.convert import convert_model
from fleet.core.errors import ConversionError, ModelError, UsageError

TINY_ONNX = Path(__file__).resolve().parents[1] / "models" / "tiny" / "tiny.onnx"


def test_float_conversion_matches_onnxruntime(tmp_path: Path) -> None:
    result = convert_model(TINY_ONNX, tmp_path / "t.mnn")
    assert result.check is not None and result.check["passed"]
    assert result.check["worst_ratio"] <= 0.01
    assert result.path.stat().st_size > 50_000


def test_variants_shrink_the_file_and_report_their_error(tmp_path: Path) -> None:
    sizes = {}
    for variant in (None, "fp16", "wq8", "wq4"):
        r = convert_model(TINY_ONNX, tmp_path / f"{variant}.mnn", variant=variant)
        sizes[variant] = r.path.stat().st_size
        if variant:
            assert r.variant_error is not None and r.variant_error["worst_ratio"] >= 0
    assert sizes["fp16"] < sizes[None] and sizes["wq8"] < sizes["fp16"]
    assert sizes["wq4"] < sizes["wq8"]


def test_conversion_that_disagrees_with_onnxruntime_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # MNN's converter is right on every model we can build here, so a wrong conversion is
    # simulated: the check compares against outputs that have been perturbed by 5 %.
    real = convert_mod._mnn_outputs

    def skewed(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v * 1.05 for k, v in real(path, feeds).items()}

    monkeypatch.setattr(convert_mod, "_mnn_outputs", skewed)
    with pytest.raises(ConversionError, match="differs from onnxruntime"):
        convert_model(TINY_ONNX, tmp_path / "bad.mnn")


def test_converter_failure_is_a_conversion_error(tmp_path: Path) -> None:
    # An ONNX file that parses but uses an operator domain MNN does not know.
    node = helper.make_node("NoSuchOp", ["x"], ["y"], domain="com.example")
    graph = helper.make_graph([node], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              [numpy_helper.from_array(np.zeros(1, np.float32), "unused")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                    helper.make_opsetid("com.example", 1)])
    src = tmp_path / "weird.onnx"
    onnx.save(model, str(src))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07garbage")
    for bad in (src, garbage):
        with pytest.raises((ConversionError, ModelError)):
            convert_model(bad, tmp_path / "out.mnn")


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        convert_model(TINY_ONNX, tmp_path / "x.mnn", variant="wq3")
    with pytest.raises(ModelError):
        convert_model(tmp_path / "missing.onnx", tmp_path / "x.mnn")
    txt = tmp_path / "model.txt"
    txt.write_text("x")
    with pytest.raises(UsageError):
        convert_model(txt, tmp_path / "x.mnn")
