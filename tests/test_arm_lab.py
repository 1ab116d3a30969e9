"""Arm boards for real: two arm64 lab boards in qemu-user, bootstrapped from this x86-64
controller, real models deployed, fp16 judged by the golden check (issue 17).

One module-scoped lab: a ``max`` board (QEMU's most capable CPU: fp16, dotprod, i8mm,
SVE2, SME; ``pauth=off`` only spares the emulation of pointer authentication, which MNN
does not use and which doubles the time of every emulated Python start) and a
``cortex-a53`` board (Armv8.0: no fp16 arithmetic). Both are made by ``fleet lab up
--arch arm64`` (the arm64 Debian root is built by debootstrap on first use and cached in
``$FLEET_LAB_CACHE`` or ``/var/cache/fleet-lab``), bootstrapped with ``fleet device
bootstrap`` (cross-built wheel, aarch64 wheels of the agent's dependencies), enrolled,
and given MTCNN ONet, its ``wq8`` variant and the MediaPipe face detector
(``models/fetch_mtcnn.py``, ``models/fetch_mediapipe.py``).

What is real: the arm64 userland, the aarch64 MNN wheel and its Arm kernels (ARM82 fp16
on ``max``), the golden checks. What is not: the CPU is emulated, so no timing here means
anything (the reports say so; nothing below compares speeds). The results (candidate
tables, probe documents, phase times) are written to ``build/arm-lab/results.json``.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleet_agent.probe import stable_view
from fleet_agent.runtime_config import write_runtime_config

from fleet.bootstrap_board import BoardPlatform, controller_platform
from fleet.bootstrap_cross import wheelhouse_for
from fleet.connect import open_device
from fleet.core.mnn.session import RuntimeConfig
from fleet.home import FleetHome
from fleet.lab import arm_binfmt, iot
from fleet.registry import Registry

# The module's lab is made in the first test's setup: a cold root build takes minutes.
pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / "build" / "wheelhouse-cache"
OUT = REPO / "build" / "arm-lab"
CPUS = {"max": "max,pauth=off", "a53": "cortex-a53"}
#: Timings mean nothing on an emulated CPU: one timed run per candidate.
DEPLOY = ["--iterations", "1", "--warmup", "0", "--workers", "2", "--json"]
#: What Debian bookworm's arm64 python3 says (fleet.bootstrap_board): the wheelhouse for it
#: is made while the root is built (cores idle otherwise); bootstrap then finds it cached,
#: or makes its own if the board says anything else.
BOOKWORM_ARM64 = {"machine": "aarch64", "implementation": "cpython", "python": [3, 11, 2],
                  "abiflags": "", "soabi": "cpython-311-aarch64-linux-gnu",
                  "ext_suffix": ".cpython-311-aarch64-linux-gnu.so", "libc": ["glibc", "2.36"]}


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"_fetch_{name}",
                                                  REPO / "models" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fleet(home: FleetHome, *args: str, timeout: float = 900) -> dict[str, Any] | list[Any]:
    """The real CLI in a process of its own (several run at once)."""
    res = subprocess.run([sys.executable, "-m", "fleet", "--home", str(home.path), *args],
                         capture_output=True, text=True, timeout=timeout, check=False)
    assert res.returncode == 0, f"fleet {' '.join(args)}: {res.stdout[-3000:]}\n" \
                                f"{res.stderr[-3000:]}"
    doc: dict[str, Any] | list[Any] = json.loads(res.stdout)
    return doc


def _agent(home: FleetHome, device: str, method: str, /, **kw: Any) -> dict[str, Any]:
    """One agent call through the registered transport (``AgentClient.<method>(**kw)``;
    ``kw`` may hold ``verb`` itself, for ``call``)."""
    reg = Registry.open(home)
    try:
        transport, agent = open_device(home, reg.get_device(device))
    finally:
        reg.close()
    with transport:
        result: dict[str, Any] = getattr(agent, method)(**kw)
        return result


class ArmLab:
    def __init__(self, home: FleetHome) -> None:
        self.home = home
        self.boards: dict[str, dict[str, Any]] = {}  # "max"/"a53" -> lab record
        self.times: dict[str, float] = {}
        self.results: dict[str, Any] = {}

    def name(self, key: str) -> str:
        return str(self.boards[key]["name"])

    def timed(self, phase: str, t0: float) -> None:
        self.times[phase] = round(time.monotonic() - t0, 1)


@pytest.fixture(scope="module")
def arm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ArmLab]:
    if os.geteuid() != 0:
        pytest.fail("the Arm lab needs root (namespaces, binfmt_misc, mounts); CI is root")
    home = FleetHome(Path(tmp_path_factory.mktemp("armhome")).resolve())
    Registry.init(home).close()
    lab = ArmLab(home)
    fetched: dict[str, Any] = {}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        # the models and the aarch64 wheelhouse are made natively while the root is built
        models = pool.submit(lambda: (_load("fetch_mtcnn").fetch(),
                                      _load("fetch_mediapipe").fetch()))
        board = BoardPlatform.from_doc({**BOOKWORM_ARM64,
                                        "abi_vars": controller_platform().abi_vars})
        house = pool.submit(wheelhouse_for, WHEELS, board)
        try:
            t0 = time.monotonic()
            for key in ("max", "a53"):  # one call per CPU model: the second adds a board
                made = _fleet(home, "lab", "up", "--iot", "1", "--arch", "arm64", "--cpu",
                              CPUS[key], "--json", timeout=3600)
                assert isinstance(made, list) and len(made) == 1
                assert made[0]["enrolled"] == "needs bootstrap"
                lab.boards[key] = iot.board(home, made[0]["name"])
            lab.timed("lab_up_s (root build included when cold)", t0)
            t0 = time.monotonic()
            house.result()
            boots = {key: pool.submit(_fleet, home, "device", "bootstrap", lab.name(key),
                                      "--cache", str(WHEELS), "--json", timeout=1800)
                     for key in ("max", "a53")}
            lab.results["bootstrap"] = {k: f.result() for k, f in boots.items()}
            lab.timed("bootstrap_both_s", t0)
            _fleet(home, "keys", "init", "--json")  # enrollment pins its root of trust
            for key in ("max", "a53"):
                _fleet(home, "device", "enroll", lab.name(key), "--json")
            fetched = dict(zip(("mtcnn", "face"), models.result(), strict=True))
            targets = [a for key in ("max", "a53") for a in ("-d", lab.name(key))]
            mt, face = fetched["mtcnn"], fetched["face"]
            t0 = time.monotonic()
            lab.results["deploy"] = {
                "onet": _fleet(home, "deploy", str(mt["onet.mnn"]), "--golden",
                               str(mt["onet.golden"]), "--name", "onet", *targets, *DEPLOY),
                "onet-wq8": _fleet(home, "deploy", str(mt["onet.onnx"]), "--variant", "wq8",
                                   "--name", "onet-wq8", *targets, *DEPLOY),
                "face": _fleet(home, "deploy", str(face["mnn"]), "--golden",
                               str(face["golden"]), "--name", "face", *targets, *DEPLOY)}
            lab.timed("deploy_3_models_to_both_s", t0)
            t0 = time.monotonic()
            lab.results["reports"] = {key: {m["name"]: m for m in _agent(
                home, lab.name(key), "audit", name=None)["models"]} for key in ("max", "a53")}
            lab.results["probe"] = {key: _agent(home, lab.name(key), "probe")
                                    for key in ("max", "a53")}
            lab.timed("reports_and_probes_s", t0)
            yield lab
        finally:
            _write_results(lab)
            iot.down(home)


def _table(reports: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per model, one row per candidate: what the closing note shows."""
    out: dict[str, list[dict[str, Any]]] = {}
    for model, rep in sorted(reports.items()):
        rows = []
        for c in rep.get("candidates", []):
            cmp = c.get("comparison") or {}
            parts = dict(p.split("-", 1) for p in str(c.get("label")).split("/") if "-" in p)
            rows.append({"label": c.get("label"), "precision": parts.get("p"),
                         "memory": parts.get("m"), "status": c.get("status"),
                         "golden_passed": cmp.get("passed"),
                         "worst_cosine": cmp.get("worst_cosine"),
                         "worst_max_abs": max((o.get("max_abs") or 0.0 for o in
                                               cmp.get("outputs") or []), default=None),
                         "median_ms_emulated": (c.get("timing") or {}).get("median_ms"),
                         "picked": c["label"] == (rep.get("pick") or {}).get("label")})
        out[model] = rows
    return out


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _write_results(lab: ArmLab) -> None:
    """``build/arm-lab/``: ``results.json`` (everything), ``candidates.md`` (the tables)
    and one probe document per board (``probe-arm64-qemu-<cpu>.json``); the copies under
    ``docs/`` were taken from these."""
    OUT.mkdir(parents=True, exist_ok=True)
    reports = lab.results.get("reports", {})
    tables = {key: _table(reports[key]) for key in reports}  # label: backend/p-P/m-M/tN
    (OUT / "results.json").write_text(json.dumps(
        {"times": lab.times, "tables": tables, "boards": lab.boards, **lab.results},
        indent=2, default=str))
    lines = ["# Arm lab: candidate tables", "",
             "Made by `tests/test_arm_lab.py` (QEMU user-mode CPUs: the timings are "
             "emulated and say nothing about hardware; the golden verdicts are real).", ""]
    for key, per_model in tables.items():
        lines += [f"## `{CPUS[key]}` board", ""]
        for model, rows in per_model.items():
            ref = (reports[key][model].get("reference") or {}).get("kind")
            lines += [f"### {model} (reference: {ref})", "", "| candidate | precision | "
                      "memory | status | check passed | worst cosine | worst max abs diff | "
                      "picked |", "|---|---|---|---|---|---|---|---|"]
            lines += [f"| `{r['label']}` | {r['precision']} | {r['memory']} | {r['status']} "
                      f"| {r['golden_passed']} | {_num(r['worst_cosine'], '.9f')} | "
                      f"{_num(r['worst_max_abs'], '.2e')} | {'yes' if r['picked'] else ''} |"
                      for r in rows]
            lines.append("")
    (OUT / "candidates.md").write_text("\n".join(lines))
    for key, doc in lab.results.get("probe", {}).items():
        name = "max" if key == "max" else "cortex-a53"
        (OUT / f"probe-arm64-qemu-{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    print("arm lab phase times:", lab.times)


def _cands(arm: ArmLab, key: str, model: str) -> dict[str, dict[str, Any]]:
    return {c["label"]: c for c in arm.results["reports"][key][model]["candidates"]}


def test_lab_status_shows_arch_and_cpu_model(arm: ArmLab) -> None:
    listed = _fleet(arm.home, "lab", "status", "--json")
    assert isinstance(listed, list)
    rows = {r["name"]: r for r in listed if r["kind"] == "iot"}
    for key, cpu in CPUS.items():
        row = rows[arm.name(key)]
        assert (row["arch"], row["cpu_model"], row["sshd"]) == ("arm64", cpu, "running")
        # from the host: every process of the board is qemu with the board's -cpu
        assert row["emulator_ok"] is True, row
    assert arm_binfmt.ENTRY in os.listdir(arm_binfmt.BINFMT_DIR)


def test_bootstrap_from_x86_installs_an_aarch64_agent(arm: ArmLab) -> None:
    for key in ("max", "a53"):
        doc = arm.results["bootstrap"][key]
        assert doc["board"]["machine"] == "aarch64" and doc["wheelhouse_tag"] == "cp311-aarch64"
        assert doc["agent_status"]["ok"] is True
        assert doc["venv"] == "/root/.fleet-agent-venv"
        venv = Path(arm.boards[key]["root_dir"]) / "root/.fleet-agent-venv/lib/python3.11"
        natives = list(venv.glob("site-packages/fleet_agent/_native*.so"))
        assert [p.name for p in natives] == ["_native.cpython-311-aarch64-linux-gnu.so"]
        assert not (venv / "site-packages" / "typer").exists()  # the agent's deps only


def test_probe_documents_on_the_two_cpus(arm: ArmLab) -> None:
    docs = arm.results["probe"]
    for doc in docs.values():
        cpu = doc["cpu"]
        assert cpu["arch"] == "arm64" and cpu["features_source"] == "hwcap"
        assert cpu["emulated"] == "qemu"
        assert cpu["details"]["emulation"]["real_executable"].endswith("qemu-aarch64-static")
        assert doc["os"]["machine"] == "aarch64" and doc["os"]["libc"] == "glibc 2.36"
    big, small = docs["max"]["cpu"], docs["a53"]["cpu"]
    assert big["fp16_arith"] and big["int8_dot"]
    assert all(big["features"][f] for f in ("asimdhp", "fphp", "asimddp", "i8mm", "sve",
                                            "sve2", "sme"))
    assert not small["fp16_arith"] and not small["features"]["asimdhp"]
    assert small["model"] == "Cortex-A53" and small["details"]["midr"] == "0x410fd034"
    assert small["vendor"] == "ARM" and big["details"]["midr"] == "0x000f0510"
    # the module and the cross-built fleet-probe executable print the same document
    exe = _agent(arm.home, arm.name("a53"), "call", verb="probe",
                 args={"via": "executable"})["probe"]
    assert stable_view(exe) == stable_view(docs["a53"])


def test_fp16_measured_on_max_and_checked_against_golden(arm: ArmLab) -> None:
    rep = arm.results["reports"]["max"]["onet"]
    assert rep["reference"]["kind"] == "golden"
    cands = _cands(arm, "max", "onet")
    low, normal = cands["cpu/p-low/m-normal/t1"], cands["cpu/p-normal/m-normal/t1"]
    for c in (low, normal):
        assert c["status"] == "passed" and c["timing"]["median_ms"] > 0
        assert c["comparison"]["passed"] is True
    # fp16 really ran: its outputs differ from fp32's, within the golden thresholds
    assert low["comparison"]["worst_cosine"] < 1.0 or \
        low["comparison"]["worst_cosine"] != normal["comparison"]["worst_cosine"]
    assert rep["emulated"] == "qemu" and rep["timings_representative"] is False
    assert rep["pick"]["emulated"] == "qemu"
    assert any("not representative" in r for r in rep["pick_reasons"])


def test_fp16_not_offered_on_cortex_a53(arm: ArmLab) -> None:
    for model in ("onet", "face"):
        assert not any("p-low" in label for label in _cands(arm, "a53", model))
        assert _cands(arm, "a53", model)["cpu/p-normal/m-normal/t1"]["status"] == "passed"


def test_face_detector_runs_on_both_with_golden_verdicts(arm: ArmLab) -> None:
    assert {r["device"]: r["status"] for r in arm.results["deploy"]["face"]["results"]} == {
        arm.name("max"): "ok", arm.name("a53"): "ok"}
    low = _cands(arm, "max", "face")["cpu/p-low/m-normal/t1"]
    assert low["comparison"] is not None and low["status"] in ("passed", "failed")


def test_wq8_memory_low_candidate_runs_on_both(arm: ArmLab) -> None:
    for key in ("max", "a53"):
        cands = _cands(arm, key, "onet-wq8")
        low_mem = cands["cpu/p-normal/m-low/t1"]
        assert low_mem["timing"]["median_ms"] > 0 and low_mem["comparison"] is not None
        assert low_mem["status"] == "passed", low_mem
    assert "cpu/p-low/m-low/t1" in _cands(arm, "max", "onet-wq8")
    assert not any("m-low" in label for label in _cands(arm, "a53", "onet"))


def test_audit_shows_the_arm_rules(arm: ArmLab) -> None:
    """An operator's config that does not match the measurements: fp16 switched off on
    max (where it passed), switched on on cortex-a53 (which has none)."""
    for key, precision in (("max", "normal"), ("a53", "low")):
        slot = Path(arm.boards[key]["agent_root_host"]) / "slots" / "onet" / "v1"
        write_runtime_config(slot, RuntimeConfig("cpu", precision=precision, threads=1))
    found = {key: {f["id"] for m in _agent(arm.home, arm.name(key), "audit", name="onet")
                   ["models"] for f in m["findings"]} for key in ("max", "a53")}
    arm.results["audit"] = found
    assert {"FA012", "FA014"} <= found["max"] and "FA004" not in found["max"]
    assert {"FA004", "FA014"} <= found["a53"] and "FA012" not in found["a53"]
    cli = _fleet(arm.home, "audit", "-d", arm.name("max"), "-d", arm.name("a53"), "--json")
    text = json.dumps(cli)
    assert "FA012" in text and "FA004" in text and "FA014" in text


def test_down_removes_the_boards_and_what_the_lab_registered(arm: ArmLab) -> None:
    """Last in the module: ``lab down`` unmounts each board's root and store and removes
    the binfmt entry the lab added, unless another lab's board still uses it."""
    before = json.loads((arm_binfmt.RUN_ROOT / "arm-binfmt.json").read_text())
    ours = {str(b["binfmt_user"]) for b in arm.boards.values()}
    assert ours <= set(before["users"])
    removed = iot.down(arm.home)
    assert sorted(removed) == sorted(arm.name(k) for k in arm.boards)
    for b in arm.boards.values():
        assert not os.path.ismount(b["root_dir"]) and not Path(b["runtime_dir"]).exists()
    others = set(before["users"]) - ours
    entry = arm_binfmt.BINFMT_DIR / arm_binfmt.ENTRY
    if before.get("registered") and not others:  # the lab added it and nobody else is left
        assert not entry.exists() and not arm_binfmt.WRAPPER.exists()
    else:  # there before the lab, or another lab's board still runs on it
        assert entry.exists()
