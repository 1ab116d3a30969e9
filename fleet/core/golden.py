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

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fleet.core.errors import InvalidModelError, UsageError

__all__ = ["GOLDEN_SCHEMA", "Golden", "synth_inputs"]

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
