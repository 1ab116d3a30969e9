"""The agent's hold on pymnn: import it quietly, load a model with a runtime config, run it.

Why a wrapper at all:
- pymnn prints to the process's stdout from C++ (``import MNN`` prints a CPU feature line,
  a missing backend prints ``Can't Find type=N backend, use 0 instead``), and the agent's
  stdout carries its one JSON document. Every call into MNN here runs under
  :func:`fleet.core.mnn.fdcapture.capture_fds`, and the captured lines are kept as evidence.
- pymnn silently ignores ``memory``/``power`` given as strings (FIELD-NOTES 5): this module
  is the one place that turns names into the integers pymnn needs.
- The *effective* backend is what matters, not the requested one (FIELD-NOTES 2): each
  session records the fallback log line and ``Interpreter.getSessionInfo(session, 2)``.
- Inputs are fed in the dtype of MNN's own session tensor (FIELD-NOTES "Integer inputs"):
  MNN keeps an int64 (and a bool) model input as an int32 session tensor, a float16 one as
  float32, and copying a host tensor of another type prints ``Input type not match
  session's tensor`` and leaves garbage. pymnn 3.6.1 cannot read or build an int8 tensor
  (``getNumpyData`` raises), so an int8 input is written byte for byte into a host tensor
  of the session's own type (checked: an ONNX int8 input reproduces exactly).
- Dynamic inputs (FIELD-NOTES "Dynamic shapes", ``[-1, 3, -1, -1]``) are resized to the
  shape the caller gives (or the shape of the array fed) before anything reads their
  shape, dtype or layout: reading them before raises inside pymnn.

The session API (``MNN.Interpreter``) is used rather than ``nn.load_module_from_file``
because only the session API exposes the session's backend type and cache file.
"""

from __future__ import annotations

import ctypes
import importlib
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fleet.core.errors import InvalidModelError, UsageError
from fleet.core.mnn.fdcapture import capture_fds

__all__ = [
    "BACKEND_CODES",
    "CPU_CODES",
    "GPU_BACKENDS",
    "MEMORY_MODES",
    "POWER_MODES",
    "PRECISION_MODES",
    "Fallback",
    "LoadedModel",
    "RuntimeConfig",
    "TensorSpec",
    "backend_name",
    "current_rss_bytes",
    "mnn",
    "mnn_version",
    "monotonic_ns",
    "parse_fallbacks",
    "peak_rss_bytes",
]

#: ``MNNForwardType`` values (MNN/MNNForwardType.h); names are the lower-case MNN-LLM ones.
BACKEND_CODES: dict[str, int] = {
    "cpu": 0, "metal": 1, "cuda": 2, "opencl": 3, "auto": 4, "nn": 5, "opengl": 6,
    "vulkan": 7, "hiai": 8, "trt": 9,
}
#: The CPU backend reports 13 (CPU_EXTENSION: SIMD/fp16 kernels) where it has them.
CPU_CODES = frozenset({0, 13})
GPU_BACKENDS = ("opencl", "vulkan", "cuda", "metal", "opengl")

#: BackendConfig enums, as pymnn wants them: integers (strings are ignored for memory/power).
PRECISION_MODES: dict[str, int] = {"normal": 0, "high": 1, "low": 2, "low_bf16": 3}
MEMORY_MODES: dict[str, int] = {"normal": 0, "high": 1, "low": 2}
POWER_MODES: dict[str, int] = {"normal": 0, "high": 1, "low": 2}

def _clock_helpers() -> tuple[Callable[[], int], Callable[[], int], Callable[[], int]]:
    """The native runtime's clock and RSS readers, or pure-Python stand-ins without it."""
    for name in ("fleet_agent.native", "fleet_agent._native"):
        try:
            mod = importlib.import_module(name)
            return mod.monotonic_ns, mod.peak_rss_bytes, mod.current_rss_bytes
        except (ImportError, AttributeError):
            continue

    def peak() -> int:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    return time.monotonic_ns, peak, lambda: -1


monotonic_ns, peak_rss_bytes, current_rss_bytes = _clock_helpers()

_FALLBACK_RE = re.compile(r"Can't Find type=(\d+) backend, use (\d+) instead")
_MNN: Any = None


def mnn() -> Any:
    """``import MNN`` with its import-time print kept off the agent's stdout."""
    global _MNN
    if _MNN is None:
        with capture_fds():
            import MNN

        _MNN = MNN
    return _MNN


def mnn_version() -> str:
    return str(mnn().version())


def backend_name(code: int) -> str:
    if code in CPU_CODES:
        return "cpu"
    for name, value in BACKEND_CODES.items():
        if value == code:
            return name
    return f"type{code}"


