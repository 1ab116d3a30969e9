"""What an ``.mnn`` file is: validated by loading it with MNN, then described.

``validate_mnn(path)`` loads the file with ``MNN.nn.load_module_from_file`` (anything MNN
cannot load is ``InvalidModelError``) and returns the facts that go into a manifest:
version, bizCode, inputs and outputs (name, shape, dtype, layout, from
``MNN.expr.load_as_dict``), and the weight storage.

The weight storage (fp16, quantization bits, block size) is read from the flatbuffer by
:func:`fleet.core.mnn.weights.inspect_weights` (pymnn does not tell it).

Loading runs in a child process (:func:`fleet.artifacts.isolate.run_isolated`): MNN can
crash natively on a legal model, and its prints (banner, ``getshape: unable to get variable
info``) must stay off the command's stdout, which carries JSON. :func:`quiet_stdout` does
the same for in-process callers.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fleet.artifacts.isolate import run_isolated
from fleet.core import errors
from fleet.core.mnn.weights import inspect_weights

__all__ = [
    "inspect_llm_folder",
    "inspect_model",
    "inspect_weights",
    "is_llm_folder",
    "quiet_stdout",
    "validate_mnn",
]

@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Send C-level writes to fd 1 to fd 2 for the duration (MNN's import banner)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        with contextlib.suppress(Exception):
            ctypes.CDLL(None).fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def _tensor_facts(var: Any) -> dict[str, Any]:
    """Shape (``-1`` for a dynamic dim, None when MNN cannot tell even the rank), dtype and
    layout of one ``MNN.expr`` variable. pymnn raises ``SystemError`` reading ``shape`` or
    ``data_format`` of a tensor whose shape needs a resize first (an output behind a
    dynamic input) and prints ``getshape: unable to get variable info``; each fact is read
    on its own so one that cannot be read is None, not a crash."""
    def name_of(v: Any) -> str:
        return str(v).rsplit(".", 1)[-1]

    facts: dict[str, Any] = {"shape": None, "dtype": None, "format": None}
    with contextlib.suppress(Exception):  # dynamic or unknown shape: SystemError
        facts["shape"] = [int(d) if int(d) >= 0 else -1 for d in var.shape]
    for key, attr in (("dtype", "dtype"), ("format", "data_format")):
        with contextlib.suppress(Exception):  # the same
            facts[key] = name_of(getattr(var, attr))
    return facts


def _describe(p: Path) -> dict[str, Any]:
    """Load ``p`` with MNN and describe it: run in an isolated child (MNN may crash)."""
    from fleet.core.mnn.fdcapture import capture_fds
    from fleet.core.mnn.session import mnn

    with capture_fds():
        mod = mnn()
        try:
            module = mod.nn.load_module_from_file(str(p), [], [])
            info = module.get_info()
        except Exception:  # pymnn raises SystemError/Exception for a bad file
            raise errors.InvalidModelError(f"{p} is not a loadable MNN model",
                                           path=str(p)) from None
        try:
            tensors = mod.expr.load_as_dict(str(p))
        except Exception:
            tensors = {}
        inputs = [{"name": n, **_tensor_facts(tensors[n])} if n in tensors else {"name": n}
                  for n in info.get("inputNames", [])]
        outputs = [{"name": n, **_tensor_facts(tensors[n])} if n in tensors else {"name": n}
                   for n in info.get("outputNames", [])]
    weights = inspect_weights(p)
    bits = weights["bits"]
    blocks = weights["blocks"]
    return {
        "format": "mnn", "mnn_version": str(info.get("version", "")),
        "biz_code": str(info.get("bizCode", "")), "inputs": inputs, "outputs": outputs,
        "weights": weights,
        "quant_bits": bits[0] if len(bits) == 1 else (bits or None),
        "quant_block": blocks[0] if len(blocks) == 1 else (blocks or None),
        "fp16": weights["fp16_layers"] > 0,
    }


def validate_mnn(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load ``path`` with MNN in an isolated child and return its facts.

    Raises InvalidModelError (exit 9) when the file is missing, MNN cannot load it, or MNN
    crashes on it (``"validating m.mnn: MNN crashed (SIGILL)"``)."""
    p = Path(path)
    if not p.is_file():
        raise errors.InvalidModelError(f"{p}: no such model file", path=str(p))
    with p.open("rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise errors.InvalidModelError(f"{p} is not an MNN model (too short)", path=str(p))
    facts: dict[str, Any] = run_isolated(_describe, p, what=f"validating {p.name}",
                                         error=errors.InvalidModelError)
    return facts


#: the name ``fleet.rollout.packaging`` uses: validate and describe in one call
inspect_model = validate_mnn


def is_llm_folder(folder: str | os.PathLike[str]) -> bool:
    return (Path(folder) / "config.json").is_file() and (Path(folder) / "llm.mnn").is_file()


def inspect_llm_folder(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Facts of an MNN-LLM export folder (``config.json`` + ``llm.mnn`` + weights).

    pymnn's Module loader cannot open ``llm.mnn`` (its graph needs the LLM runtime), so the
    folder is validated by its config and by reading the weight layout from the file."""
    root = Path(folder)
    cfg_path = root / "config.json"
    if not cfg_path.is_file() or not (root / "llm.mnn").is_file():
        raise errors.InvalidModelError(
            f"{root} is not an MNN-LLM folder (needs config.json and llm.mnn)", path=str(root))
    import json

    try:
        config = json.loads(cfg_path.read_text())
    except ValueError as exc:
        raise errors.InvalidModelError(f"{cfg_path}: not JSON", path=str(cfg_path)) from exc
    info = inspect_weights(root / "llm.mnn")
    bits, blocks = info.get("bits") or [], info.get("blocks") or []
    return {"format": "mnn-llm", "config": {k: config.get(k) for k in
                                            ("backend_type", "thread_num", "precision",
                                             "memory", "llm_model", "llm_weight")},
            "quant_layers": info.get("quant_layers", 0),
            "quant_bits": bits[0] if len(bits) == 1 else (bits or None),
            "quant_block": blocks[0] if len(blocks) == 1 else (blocks or None)}
