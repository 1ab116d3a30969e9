"""ONNX / TFLite -> MNN with MNN's own converter, checked before it is accepted.

Why this shape:
- The converter is the ``_tools`` extension module, called in-process. Never the
  ``mnnconvert`` console script or ``MNN.tools`` (telemetry, pip at import).
- ``_tools.mnnconvert`` prints to stdout and returns True even when the input file does
  not exist, so success is judged by the output file and by loading it, never by the
  return value.
- An ONNX conversion is checked against onnxruntime on seeded random inputs with MNN's own
  threshold (its ``testMNNFromOnnx`` script): max abs error <= 0.01 x max |reference|, per
  output. The check is made on the float conversion, which is what the converter is
  responsible for; a variant (fp16 storage, 8/4-bit weights) changes numbers on purpose,
  its error is reported, and whether it is good enough is decided per device by the health
  check against the golden outputs (ARCHITECTURE step 3).
- TFLite has no reference runtime here: the conversion must load and give finite outputs.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fleet.core.errors import ConversionError, ModelError, UsageError

__all__ = ["CONVERT_TOLERANCE", "VARIANTS", "ConvertResult", "convert_model", "mnnconvert"]

CONVERT_TOLERANCE = 0.01
#: variant -> extra converter flags
VARIANTS: dict[str | None, list[str]] = {
    None: [], "fp32": [], "fp16": ["--fp16"], "wq8": ["--weightQuantBits", "8"],
    "wq4": ["--weightQuantBits", "4"],
}
_FORMATS = {".onnx": "ONNX", ".tflite": "TFLITE"}


@dataclass
class ConvertResult:
    path: Path
    source_format: str
    variant: str | None
    check: dict[str, Any] | None = None
    variant_error: dict[str, Any] | None = None
    log: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "source_format": self.source_format,
                "variant": self.variant, "check": self.check,
                "variant_error": self.variant_error}


def mnnconvert(argv: list[str]) -> list[str]:
    """Run MNN's converter in-process with its prints captured; returns the log lines."""
    from fleet.core.mnn.fdcapture import capture_fds

    with capture_fds() as cap:
        from fleet.core.mnn.session import mnn

        mnn()  # import MNN quietly first: _tools shares its library
        import _tools

        _tools.mnnconvert(["mnnconvert", *argv])
    return cap.lines()


def _run_converter(src: Path, dst: Path, fmt: str, flags: list[str], biz_code: str
                   ) -> list[str]:
    dst.unlink(missing_ok=True)
    log = mnnconvert(["-f", fmt, "--modelFile", str(src), "--MNNModel", str(dst),
                      "--bizCode", biz_code, *flags])
    if not dst.is_file() or dst.stat().st_size == 0:
        raise ConversionError(f"MNN converter produced no model from {src.name}: "
                              + " | ".join(log[-5:]), source=str(src), log=log[-20:])
    return log


def _mnn_outputs(path: Path, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    from fleet.core.mnn.session import LoadedModel, RuntimeConfig

    shapes = {k: tuple(v.shape) for k, v in feeds.items()}
    try:
        model = LoadedModel.open(str(path), RuntimeConfig("cpu", precision="high"),
                                 input_shapes=shapes)
    except Exception as exc:
        raise ConversionError(f"converted model does not load: {exc}") from exc
    out, _ = model.run_quiet(feeds)
    model.close()
    return out


def _errors_vs(ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]
               ) -> dict[str, Any]:
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
        max_abs = float(np.max(np.abs(g - rr))) if g.size else 0.0
        scale = float(np.max(np.abs(rr))) if rr.size else 0.0
        ratio = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
        if not np.all(np.isfinite(g)):
            ratio = float("inf")
        per[name] = {"max_abs": max_abs, "max_abs_ref": scale, "ratio": ratio}
        worst = max(worst, ratio)
    return {"outputs": per, "worst_ratio": worst}


