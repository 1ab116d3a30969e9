"""Fetch MediaPipe's short-range face detector (TFLite) from the PyPI wheel; convert to MNN.

Source: ``mediapipe==0.10.21`` wheel (Apache-2.0),
``mediapipe/modules/face_detection/face_detection_short_range.tflite`` (1x128x128x3 input).
Run: ``python models/fetch_mediapipe.py`` -> prints the paths (cached, idempotent).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _cache import cache_dir, download_wheel, extract_member

REQUIREMENT = "mediapipe==0.10.21"
MEMBER = "mediapipe/modules/face_detection/face_detection_short_range.tflite"


def fetch() -> dict[str, Path]:
    """The ``.tflite``, its float ``.mnn`` conversion and the golden ``.npz``."""
    from fleet.artifacts.convert import convert_model
    from fleet.artifacts.reference import make_golden

    out = cache_dir() / "mediapipe"
    out.mkdir(exist_ok=True)
    tflite = out / "face_detection_short_range.tflite"
    if not tflite.is_file():
        extract_member(download_wheel(REQUIREMENT, "mediapipe-0.10.21"), MEMBER, tflite)
    mnn = out / "face_detection_short_range.mnn"
    if not mnn.is_file():
        convert_model(tflite, mnn)
    golden = out / "face_detection_short_range.golden.npz"
    if not golden.is_file():
        golden.write_bytes(make_golden(tflite, n=2, seed=0))
    return {"tflite": tflite, "mnn": mnn, "golden": golden}


if __name__ == "__main__":
    for key, path in fetch().items():
        print(f"{key}: {path}")
