"""Each audit rule reproduced from a real situation (FIELD-NOTES), plus its negative."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from fleet_agent.audit_rules import RULES, Finding, audit
from fleet_agent.gpucache import prepare_cache
from fleet_agent.healthbench import health_check
from fleet_agent.runtime_config import read_runtime_config, write_runtime_config

from fleet.artifacts.convert import convert_model
from fleet.core.golden import Golden
from fleet.core.mnn.session import mnn

TINY_DIR = Path(__file__).resolve().parents[1] / "models" / "tiny"
DIGEST = "a" * 64
PROBE: dict[str, Any] = {
    "cpu": {"arch": "x86_64", "usable_cores": 2,
            "features": {"avx2": True, "avx512f": True, "avx512_vnni": True}},
    "gpu": {"opencl": {"status": "found",
                       "devices": [{"name": "pocl", "fp16": False, "driver_version": "6"}]}},
}
ARM_FP16: dict[str, Any] = {"cpu": {"arch": "aarch64", "features": {"asimdhp": True}},
                            "gpu": {}}


def _ids(findings: list[Finding]) -> set[str]:
    return {f.id for f in findings}


def _cfg(tmp_path: Path, data: dict[str, Any], name: str = "runtime.json") -> dict[str, Any]:
    slot = tmp_path / "slot"
    slot.mkdir(exist_ok=True)
    (slot / name).write_text(json.dumps(data))
    cfg = read_runtime_config(slot)
    assert cfg is not None
    return cfg


def _audit(tmp_path: Path, report: dict[str, Any] | None, cfg: dict[str, Any] | None,
           probe: dict[str, Any] = PROBE, **kw: Any) -> list[Finding]:
    return audit(report, probe=probe, runtime_config=cfg, cache_root=tmp_path / "cache",
                 model_digest=kw.pop("digest", DIGEST), device_id="dev-1", **kw)


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real health report of tiny.mnn whose configured backend is OpenCL."""
    tmp = tmp_path_factory.mktemp("tiny")
    report = health_check(str(TINY_DIR / "tiny.mnn"), probe=PROBE,
                          golden=Golden.load(TINY_DIR / "tiny.golden.npz"),
                          cache_dir=tmp / "cache", warmup=1, iterations=2,
                          configured={"backend": "opencl"}, model_digest=DIGEST,
                          device_id="dev-1")
    return report.to_dict()


def test_every_rule_has_severity_title_and_fix() -> None:
    assert len(RULES) >= 8
    for rule in RULES.values():
        assert rule.id.startswith("FA") and rule.severity in ("error", "warning", "info")
        assert rule.title and rule.fix


def test_fa001_gpu_usable_and_built_but_config_pins_cpu(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, {"llm_model": "llm.mnn", "backend_type": "cpu"}, "config.json")
    # An Android-style build that has OpenCL (the wheel here does not):
    found = _audit(tmp_path, None, cfg, build={"backends": {"cpu": True, "opencl": True}})
    assert "FA001" in _ids(found)
    # With this wheel's real build facts there is nothing better: no finding.
    real = _audit(tmp_path, None, cfg, build={"backends": {"cpu": True, "opencl": False}})
    assert "FA001" not in _ids(real)


def test_fa002_configured_opencl_silently_runs_on_cpu(tmp_path: Path,
                                                     tiny_report: dict[str, Any]) -> None:
    cfg = _cfg(tmp_path, {"backend": "opencl", "threads": 4})
    found = [f for f in _audit(tmp_path, tiny_report, cfg) if f.id == "FA002"]
    assert found and found[0].evidence["effective"] == "cpu" and found[0].evidence["measured"]
    # Without a report, the build facts predict it.
    predicted = _audit(tmp_path, None, cfg, build=tiny_report["build"])
    assert any(f.id == "FA002" and not f.evidence["measured"] for f in predicted)
    cpu_cfg = _cfg(tmp_path, {"backend": "cpu"})
    assert "FA002" not in _ids(_audit(tmp_path, None, cpu_cfg, build=tiny_report["build"]))


