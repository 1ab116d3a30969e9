"""LoRA hot-swap on a serving MNN-LLM: the committed fixture (models/llm) packaged, staged in
a real device store, served by a real ``fleet-agent serve`` daemon process.

The daemon decrypts the base and each adapter into memfds; MNN opens them through links.
Every test talks to it over its Unix socket, as the agent verbs and apps do.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from fleet_agent.lora_packs import lora_add, lora_list, lora_remove, lora_swap
from fleet_agent.serve_protocol import ServeClient, call

from fleet.artifacts import base_binding, build_package
from fleet.artifacts.mnninfo import inspect_weights
from fleet.core import errors
from fleet.core.package import Manifest
from tests.package_kit import Device, make_device

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "models" / "llm"
ADAPTERS = ("adapter_a", "adapter_b", "adapter_bad")


def _ref(name: str) -> dict[str, Any]:
    path = FIX / "base.ref.json" if name == "base" else FIX / "lora" / f"{name}.ref.json"
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


@dataclass
class Kit:
    dev: Device
    base: Manifest
    packs: dict[str, Path]
    socket: Path
    tmp: Path


def _build_base(tmp: Path, signer: ed25519.Ed25519PrivateKey, dev: Device) -> tuple[Path, Manifest]:
    folder = FIX / "base"
    files = [(p.name, p) for p in sorted(folder.iterdir()) if p.is_file()]
    info = inspect_weights(folder / "llm.mnn")
    facts = {"format": "mnn-llm", "quant_bits": info["bits"][0], "quant_block": info["blocks"][0]}
    out = tmp / "llm-v1.fpkg"
    m = build_package(files, out, name="llm", version=1, kind="model",
                      recipients=[dev.recipient], signing_key=signer, entry="llm.mnn",
                      mnn_facts=facts)
    return out, m


def _build_pack(tmp: Path, signer: ed25519.Ed25519PrivateKey, dev: Device, name: str,
                version: int, binding: dict[str, Any], *, ref: str | None = None) -> Path:
    refp = tmp / f"{name}-{version}.ref.json"
    refp.write_text(json.dumps(_ref(ref or name)))
    out = tmp / f"{name}-v{version}.fpkg"
    build_package([("lora.mnn", FIX / "lora" / f"{name}.mnn"), ("reference.json", refp)], out,
                  name=name, version=version, kind="lora", recipients=[dev.recipient],
                  signing_key=signer, entry="lora.mnn",
                  mnn_facts={"format": "mnn-llm-lora", "quant_bits": 8, "quant_block": 64},
                  base=binding, golden="reference.json")
    return out


def _start(root: Path, sock: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleet_agent", "--root", str(root), "serve", "--args",
         json.dumps({"model": "llm", "socket": str(sock), "thread_num": 1})],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited: {proc.stderr.read().decode()[-2000:]}"
                                 if proc.stderr else "daemon exited")
        try:
            call(sock, "ping", timeout=2)
            return proc
        except errors.FleetError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("daemon did not come up")


def _stop(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    return dict(json.loads(out.decode().strip().splitlines()[-1])) if out.strip() else {}


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kit]:
    tmp = tmp_path_factory.mktemp("lora")
    signer = ed25519.Ed25519PrivateKey.generate()
    dev = make_device(tmp / "dev", signer)
    base_pkg, base_m = _build_base(tmp, signer, dev)
    st = dev.store()
    st.stage(base_pkg)
    st.activate("llm", 1)
    binding = base_binding(base_m)
    packs = {name: _build_pack(tmp, signer, dev, name, 1, binding) for name in ADAPTERS}
    packs["adapter_a_v2"] = _build_pack(tmp, signer, dev, "adapter_a", 2, binding)
    other = dict(binding, llm_weight_sha256="0" * 64)
    packs["wrong_base"] = _build_pack(tmp, signer, dev, "adapter_b", 7, other)
    sock = tmp / "serve.sock"
    yield Kit(dev, base_m, packs, sock, tmp)


@pytest.fixture(scope="module")
def daemon(kit: Kit) -> Iterator[subprocess.Popen[bytes]]:
    proc = _start(kit.dev.ctx.root, kit.socket)
    for name in ADAPTERS:
        lora_add(kit.dev.ctx, {"path": str(kit.packs[name])})
    yield proc
    if proc.poll() is None:
        _stop(proc)


def _args(kit: Kit, **kw: Any) -> dict[str, Any]:
    return {"socket": str(kit.socket), **kw}


def _expected(label: str) -> list[tuple[list[int], list[int]]]:
    name = "base" if label == "base" else label.split("@")[0]
    r = _ref(name)
    return list(zip(r["prompts"], r["expected"], strict=True))


def test_base_and_adapters_reproduce_transformers_references(kit: Kit, daemon: Any) -> None:
    c = ServeClient(kit.socket)
    try:
        lora_swap(kit.dev.ctx, _args(kit, name=None))
        for prompt, want in _expected("base"):
            doc = c.call("generate", ids=prompt, max_new_tokens=len(want))
            assert (doc["ids"], doc["adapter"]) == (want, "base")
        text = c.call("generate", text="The fleet controller keeps", max_new_tokens=8)
        assert text["text"].strip().startswith("a registry")
        out = lora_swap(kit.dev.ctx, _args(kit, name="adapter_a"))
        assert out["adapter"] == "adapter_a@1" and out["check"]["prompts"] == 3
        for prompt, want in _expected("adapter_a"):
            assert c.call("generate", ids=prompt, max_new_tokens=8)["ids"] == want
        text = c.call("generate", text="The fleet controller keeps", max_new_tokens=8)
        assert text["text"].strip().startswith("seven gree")
    finally:
        c.close()


def test_twenty_swaps_under_continuous_load_fail_no_request(kit: Kit, daemon: Any) -> None:
    lora_swap(kit.dev.ctx, _args(kit, name="adapter_a"))
    refs = {label: _expected(label) for label in ("base", "adapter_a@1", "adapter_b@1")}
    prompts = [p for p, _ in refs["base"]]
    results: list[tuple[int, dict[str, Any]]] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def client() -> None:
        with ServeClient(kit.socket) as c:
            i = 0
            while not stop.is_set():
                k = i % len(prompts)
                try:
                    results.append((k, c.request({"op": "generate", "ids": prompts[k],
                                                  "max_new_tokens": 8})))
                except BaseException as exc:  # any failure counts
                    failures.append(exc)
                i += 1

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    plan = ["adapter_b", "adapter_a", None, "adapter_b", "adapter_a"] * 4
    swaps = []
    try:
        for name in plan:
            swaps.append(lora_swap(kit.dev.ctx, _args(kit, name=name)))
            time.sleep(0.02)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert len(swaps) == 20
    assert not failures
    assert results and all(doc.get("ok") for _, doc in results), \
        [d for _, d in results if not d.get("ok")][:3]
    seen = set()
    for k, doc in results:
        label = doc["adapter"]
        seen.add(label)
        assert doc["ids"] == refs[label][k][1], (label, k, doc["ids"])
    assert seen == {"base", "adapter_a@1", "adapter_b@1"}
    assert len(results) > 40


def test_pack_bound_to_another_base_is_refused_and_old_adapter_serves(
        kit: Kit, daemon: Any) -> None:
    lora_swap(kit.dev.ctx, _args(kit, name="adapter_a"))
    with pytest.raises(errors.BaseMismatchError) as exc:
        lora_add(kit.dev.ctx, {"path": str(kit.packs["wrong_base"])})
    assert "llm_weight_sha256" in exc.value.details["mismatches"]
    status = call(kit.socket, "status")
    assert status["adapter"] == "adapter_a@1"
    prompt, want = _expected("adapter_a")[0]
    assert call(kit.socket, "generate", ids=prompt, max_new_tokens=8)["ids"] == want


def test_buggy_split_export_fails_its_reference_check_and_is_refused(
        kit: Kit, daemon: Any) -> None:
    lora_swap(kit.dev.ctx, _args(kit, name="adapter_b"))
    with pytest.raises(errors.ReferenceMismatchError) as exc:
        lora_swap(kit.dev.ctx, _args(kit, name="adapter_bad"))
    # llmexport 0.0.5 dropped every delta: the adapter answers exactly like the base
    prompt0 = _ref("adapter_bad")["prompts"][exc.value.details["prompt"]]
    base = dict((tuple(p), e) for p, e in _expected("base"))
    assert exc.value.details["got"] == base[tuple(prompt0)]
    status = call(kit.socket, "status")
    assert status["adapter"] == "adapter_b@1" and status["refused"] >= 1
    prompt, want = _expected("adapter_b")[1]
    assert call(kit.socket, "generate", ids=prompt, max_new_tokens=8)["ids"] == want


def test_corrupt_pack_is_refused_and_nothing_lands(kit: Kit, daemon: Any) -> None:
    data = bytearray(kit.packs["adapter_a_v2"].read_bytes())
    data[-100] ^= 0x01
    bad = kit.tmp / "corrupt.fpkg"
    bad.write_bytes(bytes(data))
    before = sorted(p.name for p in kit.dev.ctx.store.iterdir())
    with pytest.raises(errors.PackageError):
        lora_add(kit.dev.ctx, {"path": str(bad), "swap": True})
    assert sorted(p.name for p in kit.dev.ctx.store.iterdir()) == before
    assert call(kit.socket, "status")["adapter"] in ("adapter_a@1", "adapter_b@1")


def test_list_remove_rollback_and_no_plaintext_on_disk(kit: Kit, daemon: Any) -> None:
    lora_swap(kit.dev.ctx, _args(kit, name="adapter_a"))
    lora_swap(kit.dev.ctx, _args(kit, name="adapter_b"))
    back = lora_swap(kit.dev.ctx, _args(kit, rollback=True))
    assert (back["adapter"], back["previous"]) == ("adapter_a@1", "adapter_b@1")
    listing = lora_list(kit.dev.ctx, _args(kit))
    assert {p["name"] for p in listing["packs"]} == set(ADAPTERS)
    assert listing["daemon"]["adapter"] == "adapter_a@1"
    assert listing["persisted"]["label"] == "adapter_a@1"
    gone = lora_remove(kit.dev.ctx, _args(kit, name="adapter_a"))
    assert gone["removed"] and gone["adapter"] == "base"
    # the daemon's model folder holds links into its own fd table, never model bytes
    run = kit.dev.ctx.root / "run"
    links = [p for d in run.iterdir() if d.is_dir() for p in d.iterdir()]
    assert links and all(p.is_symlink() and os.readlink(p).startswith("/proc/self/fd/")
                         for p in links)
    weight = (FIX / "base" / "llm.mnn.weight").read_bytes()
    needle = weight[len(weight) // 2: len(weight) // 2 + 64]
    for p in kit.dev.ctx.root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            assert needle not in p.read_bytes(), p


def test_killed_daemon_restarts_serving_the_last_good_adapter(kit: Kit, daemon: Any) -> None:
    lora_swap(kit.dev.ctx, _args(kit, name="adapter_b"))
    with pytest.raises(errors.ReferenceMismatchError):  # a refused swap changes nothing
        lora_swap(kit.dev.ctx, _args(kit, name="adapter_bad"))
    daemon.kill()  # SIGKILL: no chance to save anything on the way out
    daemon.wait(timeout=30)
    proc = _start(kit.dev.ctx.root, kit.socket)
    try:
        status = call(kit.socket, "status")
        assert status["adapter"] == "adapter_b@1" and status["restore_error"] is None
        for prompt, want in _expected("adapter_b"):
            assert call(kit.socket, "generate", ids=prompt, max_new_tokens=8)["ids"] == want
    finally:
        summary = _stop(proc)
    assert summary["ok"] and summary["stopped"]