def _mode(table: Mapping[str, int], value: Any, what: str) -> str:
    """Normalise a mode given as a name or as pymnn's integer to its name."""
    if isinstance(value, bool):
        raise UsageError(f"{what} must be a name or an integer, not {value!r}", field=what)
    if isinstance(value, int):
        for name, code in table.items():
            if code == value:
                return name
    elif isinstance(value, str) and value.lower() in table:
        return value.lower()
    raise UsageError(f"unknown {what} {value!r}; known: {', '.join(table)}", field=what)


@dataclass(frozen=True)
class RuntimeConfig:
    """One way to run a model: backend, precision, memory and power modes, threads.

    For GPU backends MNN reads ``threads`` (``numThread``) as a mode mask (tuning level,
    buffer/image memory); 4 is MNN's default there.
    """

    backend: str = "cpu"
    precision: str = "normal"
    memory: str = "normal"
    power: str = "normal"
    threads: int = 1

    def __post_init__(self) -> None:
        backend = self.backend.lower()
        if backend not in BACKEND_CODES:
            raise UsageError(f"unknown backend {self.backend!r}; known: "
                             f"{', '.join(BACKEND_CODES)}", field="backend")
        object.__setattr__(self, "backend", backend)
        object.__setattr__(self, "precision", _mode(PRECISION_MODES, self.precision,
                                                    "precision"))
        object.__setattr__(self, "memory", _mode(MEMORY_MODES, self.memory, "memory"))
        object.__setattr__(self, "power", _mode(POWER_MODES, self.power, "power"))
        if not isinstance(self.threads, int) or self.threads < 1:
            raise UsageError(f"threads must be a positive integer, not {self.threads!r}",
                             field="threads")

    @property
    def backend_code(self) -> int:
        return BACKEND_CODES[self.backend]

    def schedule(self) -> dict[str, int]:
        """The dict ``Interpreter.createSession`` / ``nn.create_runtime_manager`` take."""
        return {
            "backend": self.backend_code,
            "numThread": self.threads,
            "precision": PRECISION_MODES[self.precision],
            "memory": MEMORY_MODES[self.memory],
            "power": POWER_MODES[self.power],
        }

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "precision": self.precision, "memory": self.memory,
                "power": self.power, "threads": self.threads}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RuntimeConfig:
        """Accept our names (``threads``) and MNN-LLM's (``backend_type``, ``thread_num``)."""
        return cls(
            backend=str(data.get("backend", data.get("backend_type", "cpu"))),
            precision=data.get("precision", "normal"),
            memory=data.get("memory", "normal"),
            power=data.get("power", "normal"),
            threads=int(data.get("threads", data.get("thread_num", 1))),
        )

    def label(self) -> str:
        return f"{self.backend}/p-{self.precision}/m-{self.memory}/t{self.threads}"


@dataclass(frozen=True)
class Fallback:
    """One ``Can't Find type=N backend, use M instead`` line, decoded."""

    requested: int
    used: int

    def to_dict(self) -> dict[str, Any]:
        return {"requested": backend_name(self.requested), "requested_code": self.requested,
                "used": backend_name(self.used), "used_code": self.used}


def parse_fallbacks(text: str) -> list[Fallback]:
    return [Fallback(int(a), int(b)) for a, b in _FALLBACK_RE.findall(text)]


@dataclass(frozen=True)
class TensorSpec:
    """A session input: its shape (``-1`` where dynamic and not resized) and the numpy
    dtype name of MNN's session tensor (``int32`` for an int64 model input), or
    ``"unknown"`` where pymnn cannot say (a dynamic input before a resize; int8)."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def dynamic(self) -> bool:
        return any(d <= 0 for d in self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}


_HALIDE = {"float32": "Halide_Type_Float", "int32": "Halide_Type_Int",
           "uint8": "Halide_Type_Uint8", "int64": "Halide_Type_Int64",
           "float64": "Halide_Type_Double"}
UNKNOWN_DTYPE = "unknown"


def _capsule_pointer(capsule: Any) -> int:
    """The address a PyCapsule holds (pymnn's ``Tensor.getHost()``), or 0."""
    api = ctypes.pythonapi
    api.PyCapsule_GetName.restype = ctypes.c_char_p
    api.PyCapsule_GetName.argtypes = [ctypes.py_object]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    return int(api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule)) or 0)


def _session_dtype(mod: Any, tensor: Any) -> str:
    """numpy dtype name of a session tensor, read through a host copy of it."""
    if any(int(d) < 0 for d in tensor.getShape()):
        return UNKNOWN_DTYPE
    try:
        host = mod.Tensor(tensor, _host_dim(mod, tensor))
        return str(np.asarray(host.getNumpyData()).dtype)
    except Exception:  # pymnn raises bare Exception (or SystemError) for int8 tensors:
        return UNKNOWN_DTYPE  # "tensor can not be read as numpy"


