"""A device whose disk is small (issue 13, case ``disk-full-wedges-device``): a real
ENOSPC from a small tmpfs root (the tests run as root). Staging needs one package-sized
copy, not two; a push or a stage that does not fit fails as disk full and leaves nothing
behind; a small model stages right after; ``status`` reports the room."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from fleet_agent.cli import dispatch

from fleet.core import errors
from fleet.core.fsutil import ROOM_HEADROOM, room_needed, sha256_file
from fleet.core.package.envelope import envelope_to_text
from fleet.transports.base import TransportOptions
from fleet.transports.local import LocalTransport
from tests.package_kit import Device, envelope_of, make_device, make_package

MiB = 1 << 20
SLACK = 256 << 10  # tmpfs rounds to pages; state.json and slots are a few KiB


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                    str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def signer() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture
def small(tmp_path: Path, signer: ed25519.Ed25519PrivateKey) -> Iterator[Device]:
    assert os.geteuid() == 0, "mounting a tmpfs needs root (make test runs as root)"
    with _tmpfs(tmp_path / "disk", "6m") as disk:
        yield make_device(disk / "dev", signer)


def _free(dev: Device) -> int:
    st = os.statvfs(dev.ctx.root)
    return st.f_bavail * st.f_frsize


def _push(dev: Device, pkg: Path, tmp: Path) -> str:
    """The controller's half: push into incoming/<package sha>.fpkg, as a deploy does."""
    remote = str(dev.ctx.incoming / f"{sha256_file(pkg)}.fpkg")
    LocalTransport(f"local://d?root={dev.ctx.root}", TransportOptions(home=tmp)).push(
        pkg, remote)
    return remote


def _stage(dev: Device, path: str, pkg: Path | None = None, owner: Device | None = None
           ) -> dict[str, Any]:
    """The agent's ``stage`` verb; with ``pkg``, the key envelope of ``owner`` (default
    ``dev``) goes with it, as a deploy sends it."""
    args: dict[str, Any] = {"path": path}
    env = envelope_of(pkg, owner or dev) if pkg is not None else None
    if env is not None:
        args["envelope"] = envelope_to_text(env)
    return dispatch(dev.ctx, "stage", args)


def test_room_needed_is_the_package_plus_headroom() -> None:
    assert room_needed(0) == ROOM_HEADROOM
    assert room_needed(64 * MiB) == 64 * MiB + ROOM_HEADROOM
    with pytest.raises(ValueError):
        room_needed(-1)


def test_status_reports_the_roots_free_and_total_bytes(small: Device) -> None:
    doc = dispatch(small.ctx, "status", {})
    assert doc["ok"]
    assert doc["disk"]["total"] == 6 * MiB
    assert abs(doc["disk"]["free"] - _free(small)) <= SLACK


def test_a_package_bigger_than_half_the_free_space_stages_in_one_copy(
        tmp_path: Path, signer: ed25519.Ed25519PrivateKey, small: Device) -> None:
    """What stage needs: the pushed package is moved, not copied, into store/."""
    free0 = _free(small)
    pkg, _ = make_package(tmp_path, signer, [small], version=1, size=4 * MiB)
    size = pkg.stat().st_size
    assert size < free0 < 2 * size  # two copies would not fit
    remote = _push(small, pkg, tmp_path)
    doc = _stage(small, remote, pkg)
    assert doc["ok"], doc
    assert not list(small.ctx.incoming.iterdir())
    assert (small.ctx.store / f"{sha256_file(pkg)}.fpkg").stat().st_size == size
    assert abs((free0 - _free(small)) - size) <= SLACK
    assert small.store().activate("m", 1).current == 1


def test_too_big_fails_as_disk_full_leaves_nothing_and_a_small_model_follows(
        tmp_path: Path, signer: ed25519.Ed25519PrivateKey, small: Device) -> None:
    st = small.store()
    st.stage(make_package(tmp_path, signer, [small], version=1)[0])
    st.activate("m", 1)
    files0, free0 = sorted(p.name for p in small.ctx.root.rglob("*")), _free(small)
    big, _ = make_package(tmp_path, signer, [small], version=2, size=8 * MiB)
    # the push itself does not fit: disk full, its partial file removed
    with pytest.raises(errors.RemoteDiskFullError):
        _push(small, big, tmp_path)
    assert sorted(p.name for p in small.ctx.root.rglob("*")) == files0
    assert abs(_free(small) - free0) <= SLACK
    # the same again fails the same clean way (nothing accumulates)
    with pytest.raises(errors.RemoteDiskFullError):
        _push(small, big, tmp_path)
    assert abs(_free(small) - free0) <= SLACK
    # a stage that must copy (the file is not an upload in incoming/) and does not fit
    mid, _ = make_package(tmp_path, signer, [small], version=2, size=free0 + MiB)
    doc = _stage(small, str(mid))
    assert not doc["ok"] and doc["error"]["code"] == "disk_full", doc
    assert sorted(p.name for p in small.ctx.root.rglob("*")) == files0
    assert st.installed()["m"]["floor"] == 1
    # a small model deploys right after
    tiny, _ = make_package(tmp_path, signer, [small], version=2, size=64 << 10)
    doc = _stage(small, _push(small, tiny, tmp_path), tiny)
    assert doc["ok"] and doc["version"] == 2, doc
    assert st.activate("m", 2).current == 2


def test_a_refused_upload_is_removed(tmp_path: Path, signer: ed25519.Ed25519PrivateKey,
                                     small: Device) -> None:
    """A pushed package the agent refuses (here: not for this device) does not stay."""
    stranger = make_device(tmp_path / "stranger", signer)
    pkg, _ = make_package(tmp_path, signer, [stranger], version=1, size=MiB)
    free0 = _free(small)
    doc = _stage(small, _push(small, pkg, tmp_path), pkg, stranger)
    assert not doc["ok"] and doc["error"]["code"] == "not_recipient", doc
    assert not list(small.ctx.incoming.iterdir()) and not list(small.ctx.store.iterdir())
    assert abs(_free(small) - free0) <= SLACK


def test_enospc_anywhere_in_the_agent_is_disk_full(small: Device) -> None:
    filler = small.ctx.root / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * (64 << 10))
    doc = dispatch(small.ctx, "rekey", {})  # writes a new key (enroll no longer writes
    # anything for a device that already trusts a controller)
    assert not doc["ok"] and doc["error"]["code"] == "disk_full", doc
    filler.unlink()