def test_fa003_broken_quantized_variant_fails_against_golden(tmp_path: Path) -> None:
    wq4 = convert_model(TINY_DIR / "outlier.onnx", tmp_path / "outlier-wq4.mnn",
                        variant="wq4").path
    report = health_check(str(wq4), probe={"cpu": {"usable_cores": 1}}, warmup=0,
                          iterations=1, golden=Golden.load(TINY_DIR / "outlier.golden.npz"),
                          cache_dir=tmp_path / "cache", model_digest=DIGEST).to_dict()
    found = [f for f in _audit(tmp_path, report, None) if f.id == "FA003"]
    assert found and all(f.severity == "error" for f in found)
    assert any(f.evidence["role"] == "all" for f in found)


def test_fa003_not_raised_for_a_healthy_model(tmp_path: Path,
                                              tiny_report: dict[str, Any]) -> None:
    assert "FA003" not in _ids(_audit(tmp_path, tiny_report, None))


def test_fa004_precision_low_without_fp16_hardware(tmp_path: Path) -> None:
    # MNN-LLM's default config says precision low; on this x86 CPU it does nothing.
    cfg = _cfg(tmp_path, {"llm_model": "llm.mnn", "backend_type": "cpu",
                          "precision": "low"}, "config.json")
    assert "FA004" in _ids(_audit(tmp_path, None, cfg))
    assert "FA004" not in _ids(_audit(tmp_path, None, cfg, probe=ARM_FP16))


def test_fa005_memory_low_on_a_float_model(tmp_path: Path, tiny_report: dict[str, Any]) -> None:
    # Real: memory low does not change a float model's session memory at all.
    MNN = mnn()
    sizes = []
    for mode in (0, 2):
        interp = MNN.Interpreter(str(TINY_DIR / "tiny.mnn"))
        sizes.append(interp.getSessionInfo(interp.createSession({"memory": mode}), 0))
    assert sizes[0] == sizes[1]
    cfg = _cfg(tmp_path, {"backend": "cpu", "memory": "low"})
    assert tiny_report["model"]["weight_quantized"] is False
    assert "FA005" in _ids(_audit(tmp_path, tiny_report, cfg))


def test_fa006_memory_given_as_string_is_ignored_by_pymnn(tmp_path: Path) -> None:
    wq = convert_model(TINY_DIR / "tiny.onnx", tmp_path / "tiny-wq8.mnn", variant="wq8").path
    MNN = mnn()
    mem = {}
    for value in (0, 2, "low"):
        interp = MNN.Interpreter(str(wq))
        mem[value] = interp.getSessionInfo(interp.createSession({"memory": value}), 0)
    assert mem[2] < mem[0]          # the integer works
    assert mem["low"] == mem[0]     # the string is silently ignored
    cfg = _cfg(tmp_path, {"backend": "CPU", "numThread": 2, "memory": "low", "power": "high"})
    found = [f for f in _audit(tmp_path, None, cfg) if f.id == "FA006"]
    assert found and set(found[0].evidence["values"]) == {"memory", "power"}
    slot = tmp_path / "ours"
    slot.mkdir()
    write_runtime_config(slot, {"backend": "cpu", "memory": "low"})
    assert "FA006" not in _ids(_audit(tmp_path, None, read_runtime_config(slot)))