def to_session_dtype(name: str, value: np.ndarray, dtype: str) -> np.ndarray:
    """``value`` converted to the session tensor's dtype, C-contiguous.

    Integers must fit the target (an int64 id above 2**31 - 1 is refused, never wrapped);
    floats are not fed to an integer tensor. ``dtype`` ``"unknown"`` (int8 session tensors)
    takes only 1-byte arrays, which :meth:`LoadedModel.run` writes byte for byte.
    Raises :class:`UsageError`.
    """
    arr = np.asarray(value)
    if dtype == UNKNOWN_DTYPE:
        if arr.dtype.itemsize != 1 or arr.dtype.kind not in "iub":
            raise UsageError(f"input {name!r}: pymnn cannot tell this session tensor's type "
                             f"(int8?) and a {arr.dtype} array cannot be fed byte for byte",
                             input=name)
        return np.ascontiguousarray(arr)
    target = np.dtype(dtype)
    if arr.dtype == target:
        return np.ascontiguousarray(arr)
    if target.kind in "iu":
        if arr.dtype.kind == "f":
            raise UsageError(f"input {name!r}: {arr.dtype} data for an integer ({dtype}) "
                             "model input", input=name)
        if arr.size and arr.dtype.kind in "iu":
            info = np.iinfo(target)
            lo, hi = int(arr.min()), int(arr.max())
            if lo < info.min or hi > info.max:
                raise UsageError(f"input {name!r}: values [{lo}, {hi}] do not fit MNN's "
                                 f"{dtype} session tensor", input=name)
    elif arr.dtype.kind not in "fiub":
        raise UsageError(f"unsupported input dtype {arr.dtype} for {name!r}", input=name)
    return np.ascontiguousarray(arr.astype(target))


def _host_dim(mod: Any, tensor: Any) -> Any:
    """Host layout for a session tensor: its own NCHW/NHWC, NCHW for the packed C4 form."""
    dim = tensor.getDimensionType()
    if dim == mod.Tensor_DimensionType_Tensorflow:
        return mod.Tensor_DimensionType_Tensorflow
    return mod.Tensor_DimensionType_Caffe


