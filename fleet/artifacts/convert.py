"""ONNX / TFLite -> MNN with MNN's own converter, checked before it is accepted.

Why this shape:
- The converter call and its reproducible output live in :mod:`fleet.artifacts.converter`.
  The whole job (convert, run the reference, run the conversion) happens in one isolated
  child (:func:`fleet.artifacts.isolate.run_isolated`): a native MNN crash there is
  ``ConversionError`` (exit 10) naming the model and the signal.
- One reference run (:mod:`fleet.artifacts.reference`) serves the check and the golden
  data: the original model runs once per input set, the float conversion once per input
  set, a variant once per input set; :attr:`ConvertResult.golden` is the golden ``.npz``
  made from that same run, so callers need not run the model again.
- An ONNX conversion is checked against onnxruntime with MNN's own threshold (its
  ``testMNNFromOnnx`` script): max abs error <= 0.01 x max |reference|, per output, over
  the finite elements; NaN must be NaN and +-Inf the same infinity at the same positions.
  The check is made on the float conversion, which is what the converter is responsible
  for; a variant (fp16 storage, 8/4-bit weights) changes numbers on purpose, its error is
  reported, and whether it is good enough is decided per device by the health check
  against the golden outputs (ARCHITECTURE step 3).
- TFLite has no reference runtime here: the float conversion is the reference, and it
  must load and give outputs without NaN/Inf.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fleet.artifacts.converter import FORMATS, convert_file, mnnconvert
from fleet.artifacts.isolate import run_isolated
from fleet.artifacts.reference import reference_run, run_mnn, source_meta
from fleet.core.errors import ConversionError, ModelError, UsageError

__all__ = ["CONVERT_TOLERANCE", "VARIANTS", "ConvertResult", "convert_model", "mnnconvert"]

CONVERT_TOLERANCE = 0.01
#: variant -> extra converter flags
VARIANTS: dict[str | None, list[str]] = {
    None: [], "fp32": [], "fp16": ["--fp16"], "wq8": ["--weightQuantBits", "8"],
    "wq4": ["--weightQuantBits", "4"],
}


@dataclass
class ConvertResult:
    """``golden``: the golden ``.npz`` bytes from the reference run (None without check)."""

    path: Path
    source_format: str
    variant: str | None
    check: dict[str, Any] | None = None
    variant_error: dict[str, Any] | None = None
    log: list[str] = field(default_factory=list)
    golden: bytes | None = None
    input_specs: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "source_format": self.source_format,
                "variant": self.variant, "check": self.check,
                "variant_error": self.variant_error, "input_specs": self.input_specs}


def _mnn_outputs(path: Path, input_sets: Sequence[Mapping[str, np.ndarray]]
                 ) -> list[dict[str, np.ndarray]]:
    """The converted model on each input set (a crash kills the whole isolated job)."""
    try:
        outputs, _ = run_mnn(path, input_sets)
    except ModelError as exc:
        raise ConversionError(f"converted model does not run: {exc.message}") from None
    return outputs


def _errors_vs(ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]
               ) -> dict[str, Any]:
    """Per output: max abs error over finite elements / max |finite reference|; a NaN or
    infinity where the reference has none (or the other sign) makes the ratio inf."""
    per: dict[str, Any] = {}
    worst = 0.0
    for name, r in ref.items():
        if name not in got:
            per[name] = {"missing": True}
            worst = float("inf")
            continue
        g = np.asarray(got[name], np.float64).reshape(-1)
        rr = np.asarray(r, np.float64).reshape(-1)
        if g.size != rr.size:
            per[name] = {"shape": list(np.shape(got[name])), "ref_shape": list(np.shape(r))}
            worst = float("inf")
            continue
        fin = np.isfinite(rr)
        same_special = np.where(np.isnan(rr), np.isnan(g), g == rr)
        if not np.all(np.where(fin, np.isfinite(g), same_special)):
            per[name] = {"nonfinite_mismatch": True}
            worst = float("inf")
            continue
        diff = np.abs(g[fin] - rr[fin])
        max_abs = float(diff.max()) if diff.size else 0.0
        scale = float(np.max(np.abs(rr[fin]))) if fin.any() else 0.0
        ratio = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
        per[name] = {"max_abs": max_abs, "max_abs_ref": scale, "ratio": ratio}
        worst = max(worst, ratio)
    return {"outputs": per, "worst_ratio": worst}


def _compare(refs: Sequence[Mapping[str, np.ndarray]],
             gots: Sequence[Mapping[str, np.ndarray]]) -> tuple[float, list[dict[str, Any]]]:
    per = [_errors_vs(r, g) for r, g in zip(refs, gots, strict=True)]
    return max((p["worst_ratio"] for p in per), default=0.0), per


def _convert_job(src: Path, dst: Path, variant: str | None, check: bool, biz_code: str,
                 seed: int, samples_n: int, input_shapes: Mapping[str, Sequence[int]] | None,
                 samples: Sequence[Mapping[str, np.ndarray]] | None) -> ConvertResult:
    """The whole conversion, in this process (:func:`convert_model` isolates it)."""
    fmt = FORMATS[src.suffix.lower()]
    kind = fmt.lower()
    digest = source_meta(src, kind)["sha256"]
    result = ConvertResult(path=dst, source_format=fmt, variant=variant)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fleet-convert-") as tmp:
        float_path = Path(tmp) / "float.mnn"
        result.log = convert_file(src, float_path, fmt, [], biz_code, digest)
        run = None
        if check:
            run = reference_run(src, kind, n=samples_n, seed=seed, input_shapes=input_shapes,
                                samples=samples, float_mnn=float_path)
            result.input_specs = [s.to_dict() for s in run.specs]
            if fmt == "ONNX":
                worst, per = _compare(run.outputs, _mnn_outputs(float_path, run.inputs))
                result.check = {"reference": run.reference, "tolerance": CONVERT_TOLERANCE,
                                "measure": "max abs error / max |reference| per output",
                                "worst_ratio": worst, "passed": worst <= CONVERT_TOLERANCE,
                                "samples": per, "seed": seed, "inputs": run.origin}
                if not result.check["passed"]:
                    raise ConversionError(
                        f"MNN conversion of {src.name} differs from onnxruntime: max abs "
                        f"error {worst:.4g} x max|ref| > {CONVERT_TOLERANCE}",
                        source=str(src), worst_ratio=worst)
            else:
                finite = all(np.all(np.isfinite(np.asarray(v, np.float64)))
                             for out in run.outputs for v in out.values())
                if not finite:
                    raise ConversionError(f"converted model {src.name} gives NaN/Inf outputs")
                result.check = {"reference": None, "passed": True, "inputs": run.origin,
                                "measure": "loads in MNN and gives finite outputs (no TFLite "
                                           "runtime here)"}
            result.golden = run.golden().to_bytes()
        if VARIANTS[variant]:
            result.log += convert_file(src, dst, fmt, VARIANTS[variant], biz_code, digest)
            if run is not None:
                worst, _ = _compare(run.outputs, _mnn_outputs(dst, run.inputs))
                result.variant_error = {"worst_ratio": worst, "measure":
                                        "max abs error / max |reference| (not gated here)"}
        else:
            dst.write_bytes(float_path.read_bytes())
    return result


def convert_model(src: str | Path, dst: str | Path, *, variant: str | None = None,
                  input_shapes: Mapping[str, Sequence[int]] | None = None,
                  inputs: Sequence[Mapping[str, np.ndarray]] | None = None,
                  input_spec: Mapping[str, Any] | None = None, check: bool = True,
                  biz_code: str = "mnn-fleet", seed: int = 0, samples: int = 2
                  ) -> ConvertResult:
    """Convert ``src`` (``.onnx`` or ``.tflite``) to ``dst`` (``.mnn``) as ``variant``.

    ``variant``: None/``fp32``, ``fp16``, ``wq8`` or ``wq4``. ``input_shapes``
    (``--input-shape``) or ``input_spec`` (``{name: {"shape": [...]}}``) fix dynamic dims;
    ``inputs`` (``--inputs``) are the user's samples, else ``samples`` seeded sets.
    The output is byte-reproducible for the same source, options and MNN version.
    Raises UsageError/ModelError for bad arguments, InvalidModelError (exit 9) when the
    source or its inputs are refused (a dynamic dim not given, onnxruntime failing), and
    ConversionError (exit 10) when the converter fails, MNN crashes, or (ONNX, ``check``)
    the float conversion differs from onnxruntime beyond the tolerance.
    """
    src, dst = Path(src), Path(dst)
    if variant not in VARIANTS:
        raise UsageError(f"unknown variant {variant!r}; known: fp16, wq8, wq4",
                         variant=variant)
    if not src.is_file():
        raise ModelError(f"no model file at {src}", path=str(src))
    if src.suffix.lower() not in FORMATS:
        raise UsageError(f"cannot convert {src.name}: expected .onnx or .tflite", path=str(src))
    shapes = dict(input_shapes or {})
    for name, spec in (input_spec or {}).items():
        shapes.setdefault(name, tuple(spec["shape"]))
    result: ConvertResult = run_isolated(
        _convert_job, src, dst, variant, check, biz_code, seed, samples, shapes or None,
        list(inputs) if inputs else None, what=f"converting {src.name}",
        error=ConversionError)
    return result
