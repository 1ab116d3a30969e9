"""Input specs, --input-shape, --inputs and synthesised inputs (fleet.artifacts.inputs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fleet.artifacts import inputs as inp
from fleet.core.errors import InvalidModelError, UsageError

# -- small ONNX models made here (also used by tests/test_real_model_classes.py) ----------


def _save(graph: onnx.GraphProto, path: Path, opset: int = 13) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def gather_model(path: Path, rows: int = 10, cast: bool = False) -> Path:
    """ids: int64 [1, 6] -> (optionally Cast/Reshape) -> Gather of a rows x 4 table."""
    table = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
    nodes, idx = [], "ids"
    if cast:
        nodes += [helper.make_node("Cast", ["ids"], ["ids32"], to=TensorProto.INT32),
                  helper.make_node("Reshape", ["ids32", "shape"], ["ids_r"])]
        idx = "ids_r"
    nodes.append(helper.make_node("Gather", ["emb", idx], ["y"], axis=0))
    inits = [numpy_helper.from_array(table, "emb"),
             numpy_helper.from_array(np.array([1, 6], np.int64), "shape")]
    graph = helper.make_graph(
        nodes, "gather", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 4])], inits)
    return _save(graph, path)


def bool_model(path: Path) -> Path:
    """x: float [1, 8], m: bool [1, 8]; y = x * float(m)."""
    nodes = [helper.make_node("Cast", ["m"], ["mf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["x", "mf"], ["y"])]
    graph = helper.make_graph(
        nodes, "boolin", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
                          helper.make_tensor_value_info("m", TensorProto.BOOL, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])])
    return _save(graph, path)


def dynamic_conv_model(path: Path, dims: tuple[object, ...] = ("N", 3, "H", "W")) -> Path:
    """x: float [N, 3, H, W] (symbolic by default) -> 3x3 conv (pads 1) -> y."""
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "dyn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [dims[0], 4, dims[2], dims[3]])],
        [numpy_helper.from_array(w, "w")])
    return _save(graph, path)


def maxpool_nostrides_model(path: Path) -> Path:
    """MaxPool 3x3 without the optional ``strides``: MNN 3.6.1 dies of SIGFPE on it."""
    graph = helper.make_graph(
        [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3])], "mp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 6, 6])])
    return _save(graph, path)


# -- --input-shape -------------------------------------------------------------------------


def test_parse_input_shapes() -> None:
    assert inp.parse_input_shapes(["x=1,3,320,320", "a:0=2"]) == {
        "x": (1, 3, 320, 320), "a:0": (2,)}
    for bad in ("x", "x=", "x=1,,2", "x=1,a", "=1,2", "x=1,0", "x=-1,3"):
        with pytest.raises(UsageError):
            inp.parse_input_shapes([bad])
    with pytest.raises(UsageError, match="twice"):
        inp.parse_input_shapes(["x=1", "x=2"])


def test_resolve_batch_rule_and_refusals() -> None:
    spec = inp.InputSpec("x", (-1, 3, -1, -1), "float32", ("N", "3", "H", "W"))
    with pytest.raises(InvalidModelError) as info:
        inp.resolve_shapes([spec])
    msg = str(info.value)
    assert "x" in msg and "--input-shape x=" in msg and "[N, 3, H, W]" in msg
    assert "\n" not in msg
    assert inp.resolve_shapes([spec], {"x": (1, 3, 32, 64)}) == {"x": (1, 3, 32, 64)}
    # only a leading batch dim becomes 1
    assert inp.resolve_shapes([inp.InputSpec("x", (-1, 3, 8, 8), "float32")]) == {
        "x": (1, 3, 8, 8)}
    with pytest.raises(InvalidModelError):  # rank 1: a length, not a batch
        inp.resolve_shapes([inp.InputSpec("t", (-1,), "int64")])
    with pytest.raises(UsageError, match="not an input"):
        inp.resolve_shapes([spec], {"y": (1, 3, 8, 8)})
    with pytest.raises(UsageError, match="model's is"):  # fixed dim 3 given as 4
        inp.resolve_shapes([spec], {"x": (1, 4, 8, 8)})
    with pytest.raises(UsageError, match="model's is"):  # wrong rank
        inp.resolve_shapes([spec], {"x": (3, 8, 8)})


# -- specs from the model ------------------------------------------------------------------


def test_onnx_specs_keep_symbolic_dims_dynamic(tmp_path: Path) -> None:
    specs = inp.onnx_input_specs(dynamic_conv_model(tmp_path / "d.onnx"))
    assert [(s.name, s.shape, s.dtype, s.dims) for s in specs] == [
        ("x", (-1, 3, -1, -1), "float32", ("N", "3", "H", "W"))]
    specs = inp.onnx_input_specs(bool_model(tmp_path / "b.onnx"))
    assert {s.name: s.dtype for s in specs} == {"x": "float32", "m": "bool"}


@pytest.mark.parametrize("cast", [False, True])
def test_onnx_gather_bounds(tmp_path: Path, cast: bool) -> None:
    (spec,) = inp.onnx_input_specs(gather_model(tmp_path / "g.onnx", rows=10, cast=cast))
    assert spec.dtype == "int64" and spec.bounds == (0, 10)


def test_mnn_specs_and_gather_bounds_from_the_expr_graph(tmp_path: Path) -> None:
    from fleet.artifacts.convert import mnnconvert

    for name, make in (("g", gather_model), ("d", dynamic_conv_model)):
        src = make(tmp_path / f"{name}.onnx")
        mnnconvert(["-f", "ONNX", "--modelFile", str(src), "--MNNModel",
                    str(tmp_path / f"{name}.mnn"), "--bizCode", "t"])
    (g,) = inp.mnn_input_specs(tmp_path / "g.mnn")
    assert (g.name, g.shape, g.dtype, g.bounds) == ("ids", (1, 6), "int32", (0, 10))
    (d,) = inp.mnn_input_specs(tmp_path / "d.mnn")
    assert d.shape is not None and d.shape[1] == 3 and d.shape[2] == -1 and d.dynamic


def test_not_onnx_is_invalid_model(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    with pytest.raises(InvalidModelError):
        inp.onnx_input_specs(bad)


# -- synthesised inputs --------------------------------------------------------------------


def test_synthesize_respects_dtype_and_bounds() -> None:
    specs = [inp.InputSpec("ids", (1, 6), "int64", bounds=(0, 3)),
             inp.InputSpec("m", (1, 8), "bool"), inp.InputSpec("h", (2,), "float16"),
             inp.InputSpec("px", (1, 4), "uint8"), inp.InputSpec("q", (64,), "int8"),
             inp.InputSpec("len", (1,), "int32")]
    shapes = {s.name: s.shape for s in specs if s.shape}
    sets = inp.synthesize(specs, shapes, n=3, seed=1)
    assert len(sets) == 3
    for feeds in sets:
        assert {k: str(v.dtype) for k, v in feeds.items()} == {
            "ids": "int64", "m": "bool", "h": "float16", "px": "uint8", "q": "int8",
            "len": "int32"}
        assert feeds["ids"].min() >= 0 and feeds["ids"].max() < 3
        assert feeds["len"].max() < 2
    assert inp.synthesize(specs, shapes, 1, 1)[0]["ids"].tolist() == sets[0]["ids"].tolist()


# -- --inputs FILE.npz ---------------------------------------------------------------------


def test_npz_one_sample_and_several(tmp_path: Path) -> None:
    one = tmp_path / "one.npz"
    np.savez(one, ids=np.arange(6).reshape(1, 6))
    assert [set(s) for s in inp.load_inputs_npz(one)] == [{"ids"}]
    many = tmp_path / "many.npz"
    np.savez(many, **{"0/ids": np.zeros((1, 6), np.int64), "1/ids": np.ones((1, 6), np.int64),
                      "0/m": np.zeros((1, 8), bool), "1/m": np.ones((1, 8), bool)})
    samples = inp.load_inputs_npz(many)
    assert len(samples) == 2 and samples[1]["ids"].sum() == 6
    mixed = tmp_path / "mixed.npz"
    np.savez(mixed, **{"0/ids": np.zeros(2), "ids": np.zeros(2)})
    gap = tmp_path / "gap.npz"
    np.savez(gap, **{"0/ids": np.zeros(2), "2/ids": np.zeros(2)})
    for bad in (mixed, gap, tmp_path / "missing.npz", tmp_path):
        with pytest.raises(UsageError):
            inp.load_inputs_npz(bad)
    text = tmp_path / "t.npz"
    text.write_text("not a zip")
    with pytest.raises(UsageError, match="not a readable"):
        inp.load_inputs_npz(text)


def test_npz_size_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = tmp_path / "big.npz"
    np.savez_compressed(big, x=np.zeros(100_000, np.float32))  # small on disk, 400 kB inside
    monkeypatch.setattr(inp, "MAX_INPUTS_BYTES", 100_000)
    with pytest.raises(UsageError, match="uncompressed"):
        inp.load_inputs_npz(big)


def test_conform_samples_checks_names_shapes_and_kinds() -> None:
    specs = [inp.InputSpec("ids", (1, -1), "int64"), inp.InputSpec("m", (1, 8), "bool")]
    ok = inp.conform_samples(specs, [{"ids": np.zeros((1, 5), np.int32),
                                      "m": np.ones((1, 8), bool)}])
    assert ok[0]["ids"].dtype == np.int64 and ok[0]["ids"].shape == (1, 5)
    bad_cases = [
        {"ids": np.zeros((1, 5), np.int64)},                                   # m missing
        {"ids": np.zeros((1, 5), np.float32), "m": np.ones((1, 8), bool)},      # float ids
        {"ids": np.zeros((1, 5), np.int64), "m": np.ones((1, 8), np.float32)},  # float mask
        {"ids": np.zeros((2, 5), np.int64), "m": np.ones((1, 8), bool)},        # fixed dim
    ]
    for sample in bad_cases:
        with pytest.raises(UsageError):
            inp.conform_samples(specs, [sample])
    with pytest.raises(UsageError, match="--input-shape says"):
        inp.conform_samples(specs, [{"ids": np.zeros((1, 5), np.int64),
                                     "m": np.ones((1, 8), bool)}], {"ids": (1, 7)})
