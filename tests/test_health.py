"""Health benchmark, pick and runtime config on real MNN runs of the committed tiny models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fleet_agent.candidates import enumerate_candidates
from fleet_agent.healthbench import detect_weight_quant, health_check
from fleet_agent.policy import pick
from fleet_agent.runtime_config import read_runtime_config, write_runtime_config

from fleet.artifacts.convert import convert_model
from fleet.artifacts.reference import make_golden
from fleet.core.compare import compare_outputs
from fleet.core.errors import InvalidModelError
from fleet.core.golden import Golden
from fleet.core.mnn.session import RuntimeConfig

TINY_DIR = Path(__file__).resolve().parents[1] / "models" / "tiny"
X86_PROBE: dict[str, Any] = {
    "schema": "fleet.probe/1",
    "cpu": {"arch": "x86_64", "usable_cores": 2,
            "features": {"avx2": True, "fma": True, "avx512f": True, "avx512_vnni": True},
            "fp16_arith": False},
    "gpu": {"opencl": {"status": "found", "platforms": [{"name": "Portable Computing Language",
            "devices": [{"name": "pocl-cpu", "fp16": True, "driver_version": "6.0"}]}]},
            "vulkan": {"status": "not_found", "devices": []}},
}
ARM_PROBE: dict[str, Any] = {
    "cpu": {"arch": "aarch64", "usable_cores": 8,
            "features": {"asimd": True, "asimdhp": True, "fphp": True}},
    "gpu": {},
}


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("variants")
    paths = {}
    for name, variant in (("outlier-wq4", "wq4"), ("tiny-wq8", "wq8")):
        src = TINY_DIR / f"{name.split('-')[0]}.onnx"
        paths[name] = convert_model(src, out / f"{name}.mnn", variant=variant).path
    return paths


def _run(model: Path, tmp_path: Path, golden: Golden | None, **kw: Any) -> dict[str, Any]:
    report = health_check(str(model), probe=kw.pop("probe", X86_PROBE), golden=golden,
                          cache_dir=tmp_path / "cache", warmup=1, iterations=3,
                          device_id="dev-1", **kw)
    return report.to_dict()


def test_tiny_model_passes_and_every_figure_has_its_conditions(tmp_path: Path) -> None:
    golden = Golden.load(TINY_DIR / "tiny.golden.npz")
    doc = _run(TINY_DIR / "tiny.mnn", tmp_path, golden)
    assert doc["reference"]["kind"] == "golden" and doc["reference"]["variant_checked"]
    assert doc["pick"] is not None and doc["pick"]["backend"] == "cpu"
    for cand in doc["candidates"]:
        cond = cand["conditions"]
        for key in ("threads", "precision", "memory", "power", "warmup", "iterations",
                    "backend_requested", "backend_effective", "timed_region"):
            assert key in cond, key
        t = cand["timing"]
        assert t["iterations"] == 3
        assert t["min_ms"] <= t["median_ms"] <= t["p90_ms"] <= t["max_ms"]
        assert cand["load_ms"] > 0
    # OpenCL is usable per the probe but not in this build: skipped with that reason.
    assert any(s["backend"] == "opencl" and "lacks" in s["reason"] for s in doc["skipped"])
    # A float model gets no memory-low candidate, x86 no precision-low one.
    assert all(c["config"]["memory"] == "normal" for c in doc["candidates"])
    assert all(c["config"]["precision"] == "normal" for c in doc["candidates"])
    assert {c["config"]["threads"] for c in doc["candidates"]} == {1, 2}


def test_configured_opencl_falls_back_and_is_not_reported_as_opencl(tmp_path: Path) -> None:
    doc = _run(TINY_DIR / "tiny.mnn", tmp_path, None, configured={"backend": "opencl"})
    conf = doc["configured"]
    assert conf["backend"] == "opencl" and conf["effective_backend"] == "cpu"
    assert conf["fell_back"] and conf["status"] == "fallback"
    opencl = [c for c in doc["candidates"] if c["requested_backend"] == "opencl"]
    assert opencl and all(c["status"] == "fallback" for c in opencl)
    assert all(c["effective_backend"] == "cpu" for c in opencl)
    assert doc["pick"]["backend"] == "cpu"


def test_quantization_broken_variant_is_refused_while_float_passes(
        tmp_path: Path, variants: dict[str, Path]) -> None:
    golden = Golden.load(TINY_DIR / "outlier.golden.npz")
    broken = _run(variants["outlier-wq4"], tmp_path, golden)
    assert broken["pick"] is None
    assert broken["model"]["weight_quantized"] is True
    assert all(c["status"] == "failed" for c in broken["candidates"])
    assert any("model file itself" in r for r in broken["pick_reasons"])
    good = _run(TINY_DIR / "outlier.mnn", tmp_path, golden)
    assert good["pick"] is not None
    assert all(c["status"] == "passed" for c in good["candidates"])


def test_without_golden_the_report_says_the_variant_was_not_checked(
        tmp_path: Path, variants: dict[str, Path]) -> None:
    doc = _run(variants["outlier-wq4"], tmp_path, None)
    assert doc["reference"]["kind"] == "cpu_fp32_same_file"
    assert doc["reference"]["variant_checked"] is False
    assert doc["pick"] is not None  # the same broken file agrees with itself


def test_weight_quantized_model_gets_memory_low_candidates(
        tmp_path: Path, variants: dict[str, Path]) -> None:
    assert detect_weight_quant(str(variants["tiny-wq8"])) is True
    assert detect_weight_quant(str(TINY_DIR / "tiny.mnn")) is False
    doc = _run(variants["tiny-wq8"], tmp_path, Golden.load(TINY_DIR / "tiny.golden.npz"),
               thread_options=[1])
    assert {c["config"]["memory"] for c in doc["candidates"]} == {"normal", "low"}
    low = next(c for c in doc["candidates"] if c["config"]["memory"] == "low")
    normal = next(c for c in doc["candidates"] if c["config"]["memory"] == "normal")
    assert low["memory"]["session_mb"] < normal["memory"]["session_mb"]


def test_corrupt_model_raises_invalid_model(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mnn"
    bad.write_bytes(b"\0" * 4096)
    with pytest.raises(InvalidModelError):
        _run(bad, tmp_path, None)


def test_candidates_follow_the_hardware() -> None:
    arm, _ = enumerate_candidates(ARM_PROBE, {"cpu": True}, weight_quantized=False)
    assert {c.config.precision for c in arm} == {"normal", "low"}
    assert {c.config.threads for c in arm} == {1, 8}
    x86, skipped = enumerate_candidates(X86_PROBE, {"cpu": True, "opencl": True},
                                        weight_quantized=True)
    assert {c.config.backend for c in x86} == {"cpu", "opencl"}
    assert any(c.config.backend == "opencl" and c.config.precision == "low" for c in x86)
    assert not any(c.config.backend == "cpu" and c.config.precision == "low" for c in x86)
    assert any(s.variant == "precision=low" and s.backend == "cpu" for s in skipped)


def test_compare_fails_zero_nan_inf_and_wrong_outputs() -> None:
    ref = {"y": np.linspace(-1, 1, 50, dtype=np.float32)}
    assert compare_outputs({"y": ref["y"] + 1e-4}, ref).passed
    zero = compare_outputs({"y": np.zeros(50, np.float32)}, ref)
    assert not zero.passed and zero.outputs[0].all_zero
    nan = ref["y"].copy()
    nan[3] = np.nan
    assert not compare_outputs({"y": nan}, ref).passed
    inf = ref["y"].copy()
    inf[0] = np.inf
    assert compare_outputs({"y": inf}, ref).outputs[0].inf
    assert not compare_outputs({"y": ref["y"] * 1.5}, ref).passed
    assert not compare_outputs({}, ref).passed


class _R:
    def __init__(self, cfg: RuntimeConfig, status: str, median: float | None) -> None:
        self.config, self.status, self.median_ms = cfg, status, median


def test_pick_is_the_fastest_passing_never_a_fallback() -> None:
    results = [_R(RuntimeConfig("opencl", threads=4), "fallback", 0.5),
               _R(RuntimeConfig("cpu", threads=4), "passed", 2.0),
               _R(RuntimeConfig("cpu", threads=1), "passed", 2.02),
               _R(RuntimeConfig("vulkan", threads=4), "failed", 0.1)]
    chosen, reasons = pick(results)
    assert chosen is not None
    assert chosen.config.threads == 1  # within noise: fewer threads
    assert any("not eligible" in r for r in reasons)
    none, why = pick([_R(RuntimeConfig("cpu"), "failed", 1.0)])
    assert none is None and why


def test_runtime_config_plain_slot_and_mnn_llm_folder(tmp_path: Path) -> None:
    slot = tmp_path / "slot"
    slot.mkdir()
    path = write_runtime_config(slot, RuntimeConfig("opencl", memory="low", threads=4),
                                reasons=["fastest"])
    raw = json.loads(path.read_text())
    assert raw["mnn_config"] == {"backend": 3, "numThread": 4, "precision": 0, "memory": 2,
                                 "power": 0}
    back = read_runtime_config(slot)
    assert back is not None and back["backend"] == "opencl" and back["memory"] == "low"
    llm = tmp_path / "llm"
    llm.mkdir()
    (llm / "config.json").write_text(json.dumps({"llm_model": "llm.mnn",
                                                 "backend_type": "cpu", "thread_num": 4,
                                                 "precision": "low", "max_new_tokens": 9}))
    write_runtime_config(llm, {"backend": "metal", "precision": "normal", "threads": 2})
    cfg = json.loads((llm / "config.json").read_text())
    assert cfg["backend_type"] == "metal" and cfg["thread_num"] == 2
    assert cfg["precision"] == "normal" and cfg["max_new_tokens"] == 9
    assert read_runtime_config(llm)["format"] == "mnn-llm"  # type: ignore[index]
    assert read_runtime_config(tmp_path / "nothing") is None


def test_golden_roundtrip_and_make_from_mnn(tmp_path: Path) -> None:
    g = Golden.load(make_golden(TINY_DIR / "tiny.mnn", n=1, seed=3))
    assert g.samples == 1 and g.outputs[0]["prob"].shape == (1, 10)
    again = Golden.load(g.to_bytes())
    np.testing.assert_array_equal(again.inputs[0]["input"], g.inputs[0]["input"])
    assert "MNN" in again.meta["reference"]
    with pytest.raises(InvalidModelError):
        Golden.load(b"not an npz")


# --- inputs: dtypes, bounds, golden meta (issue 12, fault 2) -----------------------------

def test_synth_inputs_respect_dtype_and_integer_bounds() -> None:
    from fleet.core.errors import UsageError
    from fleet.core.golden import synth_inputs

    specs = {"ids": ([2, 50], "int64"), "mask": ([2, 50], "bool"), "h": ([3], "float16"),
             "q": ([40], "int8"), "u": ([40], "uint8"), "n": ([4], "int32"),
             "x": ([5], "float32")}
    got = synth_inputs(specs, np.random.default_rng(0), bounds={"ids": (0, 10), "q": (-5, 5)})
    assert {k: str(v.dtype) for k, v in got.items()} == {
        "ids": "int64", "mask": "bool", "h": "float16", "q": "int8", "u": "uint8",
        "n": "int32", "x": "float32"}
    assert got["ids"].shape == (2, 50)
    assert got["ids"].min() >= 0 and got["ids"].max() <= 9  # an embedding of 10 rows
    assert got["q"].min() >= -5 and got["q"].max() <= 4 and got["q"].min() < 0
    assert got["mask"].any() and not got["mask"].all()
    assert got["u"].max() < 16 and got["n"].max() < 16  # default [0, 16)
    again = synth_inputs(specs, np.random.default_rng(0), bounds={"ids": (0, 10),
                                                                  "q": (-5, 5)})
    assert all(np.array_equal(got[k], again[k]) for k in got)  # seeded: same both sides
    bad_cases: list[tuple[tuple[list[int], str], dict[str, tuple[int, int]] | None]] = [
        (([2], "str"), None), (([2], "no-such-type"), None), (([2], "complex64"), None),
        (([2], "int64"), {"s": (3, 3)}), (([2], "uint8"), {"s": (0, 300)}),
        (([-1, 2], "float32"), None)]
    for bad_spec, bad_bounds in bad_cases:
        with pytest.raises(UsageError):
            synth_inputs({"s": bad_spec}, np.random.default_rng(0), bounds=bad_bounds)


def test_golden_meta_carries_input_shapes_and_dtypes_and_old_files_load() -> None:
    import io

    g = Golden([{"ids": np.arange(8, dtype=np.int64).reshape(1, 8)}],
               [{"y": np.ones((1, 8), np.float32)}], {"reference": "test"})
    back = Golden.load(g.to_bytes())
    assert back.meta["inputs"] == [{"name": "ids", "shape": [1, 8], "dtype": "int64"}]
    assert back.inputs[0]["ids"].dtype == np.int64
    # a file from before: meta["inputs"] is a list of names
    old = {"schema": "fleet.golden/1", "inputs": ["ids"], "outputs": ["y"], "samples": 1}
    buf = io.BytesIO()
    np.savez(buf, __meta__=np.frombuffer(json.dumps(old).encode(), np.uint8),
             **{"in.0.0": np.zeros(3, np.int64), "out.0.0": np.zeros(3, np.float32)})
    assert Golden.load(buf.getvalue()).input_shapes() == {"ids": (3,)}
    # meta that lies about the data is refused
    lying = {**old, "inputs": [{"name": "ids", "shape": [3], "dtype": "float32"}]}
    buf = io.BytesIO()
    np.savez(buf, __meta__=np.frombuffer(json.dumps(lying).encode(), np.uint8),
             **{"in.0.0": np.zeros(3, np.int64), "out.0.0": np.zeros(3, np.float32)})
    with pytest.raises(InvalidModelError, match="dtype"):
        Golden.load(buf.getvalue())


def test_int64_golden_inputs_pass_on_the_int32_session_tensor(tmp_path: Path) -> None:
    """The device feeds golden int64 ids as MNN's int32 tensor wants them, not as garbage."""
    import MNN

    from fleet.core.mnn.fdcapture import capture_fds

    F = MNN.expr
    x = F.placeholder([1, 8], F.NCHW, F.int)
    x.name = "ids"
    y = F.cast(x, F.float) * F.const([2.0], [1], F.NCHW, F.float)
    y.name = "y"
    path = tmp_path / "ids.mnn"
    with capture_fds():
        F.save([y], str(path))
    ids = [np.array([[13, 10, 8, 4, 4, 0, 1, 0]], np.int64),
           np.array([[1, 2, 3, 4, 5, 6, 7, 100]], np.int64)]
    golden = Golden([{"ids": i} for i in ids], [{"y": (i * 2).astype(np.float32)} for i in ids],
                    {"reference": "numpy"})
    doc = _run(path, tmp_path, Golden.load(golden.to_bytes()), probe=ARM_PROBE | {
        "cpu": {"arch": "x86_64", "usable_cores": 1, "features": {}}})
    assert doc["pick"] is not None, doc["pick_reasons"]
    assert doc["model"]["inputs"]["ids"]["dtype"] == "int32"
    assert doc["reference"]["inputs"] == {"ids": {"shape": [1, 8], "dtype": "int64"}}
    assert all(c["status"] == "passed" for c in doc["candidates"])
