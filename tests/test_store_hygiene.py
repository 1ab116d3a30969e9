"""Store hygiene (issue 13, case ``store-never-pruned``): the keep policy after each
activation, ``fleet-agent gc``, refused versions deleted without raising the floor, and
rollbacks to kept versions working while rollbacks to deleted ones are refused clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from fleet_agent.cli import dispatch
from fleet_agent.gc import versions_to_delete

from fleet.core import errors
from fleet.core.package.orders import sign_rollback_order
from tests.package_kit import Device, make_device, make_package


def _deploy(tmp: Path, signer: ed25519.Ed25519PrivateKey, dev: Device, *versions: int
            ) -> None:
    st = dev.store()
    for v in versions:
        st.stage(make_package(tmp, signer, [dev], version=v)[0])
        st.activate("m", v)


def _versions(dev: Device) -> list[int]:
    return list(dev.store().installed()["m"]["versions"])


def _packages(dev: Device) -> set[str]:
    return {p.name for p in dev.ctx.store.glob("*.fpkg")}


# -- the policy, pure ---------------------------------------------------------------------
@pytest.mark.parametrize(("versions", "active", "previous", "keep", "doomed"), [
    ([1, 2, 3, 4, 5, 6], 6, 5, 1, [1, 2, 3]),
    ([1, 2, 3, 4, 5, 6], 6, 5, 0, [1, 2, 3, 4]),
    ([1, 2, 3, 4, 5, 6], 6, 5, 9, []),
    ([1, 2, 3, 4, 5, 6], 3, 6, 1, [1]),       # after a rollback: previous is newer
    ([1, 2, 5, 7], 5, 2, 0, [1]),             # 7 is staged, waiting: never deleted
    ([1, 2, 3], None, None, 0, []),           # nothing active (LoRA packs): keep all
])
def test_versions_to_delete(versions: list[int], active: int | None, previous: int | None,
                            keep: int, doomed: list[int]) -> None:
    assert versions_to_delete(versions, active=active, previous=previous, keep=keep) == doomed


def test_negative_keep_is_a_usage_error() -> None:
    with pytest.raises(errors.UsageError):
        versions_to_delete([1], active=1, previous=None, keep=-1)


# -- after activation ---------------------------------------------------------------------
def test_six_activations_keep_active_previous_and_one_more(
        tmp_path: Path, signer: ed25519.Ed25519PrivateKey, dev: Device) -> None:
    _deploy(tmp_path, signer, dev, 1, 2, 3, 4, 5, 6)
    info = dev.store().installed()["m"]
    assert (info["active"], info["previous"], info["versions"]) == (6, 5, [4, 5, 6])
    assert len(_packages(dev)) == 3  # the packages of v1..v3 are gone from store/
    assert not (dev.ctx.slots / "m" / "v1").exists()
    assert info["floor"] == 6


def test_a_staged_newer_version_survives_pruning(tmp_path: Path,
                                                 signer: ed25519.Ed25519PrivateKey,
                                                 dev: Device) -> None:
    _deploy(tmp_path, signer, dev, 1, 2, 3)
    st = dev.store()
    for v in (4, 9):
        st.stage(make_package(tmp_path, signer, [dev], version=v)[0])
    st.activate("m", 4)
    assert _versions(dev) == [2, 3, 4, 9]  # 9 waits for its activation
    st.activate("m", 9)
    assert _versions(dev) == [3, 4, 9]


def test_keep_is_a_per_root_policy(tmp_path: Path, signer: ed25519.Ed25519PrivateKey,
                                   dev: Device) -> None:
    other = make_device(tmp_path / "other", signer)
    doc = dispatch(dev.ctx, "gc", {"keep": 0, "save": True})
    assert doc["ok"] and doc["keep"] == 0
    _deploy(tmp_path, signer, dev, 1, 2, 3, 4)
    _deploy(tmp_path, signer, other, 1, 2, 3, 4)
    assert _versions(dev) == [3, 4]
    assert _versions(other) == [2, 3, 4]
    assert dispatch(dev.ctx, "status", {})["keep"] == 0
    assert dispatch(other.ctx, "status", {})["keep"] == 1


# -- refused versions ---------------------------------------------------------------------
def test_a_refused_version_is_deleted_and_does_not_raise_the_floor(
        tmp_path: Path, signer: ed25519.Ed25519PrivateKey, dev: Device) -> None:
    _deploy(tmp_path, signer, dev, 1, 2)
    st = dev.store()
    before = _packages(dev)
    st.stage(make_package(tmp_path, signer, [dev], version=7)[0])
    assert st.installed()["m"]["floor"] == 7  # accepted at stage, until refused
    assert st.refuse("m", 7, "no backend produced correct outputs") == \
        {"deleted": True, "floor": 2}
    info = st.installed()["m"]
    assert (info["active"], info["versions"], info["floor"]) == (2, [1, 2], 2)
    assert _packages(dev) == before
    # a fixed build of the same version is welcome now (it would be a replay otherwise)
    fixed = make_package(tmp_path, signer, [dev], version=7, seed=70)[0]
    assert st.stage(fixed).version == 7
    assert st.activate("m", 7).current == 7


def test_refusing_the_active_or_previous_version_changes_nothing(
        tmp_path: Path, signer: ed25519.Ed25519PrivateKey, dev: Device) -> None:
    _deploy(tmp_path, signer, dev, 1, 2)
    before = dev.store().installed()
    assert dev.store().refuse("m", 2, "x")["deleted"] is False
    assert dev.store().refuse("m", 1, "x")["deleted"] is False
    assert dev.store().installed() == before


# -- rollbacks ----------------------------------------------------------------------------
def test_rollback_to_a_kept_version_works_and_to_a_deleted_one_is_refused_clearly(
        tmp_path: Path, signer: ed25519.Ed25519PrivateKey, dev: Device) -> None:
    _deploy(tmp_path, signer, dev, 1, 2, 3, 4, 5)  # keeps 3, 4, 5
    st = dev.store()
    kept = sign_rollback_order(signer, name="m", version=3, devices=[st.fingerprint])
    assert st.rollback("m", kept).current == 3
    gone = sign_rollback_order(signer, name="m", version=1, devices=[st.fingerprint])
    with pytest.raises(errors.NotFoundError) as info:
        st.rollback("m", gone)
    assert "no longer on this device" in info.value.message
    assert info.value.details["deleted"].startswith("pruned")
    assert st.active("m").version == 3  # type: ignore[union-attr]
    # the local (order-less) rollback to previous still works: previous is always kept
    assert st.rollback("m").current == 5


def test_a_deleted_version_can_be_staged_again_with_a_rollback_order(
        tmp_path: Path, signer: ed25519.Ed25519PrivateKey, dev: Device) -> None:
    v1 = make_package(tmp_path, signer, [dev], version=1)[0]
    st = dev.store()
    st.stage(v1)
    st.activate("m", 1)
    _deploy(tmp_path, signer, dev, 2, 3, 4)
    assert 1 not in _versions(dev)
    order = sign_rollback_order(signer, name="m", version=1, devices=[st.fingerprint])
    st.stage(v1, order=order)
    assert st.rollback("m", order).current == 1


# -- the gc verb --------------------------------------------------------------------------
def test_gc_verb_prunes_and_removes_orphans_and_stale_uploads(
        tmp_path: Path, signer: ed25519.Ed25519PrivateKey, dev: Device) -> None:
    st = dev.store()
    assert dispatch(dev.ctx, "gc", {"keep": 5, "save": True})["ok"]
    _deploy(tmp_path, signer, dev, 1, 2, 3, 4)
    assert _versions(dev) == [1, 2, 3, 4]
    orphan = dev.ctx.store / ("0" * 64 + ".fpkg")
    orphan.write_bytes(b"x" * 1000)
    stale = dev.ctx.incoming / "abc.fpkg.part"
    stale.write_bytes(b"y" * 500)
    old = time.time() - 7200
    os.utime(stale, (old, old))
    fresh = dev.ctx.incoming / "def.fpkg.1.part"  # a push still running: left alone
    fresh.write_bytes(b"z" * 10)
    doc = dispatch(dev.ctx, "gc", {"keep": 0})
    assert doc["ok"], doc
    assert doc["models"] == [{"name": "m", "deleted": [1, 2], "freed": doc["models"][0]["freed"]}]
    assert sorted(doc["removed"]) == sorted([f"store/{orphan.name}", "incoming/abc.fpkg.part"])
    assert doc["freed"] >= 1500 + doc["models"][0]["freed"] > 1500
    assert doc["disk"]["free"] > 0 and doc["disk"]["total"] >= doc["disk"]["free"]
    assert fresh.exists() and not stale.exists() and not orphan.exists()
    assert _versions(dev) == [3, 4]
    assert st.keep == 5  # a one-off keep does not change the policy


def test_gc_from_the_command_line_is_json_in_and_out(
        tmp_path: Path, signer: ed25519.Ed25519PrivateKey, dev: Device) -> None:
    _deploy(tmp_path, signer, dev, 1, 2, 3)
    proc = subprocess.run([sys.executable, "-m", "fleet_agent", "--root", str(dev.ctx.root),
                           "gc", "--args", json.dumps({"keep": 0})],
                          capture_output=True, timeout=120)
    doc = json.loads(proc.stdout)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert doc["schema"] == "fleet.agent/1" and doc["verb"] == "gc" and doc["ok"]
    assert doc["models"][0]["deleted"] == [1]
    bad = subprocess.run([sys.executable, "-m", "fleet_agent", "--root", str(dev.ctx.root),
                          "gc", "--args", json.dumps({"keep": -2})],
                         capture_output=True, timeout=120)
    assert bad.returncode == 1 and json.loads(bad.stdout)["error"]["code"] == "usage"