@dataclass
class LoadedModel:
    """An interpreter and one session of it, with what loading it revealed."""

    path: str
    config: RuntimeConfig
    interpreter: Any
    session: Any
    load_ns: int
    effective_code: int
    fallbacks: list[Fallback]
    log: list[str]
    inputs: dict[str, TensorSpec] = field(default_factory=dict)
    _out_hosts: dict[str, tuple[Any, Any]] = field(default_factory=dict, repr=False)

    @property
    def effective_backend(self) -> str:
        return backend_name(self.effective_code)

    @property
    def fell_back(self) -> bool:
        """True when MNN ran something other than what was asked (CPU is CPU, whatever code)."""
        if self.config.backend == "cpu":
            return self.effective_backend != "cpu"
        return bool(self.fallbacks) or self.effective_backend != self.config.backend

    @classmethod
    def open(cls, path: str, config: RuntimeConfig, *, cache_file: str | None = None,
             input_shapes: Mapping[str, tuple[int, ...]] | None = None) -> LoadedModel:
        """Load ``path`` (a file or ``/proc/self/fd/N``) and create one session."""
        mod = mnn()
        start = monotonic_ns()
        with capture_fds() as cap:
            try:
                interp = mod.Interpreter(str(path))
                if cache_file:
                    interp.setCacheFile(str(cache_file))
                session = interp.createSession(config.schedule())
            except Exception as exc:  # pymnn raises bare Exception
                raise InvalidModelError(f"MNN cannot load {path}: {exc}", path=str(path),
                                        log=[]) from exc
            if input_shapes:
                tensors = interp.getSessionInputAll(session)
                for name, shape in input_shapes.items():
                    if name not in tensors:
                        raise UsageError(f"input spec names unknown input {name!r}",
                                         input=name)
                    interp.resizeTensor(tensors[name], tuple(int(d) for d in shape))
                interp.resizeSession(session)
            code = int(interp.getSessionInfo(session, 2))
        load_ns = monotonic_ns() - start
        log = cap.lines()
        model = cls(path=str(path), config=config, interpreter=interp, session=session,
                    load_ns=load_ns, effective_code=code, fallbacks=parse_fallbacks(
                        cap.combined), log=log)
        model.inputs = model._input_specs()
        return model

    def _input_specs(self) -> dict[str, TensorSpec]:
        mod = mnn()
        specs: dict[str, TensorSpec] = {}
        with capture_fds():
            for name, tensor in self.interpreter.getSessionInputAll(self.session).items():
                specs[name] = TensorSpec(tuple(int(d) for d in tensor.getShape()),
                                         _session_dtype(mod, tensor))
        return specs

    def prepare(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``feeds`` converted once to the session dtypes, so a timed loop copies only.

        Resizes the session first where an array's shape differs from the input's.
        """
        with capture_fds():
            self._resize_for(feeds)
        return {k: to_session_dtype(k, v, self._input_dtype(k)) for k, v in feeds.items()}

    def _input_dtype(self, name: str) -> str:
        spec = self.inputs.get(name)
        if spec is None:
            raise UsageError(f"model has no input {name!r}", input=name)
        return spec.dtype

    def _resize_for(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Resize inputs whose session shape differs from the array fed (dynamic ones)."""
        tensors = self.interpreter.getSessionInputAll(self.session)
        resized = False
        for name, value in feeds.items():
            tensor = tensors.get(name)
            if tensor is None:
                raise UsageError(f"model has no input {name!r}", input=name)
            shape = tuple(int(d) for d in np.shape(value))
            if tuple(int(d) for d in tensor.getShape()) != shape:
                self.interpreter.resizeTensor(tensor, shape)
                resized = True
        if resized:
            self.interpreter.resizeSession(self.session)
            self._out_hosts.clear()
            self.inputs = self._input_specs()

    def output_names(self) -> list[str]:
        with capture_fds():
            return sorted(self.interpreter.getSessionOutputAll(self.session))

    def session_memory_mb(self) -> float:
        with capture_fds():
            return float(self.interpreter.getSessionInfo(self.session, 0))

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Copy inputs in, run, and read every output back to numpy (the sync GPU needs).

        Each input is converted to its session tensor's dtype (:func:`to_session_dtype`;
        a no-op for arrays from :meth:`prepare`) and the session is resized first where
        an array's shape differs from the input's.

        Reading the outputs back is what makes an asynchronous backend finish its work
        (FIELD-NOTES 4), so a caller that times this call times the whole inference.
        """
        mod = mnn()
        interp, session = self.interpreter, self.session
        self._resize_for(feeds)
        tensors = interp.getSessionInputAll(session)
        for name, value in feeds.items():
            tensor = tensors[name]
            dtype = self._input_dtype(name)
            arr = to_session_dtype(name, value, dtype)
            if dtype == UNKNOWN_DTYPE:
                _write_raw(mod, tensor, arr, name)
                continue
            host = mod.Tensor(tuple(arr.shape), getattr(mod, _HALIDE[dtype]), arr,
                              _host_dim(mod, tensor))
            tensor.copyFromHostTensor(host)
        interp.runSession(session)
        out: dict[str, np.ndarray] = {}
        for name, tensor in interp.getSessionOutputAll(session).items():
            cached = self._out_hosts.get(name)
            if cached is None or cached[0] is not tensor:
                cached = (tensor, mod.Tensor(tensor, _host_dim(mod, tensor)))
                self._out_hosts[name] = cached
            tensor.copyToHostTensor(cached[1])
            out[name] = np.array(cached[1].getNumpyData(), copy=True)
        return out

    def run_quiet(self, feeds: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray],
                                                                   list[str]]:
        """:meth:`run` with MNN's prints captured; returns the outputs and the log lines."""
        with capture_fds() as cap:
            out = self.run(feeds)
        return out, cap.lines()

    def close(self) -> None:
        with capture_fds():
            self._out_hosts.clear()
            self.session = None
            self.interpreter = None


def _write_raw(mod: Any, tensor: Any, arr: np.ndarray, name: str) -> None:
    """Copy a 1-byte-per-element array into a host tensor of the session's own type.

    For session tensors pymnn cannot build a host tensor for (int8). Memory-safe: the host
    buffer holds ``count`` elements of at least one byte and exactly ``count`` bytes are
    written, ``count`` checked against the array.
    """
    host = mod.Tensor(tensor, _host_dim(mod, tensor))
    count = int(np.prod([int(d) for d in host.getShape()], dtype=np.int64))
    if count != arr.size or arr.dtype.itemsize != 1:
        raise UsageError(f"input {name!r}: {arr.size} element(s) of {arr.dtype} for a "
                         f"session tensor of {count}", input=name)
    address = _capsule_pointer(host.getHost())
    if not address:
        raise UsageError(f"input {name!r}: no host buffer to write into", input=name)
    ctypes.memmove(address, arr.ctypes.data, arr.nbytes)
    tensor.copyFromHostTensor(host)
