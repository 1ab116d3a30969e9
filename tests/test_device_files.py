"""Finding 5 (``cases/symlink-follow``): the device root is the agent's alone. Folders are
made 0700 whatever the umask; a root with a symbolic link, a foreign owner or a
group/other-writable folder is refused (``UnsafeRootError``); partial files of a push are
never written through a planted link. One attack per test; the outside is untouched."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from fleet_agent.cli import dispatch
from fleet_agent.context import AgentContext, check_dir

from fleet.core import errors
from fleet.transports.local import LocalTransport
from tests.package_kit import Device, make_package


def _dirs(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mode & 0o777
            for p in [root, *root.rglob("*")] if p.is_dir() and not p.is_symlink()}


def test_root_folders_are_0700_under_umask_000(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        ctx = AgentContext(tmp_path / "fresh")
        ctx.ensure()
    finally:
        os.umask(old)
    modes = _dirs(ctx.root)
    assert modes and set(modes.values()) == {0o700}, modes


def test_group_writable_folder_is_refused(dev: Device) -> None:
    os.chmod(dev.ctx.slots, 0o777)
    with pytest.raises(errors.UnsafeRootError, match="group/other-writable"):
        dev.ctx.check()


def test_foreign_owner_is_refused(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir(mode=0o700)
    with pytest.raises(errors.UnsafeRootError, match="owned by uid"):
        check_dir(tmp_path / "d", uid=os.getuid() + 1)


def test_symlinked_slot_refused_and_nothing_written_outside(
        tmp_path: Path, dev: Device, signer: ed25519.Ed25519PrivateKey) -> None:
    pkg, _ = make_package(tmp_path, signer, [dev], version=1)
    dev.store().stage(pkg)
    outside = tmp_path / "outside"
    outside.mkdir()
    dev.ctx.slots.mkdir(exist_ok=True)
    (dev.ctx.slots / "m").symlink_to(outside)
    doc = dispatch(dev.ctx, "activate", {"name": "m", "version": 1})
    assert not doc["ok"] and doc["error"]["code"] == "unsafe_root"
    assert list(outside.iterdir()) == []


def test_symlinked_version_folder_is_refused(dev: Device, tmp_path: Path) -> None:
    (dev.ctx.slots / "m").mkdir(parents=True)
    (dev.ctx.slots / "m" / "v1").symlink_to(tmp_path)
    doc = dispatch(dev.ctx, "status", {})
    assert not doc["ok"] and doc["error"]["code"] == "unsafe_root"


def test_symlinked_root_folder_is_refused(dev: Device, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    os.rename(dev.ctx.store, tmp_path / "store-moved")
    dev.ctx.store.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(errors.UnsafeRootError, match="symbolic link"):
        dev.ctx.ensure()


def test_push_never_writes_through_a_planted_part_link(tmp_path: Path) -> None:
    root = tmp_path / "root"
    victim = tmp_path / "victim.conf"
    victim.write_text("precious")
    src = tmp_path / "p.fpkg"
    src.write_bytes(os.urandom(300_000))
    incoming = root / "incoming"
    incoming.mkdir(parents=True, mode=0o700)
    remote = incoming / "abc.fpkg"
    (incoming / "abc.fpkg.part").symlink_to(victim)
    with LocalTransport(f"local://a?root={root}") as t:
        res = t.push(src, str(remote))
    assert victim.read_text() == "precious"
    assert remote.read_bytes() == src.read_bytes() and res.resumed_from == 0
    assert not (incoming / "abc.fpkg.part").exists()


def test_push_refuses_a_symlinked_incoming_folder(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "incoming").symlink_to(outside)
    src = tmp_path / "p.fpkg"
    src.write_bytes(b"x" * 1000)
    with LocalTransport(f"local://a?root={root}") as t, \
            pytest.raises(errors.RemoteFileError, match="symbolic link"):
        t.push(src, str(root / "incoming" / "p.fpkg"))
    assert list(outside.iterdir()) == []
