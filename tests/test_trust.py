"""Enrollment and device keys against the root of trust (issue 14, findings 2 and 3).
One attack per test: exact error class, trust and store untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from fleet_agent.context import AgentContext
from fleet_agent.store import Store
from fleet_agent.verbs_basic import enroll, rekey

from fleet.artifacts.keys import load_signing_key, public_pem
from fleet.artifacts.recipients import require_enrolled
from fleet.artifacts.trust import chain_docs, init_trust
from fleet.core import errors
from fleet.home import FleetHome
from fleet.registry import Registry
from fleet.registry.types import utcnow
from tests.package_kit import Device, make_device, make_package


@pytest.fixture
def home(tmp_path: Path) -> FleetHome:
    h = FleetHome(tmp_path / "home")
    init_trust(h)
    return h


@pytest.fixture
def dev(tmp_path: Path, home: FleetHome) -> Device:
    ctx = AgentContext(tmp_path / "dev-a")
    enroll(ctx, {"trust": chain_docs(home)})
    d = Device(ctx, Store(ctx).device_key)
    pkg, _ = make_package(tmp_path, load_signing_key(home), [d], version=1)
    d.store().stage(pkg)
    d.store().activate("m", 1)
    return d


def _trust_files(d: Device) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.ctx.identity_dir.glob("*"))
            if p.name.startswith(("root.", "controller"))}


def test_replace_trust_without_a_chain_is_refused(tmp_path: Path, dev: Device) -> None:
    attacker = ed25519.Ed25519PrivateKey.generate()
    before = _trust_files(dev)
    with pytest.raises(errors.TrustChainError) as info:
        enroll(dev.ctx, {"controller_pub": public_pem(attacker.public_key()),
                         "replace_trust": True})
    assert type(info.value) is errors.TrustChainError
    assert _trust_files(dev) == before
    evil, _ = make_package(tmp_path, attacker, [dev], version=2)
    with pytest.raises(errors.UntrustedSignerError):
        dev.store().stage(evil)
    assert dev.store().active("m").version == 1  # type: ignore[union-attr]


def test_another_controller_key_without_a_chain_is_refused(dev: Device) -> None:
    attacker = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(errors.TrustChainError):
        enroll(dev.ctx, {"controller_pub": public_pem(attacker.public_key())})


def test_a_foreign_root_v1_is_refused(tmp_path: Path, dev: Device) -> None:
    other = FleetHome(tmp_path / "other-home")
    init_trust(other)
    before = _trust_files(dev)
    with pytest.raises(errors.TrustChainError) as info:
        enroll(dev.ctx, {"trust": chain_docs(other), "replace_trust": True})
    assert info.value.details["reason"] == "foreign_root"
    assert _trust_files(dev) == before


def test_reenroll_with_the_same_chain_is_a_no_op(home: FleetHome, dev: Device) -> None:
    doc = enroll(dev.ctx, {"trust": chain_docs(home)})
    assert doc["root_version"] == 1


def test_pre_root_device_moves_to_the_root_that_lists_its_key(tmp_path: Path,
                                                               home: FleetHome) -> None:
    legacy = make_device(tmp_path / "old-dev", load_signing_key(home))
    assert enroll(legacy.ctx, {"trust": chain_docs(home)})["root_version"] == 1


def test_pre_root_device_refuses_a_root_without_its_key(tmp_path: Path,
                                                       home: FleetHome) -> None:
    legacy = make_device(tmp_path / "old-dev", ed25519.Ed25519PrivateKey.generate())
    with pytest.raises(errors.TrustChainError) as info:
        enroll(legacy.ctx, {"trust": chain_docs(home)})
    assert info.value.details["reason"] == "foreign_root"
    assert legacy.store().root_version is None


def test_rekey_refuses_packages_for_the_old_key(tmp_path: Path, home: FleetHome,
                                                dev: Device) -> None:
    old_recipient = dev.recipient
    doc = rekey(dev.ctx, {})
    assert doc["previous_fingerprint"] == old_recipient.fingerprint != doc["fingerprint"]
    for_old, _ = make_package(tmp_path, load_signing_key(home), [], version=2,
                              recipients=[old_recipient])
    before = dev.stored_files()
    with pytest.raises(errors.NotRecipientError):
        Store(dev.ctx).stage(for_old)
    assert dev.stored_files() == before
    with Store(dev.ctx).open_payload("m") as opened:  # installed packages still open
        assert opened.manifest.version == 1


def test_revoked_device_gets_no_package(tmp_path: Path, home: FleetHome) -> None:
    reg = Registry.init(home)
    dev = reg.add_device("a", f"local://a?root={tmp_path / 'a'}", public_key="pem",
                         fingerprint="SHA256:x")
    reg.update_device("a", revoked_at=utcnow())
    with pytest.raises(errors.RevokedError):
        require_enrolled([reg.get_device("a")])
    assert dev.revoked_at is None  # the row we added before the revocation
    reg.close()
