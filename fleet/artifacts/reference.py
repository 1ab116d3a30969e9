"""The reference runner: the ORIGINAL model on seeded inputs, giving the golden data.

ONNX through onnxruntime; TFLite through its float MNN conversion (no TFLite runtime
here); an ``.mnn`` through pymnn on the CPU in fp32. The golden format itself lives in
:mod:`fleet.core.golden` because the device reads it.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fleet.core.errors import InvalidModelError, ModelError, UsageError
from fleet.core.golden import Golden, synth_inputs

__all__ = ["make_golden"]


def _sniff(path: Path) -> str:
    head = path.read_bytes()[:16]
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".tflite" or head[4:8] == b"TFL3":
        return "tflite"
    return "mnn"


def _onnx_specs(sess: Any, input_spec: Mapping[str, Any] | None
                ) -> dict[str, tuple[list[int], str]]:
    types = {"tensor(float)": "float32", "tensor(double)": "float64",
             "tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(uint8)": "uint8",
             "tensor(float16)": "float16"}
    specs: dict[str, tuple[list[int], str]] = {}
    for inp in sess.get_inputs():
        given = (input_spec or {}).get(inp.name)
        shape = list(given["shape"]) if given else [
            d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
        specs[inp.name] = (shape, types.get(inp.type, "float32"))
    return specs


def _golden_onnx(path: Path, n: int, rng: np.random.Generator,
                 input_spec: Mapping[str, Any] | None) -> Golden:
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own hierarchy
        raise InvalidModelError(f"onnxruntime cannot load {path}: {exc}") from exc
    specs = _onnx_specs(sess, input_spec)
    names = [o.name for o in sess.get_outputs()]
    inputs, outputs = [], []
    for _ in range(n):
        feeds = synth_inputs(specs, rng)
        inputs.append(feeds)
        outputs.append(dict(zip(names, sess.run(names, feeds), strict=True)))
    return Golden(inputs, outputs, {"reference": f"onnxruntime {ort.__version__} CPU fp32"})


def _golden_mnn(path: Path, n: int, rng: np.random.Generator,
                input_spec: Mapping[str, Any] | None) -> Golden:
    from fleet.core.mnn.session import LoadedModel, RuntimeConfig, mnn_version

    shapes = {k: tuple(v["shape"]) for k, v in (input_spec or {}).items()} or None
    model = LoadedModel.open(str(path), RuntimeConfig("cpu", precision="high", threads=1),
                             input_shapes=shapes)
    specs = {k: (list(s.shape), s.dtype) for k, s in model.inputs.items()}
    inputs, outputs = [], []
    for _ in range(n):
        feeds = synth_inputs(specs, rng)
        out, _log = model.run_quiet(feeds)
        inputs.append(feeds)
        outputs.append(out)
    model.close()
    return Golden(inputs, outputs, {"reference": f"MNN {mnn_version()} CPU fp32"})


def make_golden(model: str | Path, n: int = 2, seed: int = 0, *,
                input_spec: Mapping[str, Any] | None = None) -> bytes:
    """Run the original model on ``n`` seeded inputs; return the golden ``.npz`` bytes.

    ``model``: an ONNX file (onnxruntime), a TFLite file (its float MNN conversion) or an
    ``.mnn`` (pymnn, CPU fp32). Give the ORIGINAL model, before any quantized variant.
    ``input_spec``: ``{name: {"shape": [...]}}`` for inputs whose shapes are dynamic.
    """
    path = Path(model)
    if not path.is_file():
        raise ModelError(f"no model file at {path}", path=str(path))
    if n < 1:
        raise UsageError("golden needs at least one sample")
    kind = _sniff(path)
    rng = np.random.default_rng(seed)
    if kind == "onnx":
        golden = _golden_onnx(path, n, rng, input_spec)
    elif kind == "tflite":
        from fleet.artifacts.convert import convert_model

        with tempfile.TemporaryDirectory(prefix="fleet-golden-") as tmp:
            mnn_path = Path(tmp) / "float.mnn"
            convert_model(path, mnn_path, check=False)
            golden = _golden_mnn(mnn_path, n, rng, input_spec)
        golden.meta["reference"] += " (float MNN conversion of the TFLite model: no TFLite "\
                                    "runtime here, the conversion itself is not checked)"
    else:
        golden = _golden_mnn(path, n, rng, input_spec)
    golden.meta.update({"source": {"kind": kind, "name": path.name,
                                   "sha256": hashlib.sha256(path.read_bytes()).hexdigest()},
                        "seed": seed})
    return golden.to_bytes()
