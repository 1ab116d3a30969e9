"""The Arm lab's root cache: reused only when its stamp and tree match, half-built and
changed roots rebuilt. The debootstrap run itself is replaced by a small tree here (it
takes minutes; tests/test_arm_lab.py runs the real one): what is tested is the cache's
bookkeeping around it, on real files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fleet.lab import arm_rootfs


def _fake_build(calls: list[Path]) -> Any:
    def build(tmp: Path, cache: Path, log: Any) -> None:
        calls.append(tmp)
        for rel in ("usr/bin/python3", "usr/sbin/sshd", "usr/lib/python3.11/venv/__init__.py",
                    "usr/lib/aarch64-linux-gnu/libstdc++.so.6", "etc/hostname"):
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(rel)
    return build


def test_root_is_built_once_stamped_and_checked(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(arm_rootfs, "_build", _fake_build(calls))
    monkeypatch.setattr(arm_rootfs.shutil, "which", lambda _: "/usr/sbin/debootstrap")
    info = arm_rootfs.ensure(tmp_path)
    root = Path(info["path"])
    stamp = root.with_name(root.name + ".stamp.json")
    assert len(calls) == 1 and calls[0].name.endswith(".partial") and not calls[0].exists()
    assert json.loads(stamp.read_text())["inputs"]["packages"] == list(arm_rootfs.PACKAGES)
    assert arm_rootfs.verify(root, stamp) == []
    assert arm_rootfs.ensure(tmp_path)["tree_digest"] == info["tree_digest"]
    assert len(calls) == 1  # reused
    # a changed tree is not reused
    (root / "etc" / "hostname").write_text("tampered, longer than before")
    assert any("tree changed" in p for p in arm_rootfs.verify(root, stamp))
    arm_rootfs.ensure(tmp_path)
    assert len(calls) == 2 and (root / "etc" / "hostname").read_text() == "etc/hostname"


def test_half_built_root_of_an_interrupted_run_is_rebuilt(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(arm_rootfs, "_build", _fake_build(calls))
    monkeypatch.setattr(arm_rootfs.shutil, "which", lambda _: "/usr/sbin/debootstrap")
    root, stamp = arm_rootfs._paths(tmp_path.resolve())
    partial = root.with_name(root.name + ".partial")
    (partial / "usr").mkdir(parents=True)
    (partial / "usr" / "leftover").write_text("from the killed run")
    root.mkdir()  # renamed but never stamped: the run died between the two
    assert "missing or unreadable" in arm_rootfs.verify(root, stamp)[0]
    arm_rootfs.ensure(tmp_path)
    assert len(calls) == 1 and not partial.exists()
    assert not (root / "usr" / "leftover").exists() and arm_rootfs.verify(root, stamp) == []
    # a stamp made for other inputs (another package list) is not trusted either
    doc = json.loads(stamp.read_text())
    stamp.write_text(json.dumps({**doc, "inputs_digest": "0" * 16}))
    assert "other inputs" in arm_rootfs.verify(root, stamp)[0]


def test_a_failed_build_leaves_nothing_half_made(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(tmp: Path, cache: Path, log: Any) -> None:
        (tmp / "usr").mkdir(parents=True)
        raise arm_rootfs.errors.LabError("debootstrap (second stage, in qemu-user) failed")

    monkeypatch.setattr(arm_rootfs, "_build", broken)
    monkeypatch.setattr(arm_rootfs.shutil, "which", lambda _: "/usr/sbin/debootstrap")
    with pytest.raises(arm_rootfs.errors.LabError, match="second stage"):
        arm_rootfs.ensure(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


def test_board_specs_are_checked_before_anything_is_made() -> None:
    from fleet.core import errors
    from fleet.lab.iot import normalize_arch

    assert normalize_arch(None, None) == ("x86_64", None)  # the host's boards, as before
    assert normalize_arch("aarch64", None) == ("arm64", "max")
    assert normalize_arch("arm64", "max,pauth=off") == ("arm64", "max,pauth=off")
    for arch, cpu, words in (("arm64", "cortex-z9", "no CPU model"),
                             ("x86_64", "max", "emulated boards only"),
                             ("riscv64", None, "unknown --arch"),
                             ("arm64", "max;reboot", "not a qemu CPU model")):
        with pytest.raises(errors.UsageError, match=words):
            normalize_arch(arch, cpu)


def test_second_stage_sees_only_the_stanzas_of_what_it_installs(tmp_path: Path) -> None:
    """The emulated second stage reads the index with perl several times: it gets the
    stanzas of the packages in ``debpaths`` only, and Debian's file comes back after,
    also when the stage fails."""
    (tmp_path / "debootstrap").mkdir()
    (tmp_path / "debootstrap" / "debpaths").write_text(
        "libc6 /var/cache/apt/archives/libc6_2.36_arm64.deb\n"
        "python3 /var/cache/apt/archives/python3_3.11.2_arm64.deb\n")
    lists = tmp_path / "var" / "lib" / "apt" / "lists"
    lists.mkdir(parents=True)
    index = lists / "deb.debian.org_debian_dists_bookworm_main_binary-arm64_Packages"
    full = b"".join(f"Package: {p}\nVersion: 1\nDepends: libc6\n\n".encode()
                    for p in ("emacs", "libc6", "python3", "python3-foo", "zsh"))
    index.write_bytes(full)
    seen: list[str] = []
    with pytest.raises(RuntimeError), arm_rootfs._small_package_index(tmp_path, seen.append):
        small = index.read_text()
        assert [s.split()[1] for s in small.split("\n\n") if s] == ["libc6", "python3"]
        raise RuntimeError("second stage failed")
    assert index.read_bytes() == full and sorted(p.name for p in lists.iterdir()) == [
        index.name]
    assert "2 of the index's stanzas kept" in seen[0]
