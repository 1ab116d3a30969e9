"""Golden data: inputs and the ORIGINAL model's outputs, travelling in the package.

Why (ARCHITECTURE "The agent's brain", step 3): a device can compare a candidate with the
CPU fp32 run of the same file, but that cannot catch a file that is itself wrong (a
weight-quantized variant that broke the model). So the controller runs the model *before*
conversion, quantization or fp16 storage (ONNX through onnxruntime; an ``.mnn`` through
pymnn on the CPU in fp32) on a few seeded inputs, and the expected outputs go into the
package. TFLite has no reference runtime here: its golden comes from the float MNN
conversion, and ``meta["reference"]`` says so.

Format: an ``.npz`` (no pickles) with ``in.<sample>.<k>`` and ``out.<sample>.<k>`` arrays
and ``__meta__``, UTF-8 JSON bytes: schema, input/output names (k indexes them), the
source kind and sha256, the seed and the runtime that produced the outputs.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fleet.errors import InvalidModelError, ModelError, UsageError

__all__ = ["GOLDEN_SCHEMA", "Golden", "make_golden", "synth_inputs"]

GOLDEN_SCHEMA = "fleet.golden/1"
_MAX_GOLDEN_BYTES = 64 << 20


def synth_inputs(specs: Mapping[str, tuple[Sequence[int], str]], rng: np.random.Generator
                 ) -> dict[str, np.ndarray]:
    """Seeded inputs for shapes and dtypes: floats uniform in [-1, 1), integers in [0, 16).

    Used by the controller (golden) and the device (reference without golden), so both
    sides make inputs the same way.
    """
    out: dict[str, np.ndarray] = {}
    for name in sorted(specs):
        shape, dtype = specs[name]
        shape = tuple(int(d) for d in shape)
        if any(d <= 0 for d in shape):
            raise UsageError(f"input {name!r} has a dynamic shape {list(shape)}: "
                             "give an input spec", input=name)
        dt = np.dtype(dtype)
        if np.issubdtype(dt, np.floating):
            out[name] = rng.uniform(-1.0, 1.0, size=shape).astype(dt)
        elif np.issubdtype(dt, np.integer):
            out[name] = rng.integers(0, 16, size=shape).astype(dt)
        else:
            raise UsageError(f"input {name!r}: cannot synthesise dtype {dt}", input=name)
    return out


@dataclass
class Golden:
    """``inputs[i]`` fed to the original model gave ``outputs[i]``."""

    inputs: list[dict[str, np.ndarray]]
    outputs: list[dict[str, np.ndarray]]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.outputs) or not self.inputs:
            raise InvalidModelError("golden data needs as many output sets as input sets "
                                    "and at least one")

    @property
    def samples(self) -> int:
        return len(self.inputs)

    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.inputs[0].items()}

    def to_bytes(self) -> bytes:
        in_names = sorted(self.inputs[0])
        out_names = sorted(self.outputs[0])
        meta = {**self.meta, "schema": GOLDEN_SCHEMA, "inputs": in_names,
                "outputs": out_names, "samples": self.samples}
        arrays: dict[str, np.ndarray] = {
            "__meta__": np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8)}
        for i in range(self.samples):
            for k, name in enumerate(in_names):
                arrays[f"in.{i}.{k}"] = np.asarray(self.inputs[i][name])
            for k, name in enumerate(out_names):
                arrays[f"out.{i}.{k}"] = np.asarray(self.outputs[i][name])
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
        return buf.getvalue()

    def save(self, path: Path) -> Path:
        Path(path).write_bytes(self.to_bytes())
        return Path(path)

    @classmethod
    def load(cls, source: str | Path | bytes) -> Golden:
        """From an ``.npz`` path (``/proc/self/fd/N`` too) or its bytes."""
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        if len(data) > _MAX_GOLDEN_BYTES:
            raise InvalidModelError("golden data too large", size=len(data))
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                meta = json.loads(bytes(npz["__meta__"]).decode())
                if meta.get("schema") != GOLDEN_SCHEMA:
                    raise InvalidModelError(f"unknown golden schema {meta.get('schema')!r}")
                in_names, out_names = meta["inputs"], meta["outputs"]
                inputs, outputs = [], []
                for i in range(int(meta["samples"])):
                    inputs.append({n: npz[f"in.{i}.{k}"] for k, n in enumerate(in_names)})
                    outputs.append({n: npz[f"out.{i}.{k}"] for k, n in enumerate(out_names)})
        except InvalidModelError:
            raise
        except (ValueError, KeyError, OSError, UnicodeDecodeError) as exc:
            raise InvalidModelError(f"golden data unreadable: {exc}") from exc
        return cls(inputs=inputs, outputs=outputs, meta=meta)


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
    from fleet_agent.engine import LoadedModel, RuntimeConfig, mnn_version

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