def test_fa007_foreign_and_shared_gpu_cache_files(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    path, check = prepare_cache(cache, model_digest=DIGEST, backend="opencl",
                                device_id="dev-1", driver="6", mnn_version="3.6.1")
    assert path is not None and check.ok
    path.write_bytes(b"compiled programs")
    assert "FA007" not in _ids(_audit(tmp_path, None, None))
    # The same folder copied from another device:
    other = tmp_path / "other-device-cache"
    prepare_cache(other, model_digest=DIGEST, backend="vulkan", device_id="dev-2",
                  driver="1", mnn_version="3.6.1")
    (other / DIGEST / "vulkan" / "mnn.cache").write_bytes(b"x")
    shutil.copytree(other / DIGEST / "vulkan", cache / DIGEST / "vulkan")
    # A cache dropped in with no sidecar, and one shared from another model's folder:
    (cache / DIGEST / "cuda").mkdir()
    (cache / DIGEST / "cuda" / "mnn.cache").write_bytes(b"x")
    shutil.copytree(cache / DIGEST / "opencl", cache / ("b" * 64) / "opencl")
    found = [f for f in _audit(tmp_path, None, None) if f.id == "FA007"]
    reasons = " | ".join(f.message for f in found)
    assert len(found) == 3
    assert "dev-2" in reasons and "no readable owner" in reasons and "not this one" in reasons
    # And the health check refuses to hand a foreign cache to MNN:
    again, bad = prepare_cache(cache, model_digest=DIGEST, backend="vulkan", device_id="dev-1",
                               driver="1", mnn_version="3.6.1")
    assert again is None and not bad.ok


def test_fa008_avx512_cpu_with_an_avx2_only_build(tmp_path: Path,
                                                  tiny_report: dict[str, Any]) -> None:
    assert tiny_report["build"]["cpu_kernels"]["avx512"] is False  # the real wheel
    found = [f for f in _audit(tmp_path, tiny_report, None) if f.id == "FA008"]
    assert found and "avx512f" in found[0].evidence["cpu_features"]
    plain = {"cpu": {"arch": "x86_64", "features": {"avx2": True}}}
    assert "FA008" not in _ids(_audit(tmp_path, tiny_report, None, probe=plain))


def test_fa009_report_missing_or_for_another_file(tmp_path: Path,
                                                  tiny_report: dict[str, Any]) -> None:
    assert "FA009" in _ids(_audit(tmp_path, None, None))
    assert "FA009" in _ids(_audit(tmp_path, tiny_report, None, digest="c" * 64))
    assert "FA009" not in _ids(_audit(tmp_path, tiny_report, None))


def test_fa010_no_golden_means_variant_unchecked(tmp_path: Path) -> None:
    report = health_check(str(TINY_DIR / "tiny.mnn"), probe={"cpu": {"usable_cores": 1}},
                          golden=None, cache_dir=tmp_path / "cache", warmup=0,
                          iterations=1).to_dict()
    assert "FA010" in _ids(_audit(tmp_path, report, None))


def test_fa011_configured_slower_than_pick(tmp_path: Path) -> None:
    # Timing ratios cannot be forced on a shared CI machine; the rule reads report data.
    report = {"model": {"sha256": DIGEST}, "reference": {"variant_checked": True},
              "configured": {"label": "cpu/p-normal/m-normal/t1", "median_ms": 4.0,
                             "fell_back": False, "backend": "cpu", "effective_backend": "cpu"},
              "pick": {"label": "opencl/p-normal/m-normal/t4", "median_ms": 1.0},
              "candidates": []}
    found = [f for f in _audit(tmp_path, report, None) if f.id == "FA011"]
    assert found and found[0].evidence["ratio"] == 4.0
    report["configured"]["median_ms"] = 1.05
    assert "FA011" not in _ids(_audit(tmp_path, report, None))


def test_findings_are_sorted_most_severe_first(tmp_path: Path,
                                               tiny_report: dict[str, Any]) -> None:
    cfg = _cfg(tmp_path, {"backend": "opencl", "precision": "low", "memory": "low"})
    found = _audit(tmp_path, tiny_report, cfg)
    order = [f.severity for f in found]
    assert order == sorted(order, key=["error", "warning", "info"].index)
    assert all(f.to_dict()["fix"] for f in found)
