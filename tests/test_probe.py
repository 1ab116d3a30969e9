"""The capability probe against real drivers: PoCL (OpenCL on CPU), Mesa lavapipe (Vulkan
on CPU), the CPU's own cpuid, and drivers hidden or broken for real (an empty ICD folder,
a missing library, a shared library that crashes or hangs inside clGetPlatformIDs)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fleet_agent import native
from fleet_agent.context import AgentContext
from fleet_agent.probe import (
    PROBE_SCHEMA,
    VOLATILE_FIELDS,
    mnn_backend_hints,
    probe,
    probe_executable,
    probe_verb,
    probe_via_executable,
    stable_view,
)

from fleet.core import errors

# Loader settings that hide every OpenCL ICD and Vulkan driver without touching the system.
HIDDEN_ENV = {
    "OCL_ICD_VENDORS": "/nonexistent/fleet-empty-icd-dir",
    "OPENCL_VENDOR_PATH": "/nonexistent/fleet-empty-icd-dir",
    "VK_ICD_FILENAMES": "/nonexistent/fleet-no-icd.json",
    "VK_DRIVER_FILES": "/nonexistent/fleet-no-icd.json",
}


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return probe()


@pytest.fixture(scope="module")
def exe() -> Path:
    path = probe_executable()
    assert path is not None, "fleet-probe is installed with the package"
    return path


def run_exe(exe: Path, *args: str, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **(env or {})}
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=full,
                          timeout=timeout, check=False)


def all_devices(section: dict[str, Any]) -> list[dict[str, Any]]:
    out = list(section.get("devices") or [])
    for p in section.get("platforms") or []:
        out.extend(p["devices"])
    return out


# -- the document ------------------------------------------------------------------------
def test_document_has_every_section(doc: dict[str, Any]) -> None:
    assert doc["schema"] == PROBE_SCHEMA
    assert set(doc) >= {"cpu", "memory", "os", "gpu", "npu_hints", "isolated", "elapsed_ms"}
    assert set(doc["gpu"]) == {"opencl", "vulkan", "cuda", "metal"}
    for api, section in doc["gpu"].items():
        assert section["status"] in ("found", "not_found", "failed"), api
        assert "reason" in section and "library" in section
    assert doc["cpu"]["logical_cores"] >= 1
    assert doc["cpu"]["usable_cores"] == len(os.sched_getaffinity(0))
    assert doc["memory"]["total_bytes"] > doc["memory"]["available_bytes"] > 0
    assert doc["os"]["kernel_release"] == platform.release()
    assert doc["os"]["machine"] == platform.machine()
    assert doc["isolated"] is True


def test_memory_total_matches_proc_meminfo(doc: dict[str, Any]) -> None:
    meminfo = Path("/proc/meminfo").read_text()
    kib = int(next(line.split()[1] for line in meminfo.splitlines()
                   if line.startswith("MemTotal:")))
    assert doc["memory"]["total_bytes"] == kib * 1024


def test_opencl_finds_the_pocl_cpu_device(doc: dict[str, Any]) -> None:
    cl = doc["gpu"]["opencl"]
    assert cl["status"] == "found", cl["reason"]
    pocl = [p for p in cl["platforms"] if "Portable Computing Language" in p["name"]]
    assert pocl, [p["name"] for p in cl["platforms"]]
    dev = pocl[0]["devices"][0]
    assert dev["type"] == "cpu"
    assert dev["compute_units"] >= 1
    assert dev["global_mem_bytes"] > 0
    assert dev["version"].startswith("OpenCL ")
    assert isinstance(dev["fp16"], bool)


def test_vulkan_finds_the_lavapipe_cpu_device(doc: dict[str, Any]) -> None:
    vk = doc["gpu"]["vulkan"]
    assert vk["status"] == "found", vk["reason"]
    lvp = [d for d in vk["devices"] if "llvmpipe" in d["name"]]
    assert lvp, [d["name"] for d in vk["devices"]]
    assert lvp[0]["type"] == "cpu"
    assert lvp[0]["api_version"].startswith("1.")
    assert lvp[0]["device_local_bytes"] > 0
    assert vk["instance_version"].startswith("1.")


def test_cpu_features_agree_with_proc_cpuinfo(doc: dict[str, Any]) -> None:
    flags: set[str] = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags |= set(value.split())
    feats = doc["cpu"]["features"]
    if doc["cpu"]["arch"] == "x86_64":
        assert doc["cpu"]["features_source"] == "cpuid"
        # probe name -> /proc/cpuinfo flag (the kernel's names, mostly the same)
        mapping = {name: name for name in (
            "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw",
            "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
            "amx_int8", "amx_bf16")}
        mapping["amx"] = "amx_tile"
        release = tuple(int(x) for x in platform.release().split(".")[:2])
        if release < (5, 16):
            # Kernels before 5.16 list AMX flags but never enable AMX state in XCR0, so
            # the probe rightly calls AMX unusable there.
            for key in ("amx", "amx_int8", "amx_bf16"):
                mapping.pop(key)
    else:
        assert doc["cpu"]["arch"] in ("arm64", "arm")
        mapping = {name: name for name in (
            "asimd", "fphp", "asimdhp", "asimddp", "i8mm", "bf16", "sve", "sve2", "sme",
            "sme2")}
    assert set(mapping) <= set(feats)
    assert doc["cpu"]["model"]
    disagree = {name: feats[name] for name, flag in mapping.items()
                if feats[name] != (flag in flags)}
    assert disagree == {}
    assert doc["cpu"]["int8_dot"] == any(
        feats.get(k) for k in ("avx512_vnni", "avx_vnni", "asimddp"))


def test_model_name_agrees_with_proc_cpuinfo(doc: dict[str, Any]) -> None:
    text = Path("/proc/cpuinfo").read_text()
    names = {line.split(":", 1)[1].strip() for line in text.splitlines()
             if line.startswith("model name")}
    if doc["cpu"]["arch"] == "x86_64":
        assert doc["cpu"]["model"] in names


def test_clusters_follow_cpufreq(doc: dict[str, Any]) -> None:
    cpus = sorted(Path("/sys/devices/system/cpu").glob("cpu[0-9]*"))
    freqs = {}
    for c in cpus:
        f = c / "cpufreq" / "cpuinfo_max_freq"
        if f.exists():
            freqs[int(c.name[3:])] = int(f.read_text())
    clusters = doc["cpu"]["clusters"]
    if len(freqs) < len(cpus):  # no cpufreq here (VMs): the section says so by being empty
        assert clusters == []
    else:
        assert sorted(c for cl in clusters for c in cl["cpus"]) == sorted(freqs)
        assert [cl["max_freq_khz"] for cl in clusters] == sorted(set(freqs.values()),
                                                                 reverse=True)


# -- the two front ends ------------------------------------------------------------------
def test_module_and_executable_print_the_same_document(exe: Path) -> None:
    from_module = json.loads(native.probe_json())
    proc = run_exe(exe)
    assert proc.returncode == 0, proc.stderr
    from_exe = json.loads(proc.stdout)
    assert stable_view(from_module) == stable_view(from_exe)
    # and only the declared volatile fields were dropped
    assert set(from_module) - set(stable_view(from_module)) == {
        f for f in VOLATILE_FIELDS if "." not in f}


def test_isolated_and_inline_probes_agree(exe: Path) -> None:
    isolated = json.loads(run_exe(exe, "--compact").stdout)
    inline = json.loads(run_exe(exe, "--compact", "--no-isolate").stdout)
    assert inline["isolated"] is False and isolated["isolated"] is True
    isolated.pop("isolated")
    inline.pop("isolated")
    assert stable_view(isolated) == stable_view(inline)


def test_executable_usage_and_version(exe: Path) -> None:
    assert run_exe(exe, "--bogus").returncode == 2
    version = run_exe(exe, "--version")
    assert version.returncode == 0 and PROBE_SCHEMA in version.stdout
    compact = run_exe(exe, "--compact")
    assert compact.stdout.count("\n") == 1


# -- hidden and broken drivers -----------------------------------------------------------
def test_hidden_drivers_are_not_found_and_the_probe_succeeds(exe: Path) -> None:
    proc = run_exe(exe, env=HIDDEN_ENV)
    assert proc.returncode == 0, proc.stderr
    gpu = json.loads(proc.stdout)["gpu"]
    assert gpu["opencl"]["status"] == "not_found"
    assert gpu["opencl"]["platforms"] == []
    assert "no platform" in gpu["opencl"]["reason"]
    assert gpu["vulkan"]["status"] == "not_found"
    assert gpu["vulkan"]["devices"] == []


def test_missing_libraries_are_not_found(exe: Path) -> None:
    env = {"FLEET_PROBE_OPENCL_LIBRARY": "/nonexistent/libOpenCL.so.1",
           "FLEET_PROBE_VULKAN_LIBRARY": "/nonexistent/libvulkan.so.1",
           "FLEET_PROBE_CUDA_LIBRARY": "/nonexistent/libcuda.so.1"}
    for args in ((), ("--no-isolate",)):
        proc = run_exe(exe, *args, env=env)
        assert proc.returncode == 0, proc.stderr
        gpu = json.loads(proc.stdout)["gpu"]
        for api in ("opencl", "vulkan", "cuda"):
            assert gpu[api]["status"] == "not_found", (api, gpu[api])
            assert gpu[api]["library"] is None
            assert "/nonexistent/" in gpu[api]["reason"]


def test_module_in_a_subprocess_with_hidden_drivers() -> None:
    code = ("import json; from fleet_agent.probe import probe, mnn_backend_hints; "
            "d = probe(); print(json.dumps(mnn_backend_hints(d)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **HIDDEN_ENV}, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == ["CPU"]


BROKEN_DRIVER = r"""
#include <signal.h>
#include <stdint.h>
#include <unistd.h>
int32_t clGetPlatformIDs(uint32_t n, void** ids, uint32_t* count) {
#ifdef HANG
  for (;;) pause();
#else
  raise(SIGSEGV);
#endif
  return 0;
}
int32_t clGetPlatformInfo(void) { return 0; }
int32_t clGetDeviceIDs(void) { return 0; }
int32_t clGetDeviceInfo(void) { return 0; }
"""


def build_driver(tmp_path: Path, name: str, *defines: str) -> Path:
    src = tmp_path / "broken_cl.c"
    src.write_text(BROKEN_DRIVER)
    lib = tmp_path / name
    subprocess.run(["cc", "-shared", "-fPIC", *defines, "-o", str(lib), str(src)],
                   check=True, capture_output=True, timeout=60)
    return lib


def test_a_crashing_driver_is_data_not_a_crash(exe: Path, tmp_path: Path) -> None:
    lib = build_driver(tmp_path, "libcrash.so")
    proc = run_exe(exe, env={"FLEET_PROBE_OPENCL_LIBRARY": str(lib)})
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    cl = doc["gpu"]["opencl"]
    assert cl["status"] == "failed"
    assert "signal 11" in cl["reason"]
    assert doc["gpu"]["vulkan"]["status"] == "found"  # the others still answer
    # The same driver in-process through the module: the agent survives too.
    code = ("import json; from fleet_agent.probe import probe; "
            "print(json.dumps(probe()['gpu']['opencl']))")
    sub = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "FLEET_PROBE_OPENCL_LIBRARY": str(lib)},
                         timeout=60, check=False)
    assert sub.returncode == 0, sub.stderr
    assert json.loads(sub.stdout)["status"] == "failed"


def test_a_hanging_driver_times_out(exe: Path, tmp_path: Path) -> None:
    lib = build_driver(tmp_path, "libhang.so", "-DHANG")
    proc = run_exe(exe, "--timeout-ms", "700",
                   env={"FLEET_PROBE_OPENCL_LIBRARY": str(lib)}, timeout=30)
    assert proc.returncode == 0, proc.stderr
    cl = json.loads(proc.stdout)["gpu"]["opencl"]
    assert cl["status"] == "failed"
    assert "timed out after 700 ms" in cl["reason"]


# -- Android properties (the build.prop fallback; the NDK path needs a phone) -------------
def test_android_properties_from_build_prop(exe: Path, tmp_path: Path) -> None:
    prop = tmp_path / "build.prop"
    prop.write_text("# begin build properties\nro.product.model=Pixel 8\n"
                    "ro.board.platform=zuma\nro.build.version.sdk=34\n"
                    "ro.product.manufacturer=Google\n")
    proc = run_exe(exe, env={"FLEET_PROBE_PROP_FILES": f"/nonexistent:{prop}"})
    assert proc.returncode == 0, proc.stderr
    os_doc = json.loads(proc.stdout)["os"]
    assert os_doc["name"] == "android"
    android = os_doc["android"]
    assert (android["model"], android["board_platform"], android["sdk"]) == ("Pixel 8", "zuma", 34)
    assert android["source"] == f"build_prop:{prop}"
    assert os_doc["device_model"] == "Pixel 8"


def test_no_android_properties_on_linux(doc: dict[str, Any]) -> None:
    assert doc["os"]["name"] == "linux"
    assert doc["os"]["android"] is None


# -- Python API --------------------------------------------------------------------------
def test_backend_hints_on_this_machine(doc: dict[str, Any]) -> None:
    assert mnn_backend_hints(doc) == ["CPU", "OPENCL", "VULKAN"]


def test_backend_hints_read_only_found_apis() -> None:
    doc = {"os": {"name": "android"},
           "gpu": {"opencl": {"status": "failed", "platforms": [{"devices": [{"n": 1}]}]},
                   "vulkan": {"status": "found", "devices": []},
                   "cuda": {"status": "found", "devices": [{"name": "H100"}]},
                   "metal": {"status": "found", "devices": [{"name": "Apple M2"}]}},
           "npu_hints": [{"name": "nnapi"}]}
    assert mnn_backend_hints(doc) == ["CPU", "CUDA", "METAL", "NN"]
    doc["os"] = {"name": "linux"}
    assert mnn_backend_hints(doc) == ["CPU", "CUDA", "METAL"]


def test_probe_via_executable_matches_probe(doc: dict[str, Any]) -> None:
    assert stable_view(probe_via_executable()) == stable_view(doc)


def test_probe_via_a_missing_executable_raises(tmp_path: Path) -> None:
    with pytest.raises(errors.DeviceError):
        probe_via_executable(tmp_path / "fleet-probe")


def test_bad_timeouts_are_refused() -> None:
    # The C++ ProbeError comes through py::register_exception as a RuntimeError subclass.
    with pytest.raises(native.ProbeError, match="timeout_ms") as info:
        native.probe_json(timeout_ms=0)
    assert isinstance(info.value, RuntimeError)
    with pytest.raises(errors.UsageError):
        probe(timeout_s=-1.0)


def test_probe_verb_through_the_agent_cli(tmp_path: Path) -> None:
    agent = Path(sys.executable).with_name("fleet-agent")
    proc = subprocess.run([str(agent), "--root", str(tmp_path), "probe", "--args",
                           json.dumps({"via": "executable"})],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    assert out["ok"] is True and out["verb"] == "probe"
    assert out["probe"]["schema"] == PROBE_SCHEMA
    assert out["mnn_backend_hints"][0] == "CPU"


def test_probe_verb_refuses_bad_arguments(tmp_path: Path) -> None:
    ctx = AgentContext(tmp_path)
    with pytest.raises(errors.UsageError):
        probe_verb(ctx, {"via": "carrier-pigeon"})
    with pytest.raises(errors.UsageError):
        probe_verb(ctx, {"timeout_s": 0})
