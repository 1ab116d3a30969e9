"""Which inputs a model is checked with: shapes, dtypes, value ranges and user samples.

A model's inputs are read from its own metadata (:func:`onnx_input_specs` for ONNX, with
the ``onnx`` package; :func:`mnn_input_specs` for ``.mnn``, with ``MNN.expr``, to be
called inside an isolated child). Each :class:`InputSpec` has the shape with ``-1`` for a
dynamic (symbolic, unknown) dimension, the numpy dtype, and for integer inputs the valid
value range when the graph shows one.

Shapes (:func:`resolve_shapes`):
- ``--input-shape NAME=D0,D1,...`` (:func:`parse_input_shapes`, repeatable) gives an
  input's whole shape; its rank and fixed dimensions must match the model (UsageError,
  exit 2, as for a name the model does not have);
- a dynamic LEADING dimension of an input of rank >= 2 is the batch: it becomes 1;
- any other dynamic dimension without a given shape is refused with one line naming the
  input and ``--input-shape`` (InvalidModelError, exit 9). A symbolic ONNX dimension is
  never silently 1 (FIELD-NOTES "Dynamic shapes": a PaddleOCR detector fed 1x1 fails).

Values synthesised (:func:`synthesize`, through :func:`fleet.core.golden.synth_inputs`):
floats uniform in [-1, 1); bool 0/1; integers in ``InputSpec.bounds``, a half-open range
``[low, high)``:
- ONNX: an input whose values reach a ``Gather``'s indices (directly or through Cast,
  Reshape, Squeeze, Unsqueeze, Flatten, Identity) indexes that Gather's constant data:
  ``[0, data.shape[axis])``, the smallest over all such Gathers;
- ``.mnn``: the same walk over ``MNN.expr``'s graph (``GatherV2``/``Gather``, whose
  indices MNN's converter passes through ``ADD``/``MOD`` with a constant to wrap negative
  ids; a constant ``axis`` input, else 0);
- otherwise a default that every such input accepts: ``[0, 256)`` for uint8 (pixels),
  ``[-128, 128)`` for int8 (quantized activations), and ``[0, 2)`` for other integer types
  (a mask, a class or segment id, an index into any table of at least 2 rows).

User samples (:func:`load_inputs_npz`, ``--inputs FILE.npz``): a regular file of at most
:data:`MAX_INPUTS_BYTES` (compressed and uncompressed), read without pickles. Layout:
- one sample: one array per input, keyed by the input's name (``np.savez(f, x=..., m=...)``);
- several samples: keys ``"<i>/<name>"`` for samples ``i = 0..N-1``, every sample naming
  every input (``np.savez(f, **{"0/x": a, "1/x": b})``).
Each array has the model input's shape (batch included); its dtype must be of the input's
kind (integer for integer inputs, float for float, bool for bool) and is cast to the
input's exact dtype.
"""

from __future__ import annotations

import os
import re
import stat
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fleet.core.errors import InvalidModelError, UsageError

__all__ = [
    "MAX_INPUTS_BYTES",
    "InputSpec",
    "conform_samples",
    "load_inputs_npz",
    "mnn_input_specs",
    "onnx_input_specs",
    "parse_input_shapes",
    "resolve_shapes",
    "synthesize",
]

