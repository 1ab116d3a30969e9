"""Classes of real models that broke `fleet deploy` (issue 12 faults 1, 2, 3, 5), end to end
on a local device with small ONNX models made by tests/test_inputs.py's builders: int64 ids
into a 10-row embedding, a bool input, a dynamic [N,3,H,W] input, a MaxPool without
``strides`` that crashes MNN natively. Each gives a clean exit code and at most one error
line, never a traceback; ``--json`` output parses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fleet.artifacts import init_signing_key
from fleet.artifacts.convert import convert_model
from fleet.artifacts.mnninfo import validate_mnn
from fleet.artifacts.reference import make_golden
from fleet.core.errors import ConversionError, InvalidModelError
from fleet.core.golden import Golden
from fleet.home import FleetHome
from tests.conftest import local_uri
from tests.test_inputs import (
    bool_model,
    dynamic_conv_model,
    gather_model,
    maxpool_nostrides_model,
)


@pytest.fixture
def fleet1(run_fleet, home: FleetHome, tmp_path: Path):  # type: ignore[no-untyped-def]
    assert run_fleet("init").exit_code == 0
    init_signing_key(home)
    assert run_fleet("group", "create", "g").exit_code == 0
    r = run_fleet("device", "add", local_uri(tmp_path, "d"), "--name", "d", "--group", "g")
    assert r.exit_code == 0, r.output
    return run_fleet


def _deploy(run_fleet, model: Path, *args: str):  # type: ignore[no-untyped-def]
    r = run_fleet("deploy", str(model), "--group", "g", "--json", "--iterations", "2",
                  "--warmup", "1", *args)
    assert "Traceback" not in r.output, r.output
    return r


def _ok(r) -> dict:  # type: ignore[no-untyped-def,type-arg]
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert [row["status"] for row in doc["results"]] == ["ok"], doc
    return doc  # type: ignore[no-any-return]


# -- the runner, without the CLI ------------------------------------------------------------


def test_int64_and_bool_inputs_convert_and_keep_their_dtypes(tmp_path: Path) -> None:
    for make, want in ((gather_model, {"ids": "int64"}),
                       (bool_model, {"x": "float32", "m": "bool"})):
        src = make(tmp_path / f"{make.__name__}.onnx")
        result = convert_model(src, tmp_path / f"{make.__name__}.mnn")
        assert result.check is not None and result.check["worst_ratio"] <= 0.01
        assert result.golden is not None
        golden = Golden.load(result.golden)
        assert {k: str(v.dtype) for k, v in golden.inputs[0].items()} == want
    ids = Golden.load(make_golden(tmp_path / "gather_model.onnx", n=4)).inputs
    assert all(s["ids"].min() >= 0 and s["ids"].max() < 10 for s in ids)


def test_dynamic_input_needs_a_shape(tmp_path: Path) -> None:
    src = dynamic_conv_model(tmp_path / "dyn.onnx")
    with pytest.raises(InvalidModelError, match=r"input x .*--input-shape x="):
        convert_model(src, tmp_path / "dyn.mnn")
    result = convert_model(src, tmp_path / "dyn.mnn", input_shapes={"x": (1, 3, 32, 48)})
    assert result.check is not None and result.check["passed"]
    golden = Golden.load(result.golden or b"")
    assert golden.inputs[0]["x"].shape == (1, 3, 32, 48)
    assert golden.meta["input_specs"]["x"]["model_shape"] == [-1, 3, -1, -1]
    facts = validate_mnn(tmp_path / "dyn.mnn")  # SystemError in pymnn before
    assert facts["inputs"][0]["shape"][2:] == [-1, -1]
    with pytest.raises(InvalidModelError, match="--input-shape"):
        make_golden(tmp_path / "dyn.mnn")
    g = Golden.load(make_golden(tmp_path / "dyn.mnn", input_shapes={"x": (1, 3, 16, 16)}))
    assert g.outputs[0]["y"].shape == (1, 4, 16, 16)


def test_user_samples_are_the_golden_inputs(tmp_path: Path) -> None:
    src = gather_model(tmp_path / "g.onnx")
    samples = [{"ids": np.array([[9, 9, 0, 1, 2, 3]], np.int64)},
               {"ids": np.array([[4, 4, 4, 4, 4, 4]], np.int32)}]
    result = convert_model(src, tmp_path / "g.mnn", inputs=samples)
    golden = Golden.load(result.golden or b"")
    assert golden.samples == 2 and golden.meta["input_origin"] == "--inputs"
    assert golden.inputs[1]["ids"].dtype == np.int64
    assert golden.outputs[0]["y"][0, 0].tolist() == [36.0, 37.0, 38.0, 39.0]
    with pytest.raises(InvalidModelError, match="onnxruntime cannot run"):  # id 10 of 10 rows
        make_golden(src, inputs=[{"ids": np.full((1, 6), 10, np.int64)}])


def test_native_crash_is_contained(tmp_path: Path) -> None:
    src = maxpool_nostrides_model(tmp_path / "mp.onnx")
    with pytest.raises(ConversionError, match=r"converting mp\.onnx: MNN crashed \(SIG"):
        convert_model(src, tmp_path / "mp.mnn")
    from fleet.artifacts.convert import mnnconvert

    mnnconvert(["-f", "ONNX", "--modelFile", str(src), "--MNNModel", str(tmp_path / "mp.mnn"),
                "--bizCode", "t"])
    with pytest.raises(InvalidModelError, match=r"mp\.mnn: MNN crashed \(SIG"):
        make_golden(tmp_path / "mp.mnn")


# -- the CLI, on a local device ---------------------------------------------------------------


def test_cli_int64_gather_and_bool_deploy(fleet1, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _ok(_deploy(fleet1, gather_model(tmp_path / "gather.onnx")))
    _ok(_deploy(fleet1, bool_model(tmp_path / "boolin.onnx")))


def test_cli_dynamic_shape_refused_then_deployed(fleet1, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = dynamic_conv_model(tmp_path / "dyn.onnx")
    r = _deploy(fleet1, src)
    assert r.exit_code == 9, r.output
    assert "input x" in r.output and "--input-shape" in r.output
    _ok(_deploy(fleet1, src, "--input-shape", "x=1,3,32,32"))


def test_cli_native_crash_is_one_line_exit_10(fleet1, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    r = _deploy(fleet1, maxpool_nostrides_model(tmp_path / "mp.onnx"))
    assert r.exit_code == 10, r.output
    assert "MNN crashed (SIG" in r.output
    assert fleet1("status").exit_code == 0


def test_cli_redeploy_of_unchanged_onnx_sends_nothing(fleet1, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = gather_model(tmp_path / "gather.onnx")
    first = _ok(_deploy(fleet1, src))
    assert first["results"][0]["bytes_sent"] > 0
    again = _deploy(fleet1, src)
    assert again.exit_code == 0, again.output
    row = json.loads(again.stdout)["results"][0]
    assert row["status"] == "skipped" and row["bytes_sent"] == 0
