"""The agent on Arm without a board: fp16 candidate gating, emulation marking, the Arm audit
rules (FA004, FA012-FA014) and the cross-arch bootstrap's pure parts, on fake probe
documents shaped like the ones the lab's qemu boards really produce (docs/probe.md).
The lab test (tests/test_arm_lab.py) runs the same code on real emulated boards."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest
from fleet_agent.audit_rules import RULES, Finding, audit
from fleet_agent.candidates import enumerate_candidates
from fleet_agent.mnn_cpu import cpu_fp16, cpu_key, parse_banner
from fleet_agent.policy import pick
from fleet_agent.runtime_config import read_runtime_config

from fleet.bootstrap import python_tag
from fleet.bootstrap_board import BoardPlatform, controller_platform
from fleet.bootstrap_cross import (
    _check_headers,
    _retarget,
    agent_requirements,
    download_dependencies,
    glibc_needed,
)
from fleet.core import errors
from fleet.core.mnn.session import RuntimeConfig

DIGEST = "b" * 64
_EMU = {"emulator": "qemu", "real_executable": "/run/fleetlab/qemu/qemu-aarch64-static",
        "evidence": ["/proc/thread-self/exe is /run/fleetlab/qemu/qemu-aarch64-static"]}
#: cpu sections as the lab's boards print them (QEMU 7.2 `max` and `cortex-a53`).
MAX_PROBE: dict[str, Any] = {"schema": "fleet.probe/1", "gpu": {}, "cpu": {
    "arch": "arm64", "vendor": "software", "model": "0x00:0x051", "usable_cores": 1,
    "features_source": "hwcap", "fp16_arith": True, "int8_dot": True, "emulated": "qemu",
    "features": {"asimd": True, "fphp": True, "asimdhp": True, "asimddp": True, "i8mm": True,
                 "bf16": True, "sve": True, "sve2": True, "sme": True, "sme2": False,
                 "neon": True},
    "details": {"midr": "0x000f0510", "emulation": _EMU}}}
A53_PROBE: dict[str, Any] = {"schema": "fleet.probe/1", "gpu": {}, "cpu": {
    "arch": "arm64", "vendor": "ARM", "model": "Cortex-A53", "usable_cores": 1,
    "features_source": "hwcap", "fp16_arith": False, "int8_dot": False, "emulated": "qemu",
    "features": {"asimd": True, "fphp": False, "asimdhp": False, "asimddp": False,
                 "i8mm": False, "bf16": False, "sve": False, "sve2": False, "sme": False,
                 "sme2": False, "neon": True},
    "details": {"midr": "0x410fd034", "emulation": _EMU}}}
REAL_ARM = copy.deepcopy(MAX_PROBE)
REAL_ARM["cpu"].update(emulated=None, model="Cortex-A76", details={})
#: MNN 3.6.1's load-time line on the two CPUs (FIELD-NOTES "Arm under emulation").
BANNER_MAX = "The device supports: i8sdot:1, fp16:1, i8mm: 1, sve2: 1, sme2: 0"
BANNER_A53 = "The device supports: i8sdot:0, fp16:0, i8mm: 0, sve2: 0, sme2: 0"


def _build(arm82: bool | None, banner: str | None) -> dict[str, Any]:
    return {"backends": {"cpu": True}, "cpu_kernels": {"arm82_fp16": arm82},
            "cpu_runtime": parse_banner(banner or "")}


def _labels(probe: dict[str, Any], build: dict[str, Any] | None, *, wq: bool = False
            ) -> tuple[set[str], list[Any]]:
    cands, skipped = enumerate_candidates(probe, {"cpu": True}, weight_quantized=wq,
                                          build=build)
    return {c.config.label() for c in cands}, skipped


def test_mnn_banner_is_parsed_as_mnn_prints_it() -> None:
    doc = parse_banner(f"noise\n{BANNER_MAX}\n")
    assert doc == {"banner": BANNER_MAX, "fp16": True, "i8sdot": True, "i8mm": True,
                   "sve2": True, "sme2": False}
    assert parse_banner("nothing here")["fp16"] is None
    assert cpu_key().split(":")[0] in ("x86_64", "aarch64")


def test_fp16_candidate_needs_the_cpu_and_mnn_arm82() -> None:
    labels, _ = _labels(MAX_PROBE, _build(True, BANNER_MAX))
    assert labels == {"cpu/p-normal/m-normal/t1", "cpu/p-low/m-normal/t1"}
    # the CPU has no fp16 (cortex-a53): not offered, and the reason says so
    labels, skipped = _labels(A53_PROBE, _build(True, BANNER_A53))
    assert labels == {"cpu/p-normal/m-normal/t1"}
    reason = next(s.reason for s in skipped if s.variant == "precision=low")
    assert "no fp16 arithmetic" in reason
    # fp16 hardware, but an MNN without ARM82 kernels, or MNN itself says fp16:0
    for build, words in ((_build(False, BANNER_MAX), "no ARM82"),
                         (_build(True, BANNER_A53), "fp16:0")):
        labels, skipped = _labels(MAX_PROBE, build)
        assert not any("p-low" in label for label in labels)
        assert words in next(s.reason for s in skipped if s.variant == "precision=low")
    # no build facts: the hardware alone decides (the old behaviour)
    assert "cpu/p-low/m-normal/t1" in _labels(MAX_PROBE, None)[0]
    assert cpu_fp16(MAX_PROBE, None) == (None, cpu_fp16(MAX_PROBE, None)[1])


def test_memory_low_only_for_weight_quantized_models() -> None:
    labels, skipped = _labels(MAX_PROBE, _build(True, BANNER_MAX))
    assert not any("m-low" in label for label in labels)
    assert any(s.variant == "memory=low" for s in skipped)
    labels, _ = _labels(A53_PROBE, _build(True, BANNER_A53), wq=True)
    assert labels == {"cpu/p-normal/m-normal/t1", "cpu/p-normal/m-low/t1"}


class _Result:
    def __init__(self, label: str, ms: float, status: str = "passed") -> None:
        b, p, m, t = label.split("/")
        self.config = RuntimeConfig(b, precision=p[2:], memory=m[2:], threads=int(t[1:]))
        self.status, self.median_ms = status, ms


def test_pick_on_an_emulated_cpu_is_marked_but_still_picks() -> None:
    results = [_Result("cpu/p-normal/m-normal/t1", 9.0), _Result("cpu/p-low/m-normal/t1", 5.0)]
    chosen, reasons = pick(results, emulated="qemu")
    assert chosen is not None and chosen.config.precision == "low"
    doc = chosen.to_dict()
    assert doc["emulated"] == "qemu" and doc["timings_representative"] is False
    assert any("not representative" in r for r in reasons)
    plain, _ = pick(results)
    assert plain is not None and plain.to_dict()["timings_representative"] is True


def _cand(label: str, status: str, ms: float, cosine: float) -> dict[str, Any]:
    b, p, m, t = label.split("/")
    return {"label": label, "status": status, "timing": {"median_ms": ms},
            "config": {"backend": b, "precision": p[2:], "memory": m[2:],
                       "threads": int(t[1:])},
            "comparison": {"passed": status == "passed", "worst_cosine": cosine,
                           "reasons": [] if status == "passed" else
                           ["output 'probs': cosine 0.91 < 0.995"]}}


def _report(build: dict[str, Any], low_status: str, *, emulated: str | None = "qemu"
            ) -> dict[str, Any]:
    return {"model": {"sha256": DIGEST, "weight_quantized": False},
            "reference": {"kind": "golden", "variant_checked": True}, "build": build,
            "emulated": emulated, "candidates": [
                _cand("cpu/p-normal/m-normal/t1", "passed", 9.0, 1.0),
                _cand("cpu/p-low/m-normal/t1", low_status, 5.0, 0.99999)],
            "configured": {"label": "cpu/p-normal/m-normal/t1", "median_ms": 9.0,
                           "fell_back": False, "backend": "cpu", "effective_backend": "cpu"},
            "pick": {"label": "cpu/p-low/m-normal/t1", "median_ms": 5.0}}


def _run(tmp_path: Path, report: dict[str, Any] | None, config: dict[str, Any],
         probe: dict[str, Any]) -> dict[str, Finding]:
    slot = tmp_path / "slot"
    slot.mkdir(exist_ok=True)
    (slot / "runtime.json").write_text(json.dumps(config))
    found = audit(report, probe=probe, runtime_config=read_runtime_config(slot),
                  cache_root=tmp_path / "cache", model_digest=DIGEST, device_id="arm-1")
    return {f.id: f for f in found}


def test_arm_audit_rules(tmp_path: Path) -> None:
    assert {"FA012", "FA013", "FA014"} <= set(RULES)
    good = _build(True, BANNER_MAX)
    # fp16 available and correct, config says normal: FA012; emulated: FA014, no FA011
    found = _run(tmp_path, _report(good, "passed"), {"backend": "cpu"}, MAX_PROBE)
    assert {"FA012", "FA014"} <= set(found) and "FA011" not in found
    assert found["FA012"].evidence["label"] == "cpu/p-low/m-normal/t1"
    assert "emulated" in found["FA012"].message
    assert found["FA014"].evidence["real_executable"].endswith("qemu-aarch64-static")
    # on real hardware the same speed gap is FA011, and no FA014
    found = _run(tmp_path, _report(good, "passed", emulated=None), {"backend": "cpu"},
                 REAL_ARM)
    assert {"FA011", "FA012"} <= set(found) and "FA014" not in found
    # fp16 in use and wrong for this model: FA013 (error), not FA012
    found = _run(tmp_path, _report(good, "failed"), {"backend": "cpu", "precision": "low"},
                 MAX_PROBE)
    assert found["FA013"].severity == "error" and "FA012" not in found
    assert "cosine" in found["FA013"].message
    # precision low without fp16: the CPU lacks it (a53), or MNN lacks ARM82
    found = _run(tmp_path, _report(_build(True, BANNER_A53), "passed"),
                 {"backend": "cpu", "precision": "low"}, A53_PROBE)
    assert "FA004" in found and "no fp16 arithmetic" in found["FA004"].message
    found = _run(tmp_path, _report(_build(False, BANNER_MAX), "passed"),
                 {"backend": "cpu", "precision": "low"}, MAX_PROBE)
    assert "no ARM82" in found["FA004"].message
    # the healthy fp16 case raises none of the fp16 rules
    found = _run(tmp_path, _report(good, "passed"), {"backend": "cpu", "precision": "low"},
                 MAX_PROBE)
    assert not {"FA004", "FA012", "FA013"} & set(found)


AARCH64 = BoardPlatform.from_doc({
    "machine": "aarch64", "implementation": "cpython", "python": [3, 11, 2], "abiflags": "",
    "soabi": "cpython-311-aarch64-linux-gnu", "ext_suffix": ".cpython-311-aarch64-linux-gnu.so",
    "libc": ["glibc", "2.36"], "abi_vars": controller_platform().abi_vars})


def test_board_platform_tags_and_pip_platforms() -> None:
    assert AARCH64.tag == "cp311-aarch64" and AARCH64.abi_tag == "cp311"
    plats = AARCH64.pip_platforms()
    assert plats[0] == "manylinux_2_36_aarch64" and "manylinux_2_17_aarch64" in plats
    assert "manylinux2014_aarch64" in plats and "manylinux_2_37_aarch64" not in plats
    assert controller_platform().tag == python_tag()
    musl = BoardPlatform.from_doc({**AARCH64.to_dict(), "libc": ["", ""],
                                   "python": [3, 11, 2]})
    with pytest.raises(errors.UsageError, match="glibc"):
        musl.pip_platforms()


def test_agent_requirements_are_the_agents_only_and_pinned() -> None:
    from fleet.bootstrap import runtime_requirements

    reqs = agent_requirements(runtime_requirements(), AARCH64)
    names = {r.split("==")[0] for r in reqs}
    assert {"numpy", "mnn", "cryptography", "tuf", "cffi", "urllib3"} <= names
    assert not names & {"typer", "rich", "sqlmodel", "alembic", "paramiko", "adbutils",
                        "tidevice"}
    assert "mnn==3.6.1" in reqs and all("==" in r for r in reqs)


def test_headers_are_refused_for_another_python() -> None:
    _check_headers(AARCH64)  # same CPython and ABI as this controller: fine
    other = BoardPlatform.from_doc({**AARCH64.to_dict(), "python": [3, 12, 3],
                                    "libc": ["glibc", "2.36"]})
    with pytest.raises(errors.UsageError, match=r"3\.12"):
        _check_headers(other)
    debug = BoardPlatform.from_doc({**AARCH64.to_dict(), "libc": ["glibc", "2.36"],
                                    "abi_vars": {**AARCH64.abi_vars, "Py_DEBUG": 1}})
    with pytest.raises(errors.UsageError, match="Py_DEBUG"):
        _check_headers(debug)


def _rec(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def test_retargeted_wheel_swaps_native_files_and_tag(tmp_path: Path) -> None:
    base = tmp_path / "mnn_fleet-0.1.0-cp311-cp311-linux_x86_64.whl"
    with zipfile.ZipFile(base, "w") as zf:
        zf.writestr("fleet_agent/__init__.py", "")
        zf.writestr("fleet_agent/_native.cpython-311-x86_64-linux-gnu.so", b"x86 module")
        zf.writestr("fleet_agent/bin/fleet-probe", b"x86 probe")
        zf.writestr("mnn_fleet-0.1.0.dist-info/WHEEL",
                    "Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: cp311-cp311-linux_x86_64\n")
        zf.writestr("mnn_fleet-0.1.0.dist-info/RECORD", "stale\n")
    probe, module = tmp_path / "fleet-probe", tmp_path / "_native.so"
    probe.write_bytes(b"\x7fELF arm probe GLIBC_2.17\0 GLIBC_2.34\0")
    module.write_bytes(b"\x7fELF arm module GLIBC_2.17\0")
    assert glibc_needed([probe, module]) == (2, 34)
    out = _retarget(base, tmp_path, AARCH64, probe, module)
    assert out.name == "mnn_fleet-0.1.0-cp311-cp311-linux_aarch64.whl"
    with zipfile.ZipFile(out) as zf:
        names = zf.namelist()
        assert "fleet_agent/_native.cpython-311-x86_64-linux-gnu.so" not in names
        assert zf.read("fleet_agent/_native.cpython-311-aarch64-linux-gnu.so") == \
            module.read_bytes()
        assert zf.read("fleet_agent/bin/fleet-probe") == probe.read_bytes()
        assert (zf.getinfo("fleet_agent/bin/fleet-probe").external_attr >> 16) & 0o111
        wheel = zf.read("mnn_fleet-0.1.0.dist-info/WHEEL").decode()
        assert "Tag: cp311-cp311-linux_aarch64" in wheel and "x86_64" not in wheel
        record = zf.read("mnn_fleet-0.1.0.dist-info/RECORD").decode().splitlines()
        assert f"fleet_agent/bin/fleet-probe,sha256={_rec(probe.read_bytes())}," \
               f"{len(probe.read_bytes())}" in record
        assert names[-1] == "mnn_fleet-0.1.0.dist-info/RECORD"


def test_a_dependency_without_a_wheel_for_the_board_is_named(tmp_path: Path) -> None:
    """Real pip against the package index: pywin32 has Windows wheels only."""
    with pytest.raises(errors.NotFoundError) as info:
        download_dependencies(tmp_path, AARCH64, ["pywin32==306"])
    msg = str(info.value)
    assert "pywin32==306" in msg and "aarch64" in msg and "\n" not in msg
    assert not list(tmp_path.glob("deps-*"))  # nothing half-made left in the cache
