"""Fetch PaddleOCR's text detector and angle classifier (ONNX) from the RapidOCR wheel.

Source: ``rapidocr_onnxruntime==1.4.4`` wheel on PyPI (Apache-2.0, RapidAI/RapidOCR), which
ships PaddleOCR's models converted to ONNX (PaddleOCR itself is Apache-2.0):
- ``rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx``: DB text detector, input ``x``
  float32 ``[N, 3, H, W]`` (all dynamic; H and W multiples of 32), output a probability map
  ``[N, 1, H, W]``;
- ``rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx``: text-line angle
  classifier (0/180 degrees), input ``x`` float32 ``[N, 3, H, W]`` (48x192 in use), output
  ``[N, 2]``.
Both have dynamic H and W, so they need ``--input-shape`` (FIELD-NOTES "Dynamic shapes"):
:data:`SHAPES` are the shapes RapidOCR feeds them (a 320x320 page for the detector).

Run: ``python models/fetch_paddleocr.py`` -> prints the paths (cached, idempotent): each
``.onnx``, its float ``.mnn`` (conversion checked against onnxruntime at that shape) and its
golden ``.npz`` (the same reference run).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _cache import cache_dir, download_wheel, extract_member

REQUIREMENT = "rapidocr_onnxruntime==1.4.4"
WHEEL_PREFIX = "rapidocr_onnxruntime-1.4.4"
MEMBERS = {"det": "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
           "cls": "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"}
#: ``--input-shape`` per model: input name -> shape
SHAPES: dict[str, dict[str, tuple[int, ...]]] = {"det": {"x": (1, 3, 320, 320)},
                                                 "cls": {"x": (1, 3, 48, 192)}}


def fetch_onnx() -> dict[str, Path]:
    """``{"det": det.onnx, "cls": cls.onnx}`` extracted from the wheel (pip download)."""
    out = cache_dir() / "paddleocr"
    out.mkdir(exist_ok=True)
    wheel = None
    paths = {}
    for key, member in MEMBERS.items():
        dest = out / Path(member).name
        if not dest.is_file():
            wheel = wheel or download_wheel(REQUIREMENT, WHEEL_PREFIX)
            extract_member(wheel, member, dest)
        paths[key] = dest
    return paths


def fetch() -> dict[str, Path]:
    """The ONNX files plus, per model, its float ``.mnn`` and golden ``.npz``:
    keys ``det``, ``det.mnn``, ``det.golden``, ``cls``, ``cls.mnn``, ``cls.golden``."""
    from fleet.artifacts.convert import convert_model

    paths = dict(fetch_onnx())
    for key in MEMBERS:
        src = paths[key]
        mnn = src.with_suffix(".mnn")
        golden = src.with_suffix(".golden.npz")
        if not mnn.is_file() or not golden.is_file():
            result = convert_model(src, mnn, input_shapes=SHAPES[key])
            assert result.golden is not None
            golden.write_bytes(result.golden)
        paths[f"{key}.mnn"], paths[f"{key}.golden"] = mnn, golden
    return paths


if __name__ == "__main__":
    for name, path in fetch().items():
        print(f"{name}: {path}")
