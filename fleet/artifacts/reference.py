"""The reference runner: the ORIGINAL model's outputs for a list of input sets.

One runner for the conversion check (:mod:`fleet.artifacts.convert`) and the golden data
(:func:`make_golden`), so each model runs once per input set and both use the same inputs:
- ONNX through onnxruntime on the CPU (any onnxruntime error is one line,
  InvalidModelError, exit 9);
- TFLite through its float MNN conversion (no TFLite runtime here: ``meta["reference"]``
  says the conversion itself is then unchecked);
- ``.mnn`` through pymnn on the CPU in fp32 (precision high, one thread), each input fed in
  the dtype of MNN's own session tensor (MNN keeps an int64 input as int32 and reads
  garbage from an int64 host tensor; FIELD-NOTES "Integer inputs").
Which inputs: :mod:`fleet.artifacts.inputs` (user samples, or seeded ones at the resolved
shapes, in each input's dtype and range). The golden format lives in
:mod:`fleet.core.golden` because the device reads it; ``meta["input_specs"]`` carries each
input's shape and (source) dtype so the device can feed MNN in its own tensor's dtype.

Everything that touches MNN or onnxruntime here runs inside
:func:`fleet.artifacts.isolate.run_isolated` (a crash is an error line, not the end of
the CLI).
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fleet.artifacts import inputs as inp
from fleet.artifacts.converter import convert_file
from fleet.artifacts.isolate import run_isolated
from fleet.core.errors import InvalidModelError, ModelError, UsageError
from fleet.core.golden import Golden

__all__ = ["ReferenceRun", "choose_inputs", "make_golden", "resolve_input_shapes", "run_mnn",
           "run_onnx", "sniff"]


def sniff(path: Path) -> str:
    """``onnx``, ``tflite`` or ``mnn``, by suffix, then by the TFLite magic."""
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    with path.open("rb") as f:
        head = f.read(8)
    if suffix == ".tflite" or head[4:8] == b"TFL3":
        return "tflite"
    return "mnn"


@dataclass
class ReferenceRun:
    """``inputs[i]`` fed to the original model gave ``outputs[i]``; how they were chosen."""

    specs: list[inp.InputSpec]
    inputs: list[dict[str, np.ndarray]]
    outputs: list[dict[str, np.ndarray]]
    reference: str
    origin: str  # "synthesised (seed N)" or "--inputs"
    meta: dict[str, Any] = field(default_factory=dict)

    def golden(self) -> Golden:
        shapes = {k: list(v.shape) for k, v in self.inputs[0].items()}
        specs = {s.name: {"shape": shapes[s.name], "model_shape": None if s.shape is None
                          else list(s.shape), "dtype": s.dtype,
                          "bounds": None if s.bounds is None else list(s.bounds)}
                 for s in self.specs}
        return Golden([dict(i) for i in self.inputs], [dict(o) for o in self.outputs],
                      {**self.meta, "reference": self.reference, "input_origin": self.origin,
                       "input_specs": specs})


def choose_inputs(specs: Sequence[inp.InputSpec], *, n: int, seed: int,
                  input_shapes: Mapping[str, Sequence[int]] | None = None,
                  samples: Sequence[Mapping[str, np.ndarray]] | None = None
                  ) -> tuple[list[dict[str, np.ndarray]], str]:
    """User samples (checked and cast), else ``n`` seeded sets at the resolved shapes."""
    if samples:
        return inp.conform_samples(specs, samples, input_shapes), "--inputs"
    shapes = inp.resolve_shapes(specs, input_shapes)
    return inp.synthesize(specs, shapes, n, seed), f"synthesised (seed {seed})"


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def run_onnx(path: Path, input_sets: Sequence[Mapping[str, np.ndarray]]
             ) -> tuple[list[dict[str, np.ndarray]], str]:
    """onnxruntime (CPU) on each input set: (outputs per set, runtime description).
    InvalidModelError with onnxruntime's first line when it cannot load or run."""
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own hierarchy
        raise InvalidModelError(f"onnxruntime cannot load {path.name}: {_one_line(exc)}",
                                path=str(path)) from None
    names = [o.name for o in sess.get_outputs()]
    outputs = []
    for feeds in input_sets:
        try:
            values = sess.run(names, dict(feeds))
        except Exception as exc:
            raise InvalidModelError(f"onnxruntime cannot run {path.name} on the chosen "
                                    f"inputs: {_one_line(exc)} (choose them with "
                                    "--input-shape or --inputs)", path=str(path)) from None
        outputs.append({n: np.asarray(v) for n, v in zip(names, values, strict=True)})
    return outputs, f"onnxruntime {ort.__version__} CPU fp32"


def run_mnn(path: Path, input_sets: Sequence[Mapping[str, np.ndarray]]
            ) -> tuple[list[dict[str, np.ndarray]], str]:
    """pymnn, CPU fp32, on each input set (cast to MNN's session tensor dtypes)."""
    from fleet.core.mnn.session import LoadedModel, RuntimeConfig, mnn_version

    shapes = {k: tuple(v.shape) for k, v in input_sets[0].items()}
    try:
        model = LoadedModel.open(str(path), RuntimeConfig("cpu", precision="high",
                                                          threads=1), input_shapes=shapes)
    except (InvalidModelError, UsageError):
        raise
    except Exception as exc:
        raise InvalidModelError(f"MNN cannot load {path.name}: {_one_line(exc)}",
                                path=str(path)) from None
    outputs = []
    try:
        for feeds in input_sets:
            cast = {k: np.ascontiguousarray(np.asarray(v).astype(
                model.inputs[k].dtype if k in model.inputs else np.asarray(v).dtype,
                copy=False)) for k, v in feeds.items()}
            out, _log = model.run_quiet(cast)
            outputs.append(out)
    finally:
        model.close()
    return outputs, f"MNN {mnn_version()} CPU fp32"


