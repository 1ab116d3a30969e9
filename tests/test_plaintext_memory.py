"""Finding 7 (``cases/mmap-plaintext``, ``cases/core-dump-plaintext``): plaintext stays in
memory. Whatever a package's ``config.json`` or the serve ``config`` says, MNN's mmap caches
are forced off (and ``tmp_path`` dropped), the report says so; the agent and the daemon
switch core dumps off for themselves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from fleet_agent.lora_packs import LinkDir, memory_only_config

from fleet.artifacts import build_package
from tests.package_kit import make_device

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "models" / "llm" / "base"


def test_memory_only_config_forces_the_mmap_options_off() -> None:
    safe, changed = memory_only_config({"use_mmap": True, "kvcache_mmap": True,
                                        "tmp_path": "/x", "thread_num": 2})
    assert safe == {"use_mmap": False, "kvcache_mmap": False, "thread_num": 2}
    assert set(changed) == {"use_mmap", "kvcache_mmap", "tmp_path"}


def test_linked_config_is_a_memory_copy_with_mmap_off(tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"llm_model": "llm.mnn", "use_mmap": True, "tmp_path": "/t"}))
    links = LinkDir(tmp_path / "run")
    try:
        links.link("config.json", str(cfg))
        target = os.readlink(links.path / "config.json")
        assert target.startswith("/proc/self/fd/")
        seen = json.loads((links.path / "config.json").read_text())
        assert seen["use_mmap"] is False and seen["kvcache_mmap"] is False
        assert "tmp_path" not in seen and links.forced["use_mmap"]["asked"] is True
    finally:
        links.close()


@pytest.mark.parametrize("key", ["use_mmap", "kvcache_mmap"])
def test_llm_package_asking_for_mmap_serves_and_writes_nothing(tmp_path: Path, key: str
                                                                ) -> None:
    from fleet_agent.serve import open_engine

    signer = ed25519.Ed25519PrivateKey.generate()
    dev = make_device(tmp_path / "dev", signer)
    spill = tmp_path / "spill"
    spill.mkdir()
    src = tmp_path / "export"
    src.mkdir()
    for p in BASE.iterdir():
        (src / p.name).write_bytes(p.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    cfg.update({key: True, "tmp_path": str(spill)})
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "llm.fpkg"
    build_package([(p.name, p) for p in sorted(src.iterdir())], out, name="llm", version=1,
                  kind="model", recipients=[dev.recipient], signing_key=signer,
                  entry="llm.mnn", mnn_facts={"format": "mnn-llm"})
    st = dev.store()
    st.stage(out)
    st.activate("llm", 1)
    engine = open_engine(dev.ctx, model="llm",
                         config={"use_mmap": True, "kvcache_mmap": True,
                                 "tmp_path": str(spill), "thread_num": 1})
    try:
        ids, _ = engine.generate([5, 6, 7, 8], 4)
        assert ids
        assert key in engine.memory_only and engine.memory_only[key]["asked"] is True
        assert list(spill.iterdir()) == []
    finally:
        engine.close()
    assert list(spill.iterdir()) == []


def test_the_agent_switches_core_dumps_off_for_itself(tmp_path: Path) -> None:
    import resource

    code = ("import json, resource, ctypes\n"
            "from fleet_agent.cli import main\n"
            f"main(['--root', {str(tmp_path / 'r')!r}, 'status'])\n"
            "libc = ctypes.CDLL(None)\n"
            "print(json.dumps([list(resource.getrlimit(resource.RLIMIT_CORE)),"
            " libc.prctl(3, 0, 0, 0, 0)]))\n")
    hard = resource.getrlimit(resource.RLIMIT_CORE)[1]

    def raise_core() -> None:  # inherit the most permissive limit the system allows
        resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))

    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         preexec_fn=raise_core, check=True, timeout=60)
    limit, dumpable = json.loads(res.stdout.strip().splitlines()[-1])
    assert limit == [0, 0] and dumpable == 0
