"""MNN's converter, called in-process, made reproducible.

- The converter is the ``_tools`` extension module. Never the ``mnnconvert`` console script
  or ``MNN.tools`` (telemetry, ``pip install`` at import; FIELD-NOTES "Converter"). Call
  these functions inside :func:`fleet.artifacts.isolate.run_isolated`: the converter and
  MNN can crash natively.
- ``_tools.mnnconvert`` prints to stdout and returns True even when the input file does
  not exist, so success is judged by the output file, never by the return value.
- Reproducible output (FIELD-NOTES "Facts found since"; case
  ``nondeterministic-onnx-redeploy``): the converter writes a random UUID
  (``MNN.get_model_uuid``) into every model it makes, so two conversions of one file differ
  byte for byte, and everything keyed by the payload digest (the version, skip-if-
  installed, resume of an interrupted push) breaks. Found by converting one ONNX file twice
  and diffing: the only differing bytes are one flatbuffer string of the ``Net`` table, a
  4-byte little-endian length 36 followed by the UUID text and a NUL. :func:`convert_file`
  rewrites that string in place, same length (so no offset moves), with a UUID made from
  SHA-256 of the source bytes, the converter flags and MNN's version: the same source,
  options and MNN version give the same bytes, and a different one gives a different id.
  Normalising was chosen over keying the artifact by source digest because the payload
  digest is what the device and the registry already trust, and because the .mnn bytes
  are then a pure function of their inputs (checked by ``tests/test_convert.py``). The
  string is looked for by its exact text from ``MNN.get_model_uuid`` and its length prefix;
  if it is not found exactly once, ConversionError (MNN changed its format: this must be
  looked at, not silently shipped as non-reproducible).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from fleet.core.errors import ConversionError

__all__ = ["FORMATS", "convert_file", "mnnconvert", "normalise_uuid"]

FORMATS = {".onnx": "ONNX", ".tflite": "TFLITE"}
_UUID_RE = re.compile(rb"\$\x00\x00\x00([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-"
                      rb"[0-9a-f]{12})\x00")


def mnnconvert(argv: list[str]) -> list[str]:
    """Run MNN's converter in-process with its prints captured; returns the log lines."""
    from fleet.core.mnn.fdcapture import capture_fds

    with capture_fds() as cap:
        from fleet.core.mnn.session import mnn

        mnn()  # import MNN quietly first: _tools shares its library
        import _tools

        _tools.mnnconvert(["mnnconvert", *argv])
    return cap.lines()


def _stable_uuid(source_sha256: str, flags: list[str], biz_code: str, version: str) -> str:
    h = hashlib.sha256("\n".join(["fleet-mnn-uuid/1", source_sha256, biz_code, version,
                                  *flags]).encode()).hexdigest()
    # RFC 9562 layout with version 8 ("custom") and the RFC variant bits
    return (f"{h[0:8]}-{h[8:12]}-8{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-"
            f"{h[20:32]}")


def normalise_uuid(path: Path, stable: str) -> str:
    """Replace the random UUID string in ``path`` with ``stable`` (36 chars); returns the
    UUID that was there. ConversionError when it is not found exactly once."""
    from fleet.core.mnn.fdcapture import capture_fds
    from fleet.core.mnn.session import mnn

    with capture_fds():
        current = str(mnn().get_model_uuid(str(path)))
    data = bytearray(path.read_bytes())
    hits = [m for m in _UUID_RE.finditer(data) if m.group(1).decode() == current]
    if len(hits) != 1 or len(stable) != 36:
        raise ConversionError(f"{path.name}: cannot make the conversion reproducible (found "
                              f"the model UUID {len(hits)} times)", uuid=current)
    start = hits[0].start(1)
    data[start:start + 36] = stable.encode()
    tmp = path.with_name(path.name + ".uuid")
    tmp.write_bytes(bytes(data))
    os.replace(tmp, path)
    return current


def convert_file(src: Path, dst: Path, fmt: str, flags: list[str], biz_code: str,
                 source_sha256: str) -> list[str]:
    """``src`` -> ``dst`` with ``flags``, byte-reproducible; the converter's log lines.
    ConversionError when no model comes out."""
    from fleet.core.mnn.session import mnn_version

    dst.unlink(missing_ok=True)
    log = mnnconvert(["-f", fmt, "--modelFile", str(src), "--MNNModel", str(dst),
                      "--bizCode", biz_code, *flags])
    if not dst.is_file() or dst.stat().st_size == 0:
        tail = " | ".join(log[-5:]) or "no output"
        raise ConversionError(f"MNN converter produced no model from {src.name}: {tail}",
                              source=str(src), log=log[-20:])
    normalise_uuid(dst, _stable_uuid(source_sha256, [fmt, *flags], biz_code, mnn_version()))
    return log
