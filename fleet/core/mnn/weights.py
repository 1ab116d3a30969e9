"""Weight storage of an ``.mnn`` file, read from its flatbuffer (no MNN needed).

pymnn does not tell the weight-quantization bits, so they are read from the model's
flatbuffer (schema ``MNN.fbs``/``CaffeOp.fbs``): for each Convolution2D / InnerProduct op
with an ``IDSTQuan`` parameter, ``type`` 3 is fp16 storage, and for quantized weights
the bits come from the value-table size at the head of ``buffer`` (byte after the shape:
N distinct values, 0 meaning 256, bits = ceil(log2 N)); MNN >= 3 also writes the bits to
``aMax``, which is used when the buffer is external (MNN-LLM ``llm.mnn.weight``). A
block size is reported when ``readType`` (number of scale groups) exceeds the output
channels: block = input channels x kernel area / (readType / output channels).

Shared by the controller (manifest facts) and the agent (LoRA export checks). Malformed
bytes raise :class:`~fleet.core.errors.InvalidModelError`, never an IndexError.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path
from typing import Any

from fleet.core import errors

__all__ = ["inspect_weights"]

# OpParameter union indexes (MNN.fbs; the union is append-only).
_P_CONV2D = 9
_P_INNER_PRODUCT = 20


class _Fb:
    """Just enough of a flatbuffers reader (little-endian tables, vtables, vectors)."""

    def __init__(self, data: bytes) -> None:
        self.b = data

    def u32(self, o: int) -> int:
        return int(struct.unpack_from("<I", self.b, o)[0])

    def i32(self, o: int) -> int:
        return int(struct.unpack_from("<i", self.b, o)[0])

    def field(self, t: int, slot: int) -> int | None:
        vt = t - self.i32(t)
        vlen = int(struct.unpack_from("<H", self.b, vt)[0])
        if 4 + 2 * slot >= vlen:
            return None
        fo = int(struct.unpack_from("<H", self.b, vt + 4 + 2 * slot)[0])
        return t + fo if fo else None

    def scalar(self, t: int, slot: int, fmt: str, default: int = 0) -> int:
        p = self.field(t, slot)
        return default if p is None else int(struct.unpack_from(fmt, self.b, p)[0])

    def table(self, t: int, slot: int) -> int | None:
        p = self.field(t, slot)
        return None if p is None else p + self.u32(p)

    def vector(self, t: int, slot: int) -> tuple[int, int] | None:
        p = self.field(t, slot)
        if p is None:
            return None
        v = p + self.u32(p)
        return v + 4, self.u32(v)


def _bits_from_buffer(fb: _Fb, buf: tuple[int, int], use_int32: bool) -> int | None:
    start, length = buf
    if length < 2:
        return None
    dims = fb.b[start]
    head = 1 + dims * (4 if use_int32 else 2)
    if head >= length:
        return None
    count = fb.b[start + head] or 256
    return max(1, math.ceil(math.log2(count)))


def inspect_weights(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Weight storage of the conv / fully-connected layers (see the module docstring)."""
    fb = _Fb(Path(path).read_bytes())
    out: dict[str, Any] = {"float_layers": 0, "fp16_layers": 0, "quant_layers": 0,
                           "bits": [], "blocks": []}
    try:
        ops = fb.vector(fb.u32(0), 3)
        for k in range(ops[1] if ops else 0):
            e = ops[0] + 4 * k  # type: ignore[index]
            op = e + fb.u32(e)
            ptype = fb.scalar(op, 1, "<B")
            main = fb.table(op, 2)
            if ptype not in (_P_CONV2D, _P_INNER_PRODUCT) or main is None:
                continue
            quan = fb.table(main, 3 if ptype == _P_CONV2D else 7)
            if quan is None:
                out["float_layers"] += 1
                continue
            qtype = fb.scalar(quan, 2, "<i")
            if qtype == 3:
                out["fp16_layers"] += 1
                continue
            buf = fb.vector(quan, 0)
            bits = _bits_from_buffer(fb, buf, bool(fb.scalar(quan, 3, "<B"))) if buf else None
            if bits is None:
                bits = fb.scalar(quan, 7, "<i") or None  # aMax holds the bits in MNN >= 3
            out["quant_layers"] += 1
            if bits and bits not in out["bits"]:
                out["bits"].append(bits)
            common = fb.table(main, 0) if ptype == _P_CONV2D else None
            groups = fb.scalar(quan, 9, "<i")  # readType: number of scale groups
            if common is not None and groups:
                oc = fb.scalar(common, 10, "<i")
                ic = fb.scalar(common, 11, "<i")
                area = fb.scalar(common, 2, "<i", 1) * fb.scalar(common, 3, "<i", 1)
                if oc and groups > oc and groups % oc == 0:
                    block = ic * area // (groups // oc)
                    if block not in out["blocks"]:
                        out["blocks"].append(block)
    except (struct.error, IndexError, TypeError) as exc:
        raise errors.InvalidModelError(f"{path}: cannot read MNN op list", path=str(path)
                                       ) from exc
    out["bits"].sort()
    out["blocks"].sort()
    return out
