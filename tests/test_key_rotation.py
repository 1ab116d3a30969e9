"""Rotation and revocation of the online key on devices enrolled before them (issue 14):
the new root travels with the push; after revocation the old key's packages are refused.
One attack per test: exact error class, store untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
from fleet_agent.context import AgentContext
from fleet_agent.store import Store
from fleet_agent.verbs_basic import enroll
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata

from fleet.artifacts.keys import load_signing_key
from fleet.artifacts.trust import (
    TrustPaths,
    chain_docs,
    current_root,
    init_trust,
    revoke_key,
    rotate_key,
)
from fleet.core import errors
from fleet.core.package import fingerprint_public_key
from fleet.home import FleetHome
from tests.package_kit import CHUNK, Device, make_package


@pytest.fixture
def home(tmp_path: Path) -> FleetHome:
    h = FleetHome(tmp_path / "home")
    init_trust(h)
    return h


def _enrolled(root: Path, home: FleetHome) -> Device:
    ctx = AgentContext(root)
    doc = enroll(ctx, {"trust": chain_docs(home)})
    assert doc["root_version"] == current_root(home).signed.version  # type: ignore[union-attr]
    st = Store(ctx)
    return Device(ctx, st.device_key)


def _push(home: FleetHome, d: Device, pkg: Path) -> None:
    """What a deploy does on the device: the root chain travels with the stage."""
    st = d.store()
    st.stage(pkg, trust=chain_docs(home))
    m = st.manifest(*_last(st))
    st.activate(m.name, m.version)


def _last(st: Store) -> tuple[str, int]:
    name, info = next(iter(st.installed().items()))
    return name, max(info["versions"])


def test_rotate_deploy_revoke_on_three_devices(tmp_path: Path, home: FleetHome) -> None:
    fleet = [_enrolled(tmp_path / f"dev-{n}", home) for n in "abc"]
    old = load_signing_key(home)
    v1, _ = make_package(tmp_path, old, fleet, version=1)
    for d in fleet:
        _push(home, d, v1)

    rotated = rotate_key(home, None)
    new = load_signing_key(home)
    assert rotated["root_version"] == 2
    assert rotated["fingerprint"] != fingerprint_public_key(old.public_key())
    v2, m2 = make_package(tmp_path, new, fleet, version=2)
    assert m2.signer == rotated["fingerprint"]
    for d in fleet:
        _push(home, d, v2)  # root v2 arrives with the push; the new key is trusted
        assert d.store().active("m").version == 2  # type: ignore[union-attr]

    revoke_key(home, fingerprint_public_key(old.public_key()))
    v3, _ = make_package(tmp_path, new, fleet, version=3)
    for d in fleet:
        _push(home, d, v3)  # carries root v3, which no longer lists the old key
        assert d.store().root_version == 3

    stolen, _ = make_package(tmp_path, old, fleet, version=9, seed=99)
    for d in fleet:
        before = d.stored_files()
        with pytest.raises(errors.UntrustedSignerError) as info:
            d.store().stage(stolen)
        assert type(info.value) is errors.UntrustedSignerError
        assert d.stored_files() == before
        assert d.store().active("m").version == 3  # type: ignore[union-attr]
        with d.store().open_payload("m") as opened:
            assert opened.manifest.version == 3


def test_root_update_signed_by_the_old_root_alone_is_refused(tmp_path: Path,
                                                             home: FleetHome) -> None:
    d = _enrolled(tmp_path / "dev-a", home)
    rotate_key(home, None)
    # An attacker with the old root key but not the new one: v2 lists a new root key, and
    # only the old root key signs it.
    paths = TrustPaths(home)
    v2 = Metadata.from_bytes(paths.root_file(2).read_bytes())
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from fleet.artifacts.trust import _sslib  # the same key form the controller writes
    attacker_root = ed25519.Ed25519PrivateKey.generate()
    old_root_fp = v2.signed.roles["root"].keyids[0]
    v2.signed.revoke_key(old_root_fp, "root")
    v2.signed.add_key(_sslib(attacker_root.public_key()), "root")
    old_root = load_signing_key(paths.root_key)
    v2.signatures.clear()
    v2.sign(CryptoSigner(old_root, _sslib(old_root.public_key())))
    assert fingerprint_public_key(old_root.public_key()) == old_root_fp
    with pytest.raises(errors.TrustChainError) as info:
        d.store().update_trust([v2.to_dict()])
    assert info.value.details["reason"] == "new_threshold"
    assert d.store().root_version == 1


def test_root_update_signed_by_a_new_root_key_alone_is_refused(tmp_path: Path,
                                                               home: FleetHome) -> None:
    d = _enrolled(tmp_path / "dev-a", home)
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from fleet.artifacts.trust import _root_doc, _sslib
    other = ed25519.Ed25519PrivateKey.generate()
    forged = Metadata(_root_doc(2, other.public_key(), [other.public_key()]))
    forged.sign(CryptoSigner(other, _sslib(other.public_key())))
    with pytest.raises(errors.TrustChainError) as info:
        d.store().update_trust([forged.to_dict()])
    assert info.value.details["reason"] == "old_threshold"
    assert d.store().root_version == 1


def test_root_version_jump_is_refused(tmp_path: Path, home: FleetHome) -> None:
    d = _enrolled(tmp_path / "dev-a", home)
    rotate_key(home, None)
    rotate_key(home, None)
    v3 = chain_docs(home)[2]  # type: ignore[index]
    with pytest.raises(errors.TrustChainError) as info:
        d.store().update_trust([v3])  # v2 withheld
    assert info.value.details["reason"] == "version"


def test_retiring_key_still_opens_what_it_signed(tmp_path: Path, home: FleetHome) -> None:
    """A rotation never strands an installed model: the old key stays listed (retiring)."""
    d = _enrolled(tmp_path / "dev-a", home)
    v1, _ = make_package(tmp_path, load_signing_key(home), [d], version=1)
    _push(home, d, v1)
    rotate_key(home, None)
    d.store().update_trust(chain_docs(home))  # type: ignore[arg-type]
    with d.store().open_payload("m") as opened:
        assert opened.manifest.version == 1
    assert CHUNK  # the kit's small chunks


def test_current_signing_key_cannot_be_revoked(home: FleetHome) -> None:
    fp = fingerprint_public_key(load_signing_key(home).public_key())
    with pytest.raises(errors.UsageError):
        revoke_key(home, fp)
    assert current_root(home).signed.version == 1  # type: ignore[union-attr]
