"""Golden data: inputs and the ORIGINAL model's outputs, travelling in the package.

Why (ARCHITECTURE "The agent's brain", step 3): a device can compare a candidate with the
CPU fp32 run of the same file, but that cannot catch a file that is itself wrong (a
weight-quantized variant that broke the model). So the controller runs the model *before*
conversion, quantization or fp16 storage (ONNX through onnxruntime; an ``.mnn`` through
pymnn on the CPU in fp32) on a few seeded inputs, and the expected outputs go into the
package. TFLite has no reference runtime here: its golden comes from the float MNN
conversion, and ``meta["reference"]`` says so.

Format: an ``.npz`` (no pickles) with ``in.<sample>.<k>`` and ``out.<sample>.<k>`` arrays
and ``__meta__``, UTF-8 JSON bytes: schema, inputs (k indexes them), output names, the
source kind and sha256, the seed and the runtime that produced the outputs. ``inputs`` is a
list of ``{"name", "shape", "dtype"}`` (the shape and dtype of sample 0, as the original
model took them: an ONNX int64 input stays int64 here); files written before that carry a
list of names, which still load. The device feeds these arrays as given (converted to the
dtype of MNN's own session tensor, resized to their shape), never re-synthesised.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fleet.core.errors import InvalidModelError, UsageError
from fleet.core.limits import MAX_GOLDEN_BYTES

__all__ = ["DEFAULT_INT_BOUNDS", "GOLDEN_SCHEMA", "SYNTH_DTYPES", "Golden",
           "synth_inputs"]

GOLDEN_SCHEMA = "fleet.golden/1"
_MAX_GOLDEN_BYTES = MAX_GOLDEN_BYTES  # one cap, controller and device (fleet.core.limits)


#: dtype name -> what :func:`synth_inputs` draws for it.
SYNTH_DTYPES = ("float32", "float16", "float64", "int64", "int32", "uint8", "int8", "bool")
#: Integer inputs without bounds are drawn from [0, 16): small, non-negative (safe as an
#: index into most tables, never negative).
DEFAULT_INT_BOUNDS = (0, 16)


def _synth_dtype(name: str, dtype: str | np.dtype[Any]) -> np.dtype[Any]:
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise UsageError(f"input {name!r}: unknown dtype {dtype!r}; known: "
                         f"{', '.join(SYNTH_DTYPES)}", input=name) from exc
    if dt.name not in SYNTH_DTYPES:
        raise UsageError(f"input {name!r}: cannot synthesise dtype {dt.name}; known: "
                         f"{', '.join(SYNTH_DTYPES)}", input=name)
    return dt


def _int_bounds(name: str, dt: np.dtype[Any], given: tuple[int, int] | None
                ) -> tuple[int, int]:
    low, high = given if given is not None else DEFAULT_INT_BOUNDS
    info = np.iinfo(dt)
    if given is None:  # the default, clipped to what the dtype holds
        return max(low, int(info.min)), min(high, int(info.max) + 1)
    low, high = int(low), int(high)
    if high <= low:
        raise UsageError(f"input {name!r}: empty integer range [{low}, {high})", input=name)
    if low < info.min or high - 1 > info.max:
        raise UsageError(f"input {name!r}: range [{low}, {high}) does not fit {dt.name}",
                         input=name)
    return low, high


def synth_inputs(specs: Mapping[str, tuple[Sequence[int], str]], rng: np.random.Generator,
                 bounds: Mapping[str, tuple[int, int]] | None = None
                 ) -> dict[str, np.ndarray]:
    """Seeded inputs for ``specs``: ``{name: (shape, dtype name)}`` -> ``{name: array}``.

    - float32/float16/float64: uniform in [-1, 1), drawn in float64 and cast;
    - int64/int32/uint8/int8: uniform integers in ``bounds[name]`` = ``(low, high)``, low
      inclusive, high exclusive (numpy's ``Generator.integers``), e.g. ``(0, 10)`` for the
      indices of an embedding of 10 rows; without bounds [0, 16) clipped to the dtype;
    - bool: False/True with equal odds.

    Inputs are drawn in sorted name order, so the same seed gives the same arrays on the
    controller (golden) and the device (reference without golden).
    Raises :class:`UsageError` for a dynamic dimension (<= 0), an unknown dtype, or bounds
    that are empty or do not fit the dtype.
    """
    out: dict[str, np.ndarray] = {}
    limits = dict(bounds or {})
    for name in sorted(specs):
        shape_in, dtype = specs[name]
        shape = tuple(int(d) for d in shape_in)
        if any(d <= 0 for d in shape):
            raise UsageError(f"input {name!r} has a dynamic shape {list(shape)}: "
                             "give an input spec", input=name)
        dt = _synth_dtype(name, dtype)
        if dt.kind == "f":
            out[name] = rng.uniform(-1.0, 1.0, size=shape).astype(dt)
        elif dt.kind == "b":
            out[name] = rng.integers(0, 2, size=shape).astype(np.bool_)
        else:
            low, high = _int_bounds(name, dt, limits.get(name))
            out[name] = rng.integers(low, high, size=shape).astype(dt)
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

    def input_specs(self) -> dict[str, dict[str, Any]]:
        """``{name: {"shape": [...], "dtype": "int64"}}`` of sample 0, as written to meta."""
        return {k: {"shape": [int(d) for d in v.shape], "dtype": str(v.dtype)}
                for k, v in self.inputs[0].items()}

    def to_bytes(self) -> bytes:
        in_names = sorted(self.inputs[0])
        out_names = sorted(self.outputs[0])
        specs = self.input_specs()
        meta = {**self.meta, "schema": GOLDEN_SCHEMA,
                "inputs": [{"name": n, **specs[n]} for n in in_names],
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
                in_names = [_input_name(e) for e in meta["inputs"]]
                out_names = [str(n) for n in meta["outputs"]]
                inputs, outputs = [], []
                for i in range(int(meta["samples"])):
                    inputs.append({n: npz[f"in.{i}.{k}"] for k, n in enumerate(in_names)})
                    outputs.append({n: npz[f"out.{i}.{k}"] for k, n in enumerate(out_names)})
        except InvalidModelError:
            raise
        except (ValueError, KeyError, TypeError, OSError, UnicodeDecodeError) as exc:
            raise InvalidModelError(f"golden data unreadable: {exc}") from exc
        _check_declared(meta["inputs"], inputs)
        return cls(inputs=inputs, outputs=outputs, meta=meta)


def _input_name(entry: Any) -> str:
    """A ``meta["inputs"]`` entry: a name (older files) or ``{"name", "shape", "dtype"}``."""
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("name"), str):
        return str(entry["name"])
    raise TypeError(f"bad input entry {entry!r} in golden meta")


def _check_declared(entries: Sequence[Any], inputs: Sequence[Mapping[str, np.ndarray]]
                    ) -> None:
    """Sample 0's arrays must have the shape and dtype the meta declares for them."""
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        arr = inputs[0][entry["name"]]
        shape, dtype = entry.get("shape"), entry.get("dtype")
        if shape is not None and [int(d) for d in shape] != list(arr.shape):
            raise InvalidModelError(f"golden input {entry['name']!r}: meta says shape "
                                    f"{shape}, the data is {list(arr.shape)}")
        if dtype is not None and str(dtype) != str(arr.dtype):
            raise InvalidModelError(f"golden input {entry['name']!r}: meta says dtype "
                                    f"{dtype}, the data is {arr.dtype}")
