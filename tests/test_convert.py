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
    # simulated: the check compares against outputs that have been perturbed by 5 %. The
    # job runs in this process (convert_model runs it in a child, where a monkeypatch
    # would not reach).
    real = convert_mod._mnn_outputs

    def skewed(path: Path, sets: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        return [{k: v * 1.05 for k, v in out.items()} for out in real(path, sets)]

    monkeypatch.setattr(convert_mod, "_mnn_outputs", skewed)
    with pytest.raises(ConversionError, match="differs from onnxruntime"):
        convert_mod._convert_job(TINY_ONNX, tmp_path / "bad.mnn", None, True, "mnn-fleet", 0,
                                 2, None, None)


def test_conversion_is_byte_reproducible(tmp_path: Path) -> None:
    """MNN writes a random UUID into each model; the same source + options + MNN version
    must give the same bytes (case nondeterministic-onnx-redeploy)."""
    import _tools

    for variant in (None, "wq8"):
        a = convert_model(TINY_ONNX, tmp_path / f"a-{variant}.mnn", variant=variant).path
        b = convert_model(TINY_ONNX, tmp_path / f"b-{variant}.mnn", variant=variant).path
        assert a.read_bytes() == b.read_bytes(), variant
    # the raw converter is not reproducible (else this test proves nothing)
    raw = []
    for i in (1, 2):
        raw.append(tmp_path / f"raw{i}.mnn")
        _tools.mnnconvert(["mnnconvert", "-f", "ONNX", "--modelFile", str(TINY_ONNX),
                           "--MNNModel", str(raw[-1]), "--bizCode", "mnn-fleet"])
    assert raw[0].read_bytes() != raw[1].read_bytes()
    # the options are part of the id: fp32 and wq8 carry different (stable) UUIDs
    from fleet.core.mnn.session import mnn

    ids = {str(mnn().get_model_uuid(str(tmp_path / f"a-{v}.mnn"))) for v in (None, "wq8")}
    assert len(ids) == 2 and all(i[14] == "8" for i in ids)


def test_conversion_returns_golden_from_the_same_run(tmp_path: Path) -> None:
    from fleet.core.golden import Golden

    result = convert_model(TINY_ONNX, tmp_path / "t.mnn", samples=3, seed=7)
    assert result.golden is not None
    golden = Golden.load(result.golden)
    assert golden.samples == 3 and golden.meta["seed"] == 7
    assert golden.meta["reference"].startswith("onnxruntime")
    assert result.check is not None and result.check["inputs"] == "synthesised (seed 7)"


def test_check_matches_nan_and_inf_by_position() -> None:
    ref = {"y": np.array([1.0, np.nan, -np.inf, 2.0])}
    same = convert_mod._errors_vs(ref, {"y": np.array([1.0, np.nan, -np.inf, 2.0])})
    assert same["worst_ratio"] == 0.0
    moved = convert_mod._errors_vs(ref, {"y": np.array([np.nan, 1.0, -np.inf, 2.0])})
    flipped = convert_mod._errors_vs(ref, {"y": np.array([1.0, np.nan, np.inf, 2.0])})
    assert moved["worst_ratio"] == float("inf") and flipped["worst_ratio"] == float("inf")


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