def source_meta(path: Path, kind: str) -> dict[str, Any]:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return {"kind": kind, "name": path.name, "sha256": h.hexdigest()}


def reference_run(path: Path, kind: str, *, n: int, seed: int,
                  input_shapes: Mapping[str, Sequence[int]] | None,
                  samples: Sequence[Mapping[str, np.ndarray]] | None,
                  float_mnn: Path | None = None) -> ReferenceRun:
    """The original model on its chosen inputs, in this process (call it isolated).

    ``float_mnn``: for TFLite, its float MNN conversion (the model that is run)."""
    if kind == "onnx":
        specs = inp.onnx_input_specs(path)
        inputs, origin = choose_inputs(specs, n=n, seed=seed, input_shapes=input_shapes,
                                       samples=samples)
        outputs, ref = run_onnx(path, inputs)
    else:
        runnable = float_mnn if kind == "tflite" and float_mnn is not None else path
        specs = inp.mnn_input_specs(runnable)
        inputs, origin = choose_inputs(specs, n=n, seed=seed, input_shapes=input_shapes,
                                       samples=samples)
        outputs, ref = run_mnn(runnable, inputs)
        if kind == "tflite":
            ref += (" (float MNN conversion of the TFLite model: no TFLite runtime here, the "
                    "conversion itself is not checked)")
    return ReferenceRun(specs, inputs, outputs, ref, origin,
                        {"source": source_meta(path, kind), "seed": seed})


def _golden_child(path: Path, n: int, seed: int,
                  input_shapes: Mapping[str, Sequence[int]] | None,
                  samples: Sequence[Mapping[str, np.ndarray]] | None) -> bytes:
    kind = sniff(path)
    if kind == "tflite":
        with tempfile.TemporaryDirectory(prefix="fleet-golden-") as tmp:
            float_mnn = Path(tmp) / "float.mnn"
            src = source_meta(path, kind)
            convert_file(path, float_mnn, "TFLITE", [], "mnn-fleet", src["sha256"])
            run = reference_run(path, kind, n=n, seed=seed, input_shapes=input_shapes,
                                samples=samples, float_mnn=float_mnn)
    else:
        run = reference_run(path, kind, n=n, seed=seed, input_shapes=input_shapes,
                            samples=samples)
    return run.golden().to_bytes()


def make_golden(model: str | Path, n: int = 2, seed: int = 0, *,
                input_shapes: Mapping[str, Sequence[int]] | None = None,
                inputs: Sequence[Mapping[str, np.ndarray]] | None = None,
                input_spec: Mapping[str, Any] | None = None) -> bytes:
    """Run the original model on ``n`` seeded input sets (or the user's ``inputs``);
    return the golden ``.npz`` bytes. Runs in an isolated child.

    ``model``: ONNX (onnxruntime), TFLite (its float MNN conversion) or ``.mnn`` (pymnn, CPU
    fp32); give the ORIGINAL model, before any quantized variant. ``input_shapes``:
    ``{name: shape}`` (``--input-shape``); ``input_spec``: the older
    ``{name: {"shape": [...]}}`` form of the same. Raises ModelError (missing file),
    UsageError (bad shapes or samples), InvalidModelError (a dynamic shape not given, a
    runtime refusing the model or inputs, MNN crashing).
    """
    path = Path(model)
    if not path.is_file():
        raise ModelError(f"no model file at {path}", path=str(path))
    if n < 1:
        raise UsageError("golden needs at least one sample")
    shapes = dict(input_shapes or {})
    for name, spec in (input_spec or {}).items():
        shapes.setdefault(name, tuple(spec["shape"]))
    data: bytes = run_isolated(_golden_child, path, n, seed, shapes or None,
                               list(inputs) if inputs else None,
                               what=f"reference outputs of {path.name}",
                               error=InvalidModelError)
    return data


def _resolve_child(path: Path, input_shapes: Mapping[str, Sequence[int]] | None
                   ) -> dict[str, tuple[int, ...]]:
    specs = (inp.onnx_input_specs(path) if sniff(path) == "onnx"
             else inp.mnn_input_specs(path))
    return inp.resolve_shapes(specs, input_shapes)


def resolve_input_shapes(model: str | Path,
                         input_shapes: Mapping[str, Sequence[int]] | None = None
                         ) -> dict[str, tuple[int, ...]]:
    """Every input's concrete shape for an ONNX or ``.mnn`` model (isolated child), by the
    rules of :mod:`fleet.artifacts.inputs`: InvalidModelError (exit 9) naming the input and
    ``--input-shape`` for a dynamic dim not given, UsageError for a bad ``input_shapes``."""
    path = Path(model)
    shapes: dict[str, tuple[int, ...]] = run_isolated(
        _resolve_child, path, dict(input_shapes) if input_shapes else None,
        what=f"reading the inputs of {path.name}", error=InvalidModelError)
    return shapes