#: cap of an ``--inputs`` file, on disk and uncompressed (the samples go into the golden
#: data, itself capped at 64 MiB in :mod:`fleet.core.golden`)
MAX_INPUTS_BYTES = 64 << 20
_SHAPE_RE = re.compile(r"^(?P<name>.+?)=(?P<dims>\d+(?:,\d+)*)$")
_PASS_ONNX = frozenset({"Cast", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"})
_PASS_MNN = frozenset({"Cast", "Reshape", "Squeeze", "Unsqueeze", "ExpandDims", "Flatten",
                       "ConvertTensor", "ADD", "MOD", "Identity"})
_MNN_DTYPES = {"float": "float32", "double": "float64", "int": "int32", "int64": "int64",
               "uint8": "uint8", "int8": "int8"}


@dataclass(frozen=True)
class InputSpec:
    """One model input. ``shape``: dims with -1 where dynamic, None when the rank is
    unknown; ``dims``: the dimension names for messages (``"H"``, ``"?"``, ``"1"``);
    ``dtype``: numpy name; ``bounds``: ``[low, high)`` of an integer input, or None."""

    name: str
    shape: tuple[int, ...] | None
    dtype: str
    dims: tuple[str, ...] = ()
    bounds: tuple[int, int] | None = None
    bounds_source: str = field(default="", compare=False)

    @property
    def dynamic(self) -> bool:
        return self.shape is None or any(d < 0 for d in self.shape)

    def shown(self) -> str:
        if self.shape is None:
            return "[unknown rank]"
        names = self.dims or tuple(str(d) if d >= 0 else "?" for d in self.shape)
        return "[" + ", ".join(names) + "]"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": None if self.shape is None else list(self.shape),
                "dtype": self.dtype, "bounds": None if self.bounds is None else
                list(self.bounds), "bounds_source": self.bounds_source}


def parse_input_shapes(items: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """``["x=1,3,320,320", ...]`` -> ``{"x": (1, 3, 320, 320)}``; UsageError (exit 2) on
    bad syntax, a zero dimension or a name given twice."""
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items:
        m = _SHAPE_RE.fullmatch(item.strip())
        if m is None:
            raise UsageError(f"--input-shape {item!r}: expected NAME=D0,D1,... with positive "
                             "integers, e.g. x=1,3,320,320", value=item)
        name, dims = m["name"], tuple(int(d) for d in m["dims"].split(","))
        if any(d <= 0 for d in dims):
            raise UsageError(f"--input-shape {item!r}: dimensions must be positive",
                             value=item)
        if name in shapes:
            raise UsageError(f"--input-shape names {name!r} twice", input=name)
        shapes[name] = dims
    return shapes


def _kind_ok(src: np.dtype[Any], dst: np.dtype[Any]) -> bool:
    if dst.kind == "b":
        return src.kind == "b"
    if dst.kind in "iu":
        return src.kind in "iub"
    if dst.kind == "f":
        return src.kind in "fiu"
    return src == dst


def load_inputs_npz(path: str | os.PathLike[str]) -> list[dict[str, np.ndarray]]:
    """Samples from an ``--inputs`` ``.npz`` (layout in the module docstring).

    Raises UsageError (exit 2) for a missing, non-regular, oversized or unreadable file
    and for mixed or incomplete sample keys."""
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as exc:
        raise UsageError(f"--inputs {p}: {exc.strerror}", path=str(p)) from exc
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"--inputs {p}: not a regular file", path=str(p))
    if st.st_size > MAX_INPUTS_BYTES:
        raise UsageError(f"--inputs {p}: {st.st_size} bytes, more than the "
                         f"{MAX_INPUTS_BYTES >> 20} MiB allowed", path=str(p))
    try:
        with zipfile.ZipFile(p) as zf:
            total = sum(i.file_size for i in zf.infolist())
        if total > MAX_INPUTS_BYTES:
            raise UsageError(f"--inputs {p}: {total} bytes uncompressed, more than the "
                             f"{MAX_INPUTS_BYTES >> 20} MiB allowed", path=str(p))
        with np.load(p, allow_pickle=False) as npz:
            arrays = {k: np.asarray(npz[k]) for k in npz.files}
    except UsageError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise UsageError(f"--inputs {p}: not a readable .npz ({exc})", path=str(p)) from exc
    if not arrays:
        raise UsageError(f"--inputs {p}: no arrays", path=str(p))
    indexed = {k: re.fullmatch(r"(\d+)/(.+)", k) for k in arrays}
    if not all(indexed.values()):
        if any(indexed.values()):
            raise UsageError(f"--inputs {p}: mixes '<i>/<name>' keys with plain names",
                             path=str(p))
        return [arrays]
    samples: dict[int, dict[str, np.ndarray]] = {}
    for key, m in indexed.items():
        assert m is not None
        samples.setdefault(int(m[1]), {})[m[2]] = arrays[key]
    if sorted(samples) != list(range(len(samples))):
        raise UsageError(f"--inputs {p}: sample numbers must be 0..N-1", path=str(p))
    ordered = [samples[i] for i in range(len(samples))]
    if any(set(s) != set(ordered[0]) for s in ordered):
        raise UsageError(f"--inputs {p}: every sample must name the same inputs",
                         path=str(p))
    return ordered


def _refuse_dynamic(spec: InputSpec) -> InvalidModelError:
    return InvalidModelError(
        f"input {spec.name} has dynamic dimensions {spec.shown()}: give its shape with "
        f"--input-shape {spec.name}=D0,D1,... (or sample inputs with --inputs FILE.npz)",
        input=spec.name, shape=None if spec.shape is None else list(spec.shape))


def _check_given(spec: InputSpec, shape: Sequence[int], option: str) -> None:
    if spec.shape is None:
        return
    fits = len(shape) == len(spec.shape) and all(
        m < 0 or m == g for m, g in zip(spec.shape, shape, strict=True))
    if not fits:
        raise UsageError(f"{option} gives input {spec.name} shape {list(shape)}, but the "
                         f"model's is {spec.shown()}", input=spec.name)


def resolve_shapes(specs: Sequence[InputSpec],
                   given: Mapping[str, Sequence[int]] | None = None
                   ) -> dict[str, tuple[int, ...]]:
    """Every input's concrete shape (rules in the module docstring)."""
    given = dict(given or {})
    known = {s.name for s in specs}
    unknown = sorted(set(given) - known)
    if unknown:
        raise UsageError(f"--input-shape names {', '.join(unknown)}, not an input of the "
                         f"model (inputs: {', '.join(sorted(known))})", inputs=unknown)
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        if spec.name in given:
            _check_given(spec, given[spec.name], "--input-shape")
            shapes[spec.name] = tuple(int(d) for d in given[spec.name])
            continue
        if spec.shape is None:
            raise _refuse_dynamic(spec)
        shape = list(spec.shape)
        if len(shape) >= 2 and shape[0] < 0:
            shape[0] = 1  # the batch
        if any(d < 0 for d in shape):
            raise _refuse_dynamic(spec)
        shapes[spec.name] = tuple(shape)
    return shapes


def conform_samples(specs: Sequence[InputSpec], samples: Sequence[Mapping[str, np.ndarray]],
                    given: Mapping[str, Sequence[int]] | None = None
                    ) -> list[dict[str, np.ndarray]]:
    """User samples checked against the model: the same names, shapes that fit (and agree
    with ``--input-shape``), dtypes of the input's kind cast to its dtype. UsageError."""
    names = {s.name for s in specs}
    out: list[dict[str, np.ndarray]] = []
    for i, sample in enumerate(samples):
        if set(sample) != names:
            missing, extra = sorted(names - set(sample)), sorted(set(sample) - names)
            raise UsageError(f"--inputs sample {i}: " + "; ".join(
                x for x in (f"missing {', '.join(missing)}" if missing else "",
                            f"not inputs of the model: {', '.join(extra)}" if extra else "")
                if x), missing=missing, extra=extra)
        conformed: dict[str, np.ndarray] = {}
        for spec in specs:
            arr = np.asarray(sample[spec.name])
            _check_given(spec, arr.shape, f"--inputs sample {i}")
            if given and spec.name in given and tuple(given[spec.name]) != arr.shape:
                raise UsageError(f"--inputs sample {i}: {spec.name} has shape "
                                 f"{list(arr.shape)}, --input-shape says "
                                 f"{list(given[spec.name])}", input=spec.name)
            want = np.dtype(spec.dtype)
            if not _kind_ok(arr.dtype, want):
                raise UsageError(f"--inputs sample {i}: {spec.name} is {arr.dtype}, the "
                                 f"model wants {want}", input=spec.name)
            conformed[spec.name] = np.ascontiguousarray(arr.astype(want, copy=False))
        out.append(conformed)
    first = {k: v.shape for k, v in out[0].items()} if out else {}
    if any({k: v.shape for k, v in s.items()} != first for s in out):
        raise UsageError("--inputs: every sample must have the same shapes")
    return out


def default_bounds(dtype: str) -> tuple[int, int] | None:
    """The range used for an integer input whose graph shows none (module docstring)."""
    dt = np.dtype(dtype)
    if dt.kind not in "iu":
        return None
    if dt == np.uint8:
        return (0, 256)
    if dt == np.int8:
        return (-128, 128)
    return (0, 2)


def synthesize(specs: Sequence[InputSpec], shapes: Mapping[str, Sequence[int]], n: int,
               seed: int) -> list[dict[str, np.ndarray]]:
    """``n`` seeded input sets at ``shapes`` in each input's dtype and value range."""
    from fleet.core.golden import synth_inputs

    rng = np.random.default_rng(seed)
    table = {s.name: (tuple(shapes[s.name]), s.dtype) for s in specs}
    bounds = {s.name: s.bounds or default_bounds(s.dtype) for s in specs}
    ranges = {k: v for k, v in bounds.items() if v is not None}
    return [synth_inputs(table, rng, bounds=ranges) for _ in range(n)]


# -- reading the specs ---------------------------------------------------------------------


def onnx_input_specs(path: str | os.PathLike[str]) -> list[InputSpec]:
    """The inputs of an ONNX model (initializers listed as inputs excluded), in order.

    Raises InvalidModelError when the file does not parse as ONNX."""
    import onnx
    from onnx import helper

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise InvalidModelError(f"{Path(path).name} is not a readable ONNX model: "
                                f"{str(exc).splitlines()[0] if str(exc) else exc}",
                                path=str(path)) from exc
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    bounds = _onnx_gather_bounds(graph)
    specs = []
    for vi in graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).name
        except Exception as exc:
            raise InvalidModelError(f"input {vi.name}: element type {tt.elem_type} is not "
                                    "a tensor type this tool can feed",
                                    input=vi.name) from exc
        if tt.HasField("shape"):
            dims = tuple(tt.shape.dim)
            shape: tuple[int, ...] | None = tuple(
                d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1
                for d in dims)
            names = tuple(str(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0
                          else (d.dim_param or "?") for d in dims)
        else:
            shape, names = None, ()
        b = bounds.get(vi.name) if np.dtype(dtype).kind in "iu" else None
        specs.append(InputSpec(vi.name, shape, dtype, names, b,
                               "Gather data dim" if b else ""))
    return specs


def _onnx_gather_bounds(graph: Any) -> dict[str, tuple[int, int]]:
    from onnx import numpy_helper

    producer = {o: node for node in graph.node for o in node.output}
    consts: dict[str, tuple[int, ...]] = {t.name: tuple(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    consts[node.output[0]] = tuple(numpy_helper.to_array(attr.t).shape)
    inputs = {vi.name for vi in graph.input}
    found: dict[str, tuple[int, int]] = {}
    for node in graph.node:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or \
                len(node.input) < 2 or node.input[0] not in consts:
            continue
        data_shape = consts[node.input[0]]
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if not data_shape or not -len(data_shape) <= axis < len(data_shape):
            continue
        rows = int(data_shape[axis])
        name, hops = node.input[1], 0
        while name not in inputs and name in producer and hops < 8:
            up = producer[name]
            if up.op_type not in _PASS_ONNX or not up.input:
                break
            name, hops = up.input[0], hops + 1
        if name in inputs and rows > 0:
            found[name] = (0, min(found.get(name, (0, rows))[1], rows))
    return found


def mnn_input_specs(path: str | os.PathLike[str]) -> list[InputSpec]:
    """The inputs of an ``.mnn`` from ``MNN.expr.load_as_dict`` (run this in a child:
    MNN may crash on the file). InvalidModelError when MNN cannot read it."""
    from fleet.core.mnn.fdcapture import capture_fds
    from fleet.core.mnn.session import mnn

    mod = mnn()
    with capture_fds():
        try:
            graph = mod.expr.load_as_dict(str(path))
        except Exception as exc:
            raise InvalidModelError(f"{Path(path).name}: MNN cannot read its graph: {exc}",
                                    path=str(path)) from exc
        specs = []
        found = _mnn_gather_bounds(graph)
        for name, var in graph.items():
            if var.op_type != "Input":
                continue
            dtype = _MNN_DTYPES.get(str(var.dtype).rsplit(".", 1)[-1], "float32")
            try:
                shape: tuple[int, ...] | None = tuple(int(d) if int(d) > 0 else -1
                                                      for d in var.shape)
            except Exception:  # shape not known before a resize
                shape = None
            b = found.get(name) if np.dtype(dtype).kind in "iu" else None
            specs.append(InputSpec(name, shape, dtype, (), b,
                                   "Gather data dim" if b else ""))
    return specs


def _mnn_gather_bounds(graph: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    found: dict[str, tuple[int, int]] = {}
    for var in graph.values():
        try:
            if var.op_type not in ("GatherV2", "Gather"):
                continue
            ins = list(var.inputs)
            if len(ins) < 2 or ins[0].op_type != "Const":
                continue
            data_shape = [int(d) for d in ins[0].shape]
            axis = int(np.asarray(ins[2].read()).reshape(-1)[0]) \
                if len(ins) > 2 and ins[2].op_type == "Const" else 0
            rows = data_shape[axis]
            node, hops = ins[1], 0
            while node.op_type != "Input" and node.op_type in _PASS_MNN and hops < 8:
                ups = [u for u in node.inputs if u.op_type != "Const"]
                if len(ups) != 1:
                    break
                node, hops = ups[0], hops + 1
            if node.op_type == "Input" and rows > 0:
                found[node.name] = (0, min(found.get(node.name, (0, rows))[1], rows))
        except Exception:  # a var pymnn cannot describe: no bound from it
            continue
    return found