def _onnx_check(src: Path, mnn_path: Path, input_spec: Mapping[str, Any] | None, seed: int,
                samples: int = 2) -> tuple[dict[str, Any], list[dict[str, np.ndarray]],
                                           list[dict[str, np.ndarray]]]:
    from fleet.artifacts.reference import make_golden
    from fleet.core.golden import Golden

    golden = Golden.load(make_golden(src, n=samples, seed=seed, input_spec=input_spec))
    worst = 0.0
    per_sample = []
    for feeds, ref in zip(golden.inputs, golden.outputs, strict=True):
        err = _errors_vs(ref, _mnn_outputs(mnn_path, feeds))
        per_sample.append(err)
        worst = max(worst, err["worst_ratio"])
    check = {"reference": golden.meta.get("reference"), "tolerance": CONVERT_TOLERANCE,
             "measure": "max abs error / max |reference| per output",
             "worst_ratio": worst, "passed": worst <= CONVERT_TOLERANCE,
             "samples": per_sample, "seed": seed}
    return check, golden.inputs, golden.outputs


def convert_model(src: str | Path, dst: str | Path, *, variant: str | None = None,
                  input_spec: Mapping[str, Any] | None = None, check: bool = True,
                  biz_code: str = "mnn-fleet", seed: int = 0) -> ConvertResult:
    """Convert ``src`` (``.onnx`` or ``.tflite``) to ``dst`` (``.mnn``) as ``variant``.

    ``variant``: None/``fp32``, ``fp16``, ``wq8`` or ``wq4``. Raises
    :class:`ConversionError` when the converter fails or, for ONNX with ``check``, when
    the float conversion differs from onnxruntime beyond the tolerance.
    """
    src, dst = Path(src), Path(dst)
    if variant not in VARIANTS:
        raise UsageError(f"unknown variant {variant!r}; known: fp16, wq8, wq4",
                         variant=variant)
    if not src.is_file():
        raise ModelError(f"no model file at {src}", path=str(src))
    fmt = _FORMATS.get(src.suffix.lower())
    if fmt is None:
        raise UsageError(f"cannot convert {src.name}: expected .onnx or .tflite", path=str(src))
    result = ConvertResult(path=dst, source_format=fmt, variant=variant)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fleet-convert-") as tmp:
        float_path = Path(tmp) / "float.mnn"
        result.log = _run_converter(src, float_path, fmt, [], biz_code)
        if fmt == "ONNX" and check:
            result.check, inputs, refs = _onnx_check(src, float_path, input_spec, seed)
            if not result.check["passed"]:
                raise ConversionError(
                    f"MNN conversion of {src.name} differs from onnxruntime: max abs error "
                    f"{result.check['worst_ratio']:.4g} x max|ref| > {CONVERT_TOLERANCE}",
                    source=str(src), worst_ratio=result.check["worst_ratio"])
        elif check:
            inputs, refs = [], []
            result.check = _finite_check(float_path, input_spec, seed)
        else:
            inputs, refs = [], []
        if VARIANTS[variant]:
            result.log += _run_converter(src, dst, fmt, VARIANTS[variant], biz_code)
            if inputs:
                worst = 0.0
                for feeds, ref in zip(inputs, refs, strict=True):
                    worst = max(worst, _errors_vs(ref, _mnn_outputs(dst, feeds))["worst_ratio"])
                result.variant_error = {"worst_ratio": worst, "measure":
                                        "max abs error / max |onnxruntime| (not gated here)"}
        else:
            dst.write_bytes(float_path.read_bytes())
    return result


def _finite_check(path: Path, input_spec: Mapping[str, Any] | None, seed: int
                  ) -> dict[str, Any]:
    """No reference runtime (TFLite): the conversion must load and give finite outputs."""
    from fleet.artifacts.reference import make_golden
    from fleet.core.golden import Golden

    golden = Golden.load(make_golden(path, n=1, seed=seed, input_spec=input_spec))
    finite = all(np.all(np.isfinite(np.asarray(v, np.float64)))
                 for out in golden.outputs for v in out.values())
    if not finite:
        raise ConversionError(f"converted model {path.name} gives NaN/Inf outputs")
    return {"reference": None, "passed": True,
            "measure": "loads in MNN and gives finite outputs (no TFLite runtime here)"}
