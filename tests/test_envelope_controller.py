"""The controller's half of key envelopes (``fleet/artifacts/envelopes.py``): which
envelope a device is sent, refusals before anything is pushed, and a package and its
bundle kept together when copied, reused and pruned."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from fleet_agent.identity import public_pem

from fleet.artifacts import init_signing_key, load_signing_key
from fleet.artifacts.envelopes import (
    copy_package,
    envelope_for,
    package_format,
    package_recipients,
    remove_package,
)
from fleet.artifacts.gc import apply_gc, plan_gc
from fleet.core import errors
from fleet.core.package import Envelope, bundle_path
from fleet.home import FleetHome
from fleet.registry import Registry
from fleet.registry import history as hist
from tests.package_kit import make_device, make_package, make_tiny_mnn


@pytest.fixture
def signer() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def test_each_device_is_sent_its_own_envelope_and_a_stranger_nothing(
        tmp_path: Path, signer: ed25519.Ed25519PrivateKey) -> None:
    a, b, c = (make_device(tmp_path / n, signer) for n in "abc")
    pkg, m = make_package(tmp_path, signer, [a, b], version=1)
    assert package_format(pkg) == 2
    for d in (a, b):
        env = Envelope.parse(envelope_for(pkg, d.recipient.fingerprint, "d") or b"")
        assert env.fingerprint == d.recipient.fingerprint
        assert env.manifest_digest == m.content_digest()
    with pytest.raises(errors.NotRecipientError):
        envelope_for(pkg, c.recipient.fingerprint, "c")
    with pytest.raises(errors.NotRecipientError):
        envelope_for(pkg, None, "never enrolled")
    assert package_recipients(pkg, m.to_dict()) == {a.recipient.fingerprint,
                                                    b.recipient.fingerprint}
    bundle_path(pkg).unlink()
    with pytest.raises(errors.MissingEnvelopeError):
        envelope_for(pkg, a.recipient.fingerprint, "a")
    assert package_recipients(pkg, m.to_dict()) is None  # not reusable: nothing to send
    old, m1 = make_package(tmp_path, signer, [a], version=1, envelopes=False)
    assert package_format(old) == 1 and envelope_for(old, a.recipient.fingerprint, "a") is None
    assert package_recipients(old, m1.to_dict()) == {a.recipient.fingerprint}
    junk = tmp_path / "junk.fpkg"  # not a package: the device refuses it, not the controller
    junk.write_text("{}")
    assert package_format(junk) is None
    assert envelope_for(junk, a.recipient.fingerprint, "a") is None


def test_copy_and_remove_keep_package_and_bundle_together(
        tmp_path: Path, signer: ed25519.Ed25519PrivateKey) -> None:
    a = make_device(tmp_path / "a", signer)
    pkg, _ = make_package(tmp_path, signer, [a], version=1)
    out = tmp_path / "out" / "copy.fpkg"
    out.parent.mkdir()
    copy_package(pkg, out)
    assert out.read_bytes() == pkg.read_bytes()
    assert bundle_path(out).read_bytes() == bundle_path(pkg).read_bytes()
    assert a.store().stage(out).version == 1  # a hand-carried copy finds its envelope
    inline, _ = make_package(tmp_path, signer, [a], version=2, envelopes=False)
    copy_package(inline, out)  # a format-1 copy over it leaves no stale bundle
    assert not bundle_path(out).exists()
    remove_package(pkg)
    assert not pkg.exists() and not bundle_path(pkg).exists()


def test_gc_deletes_a_pruned_package_with_its_bundle(tmp_path: Path,
                                                     signer: ed25519.Ed25519PrivateKey
                                                     ) -> None:
    home = FleetHome(tmp_path / "home")
    reg = Registry.init(home)
    try:
        home.artifacts_dir.mkdir(parents=True, exist_ok=True)
        a = make_device(tmp_path / "a", signer)
        paths = []
        for v in (1, 2):
            pkg, m = make_package(home.artifacts_dir, signer, [a], version=v)
            hist.record_artifact(reg, name="m", kind="model", version=v, digest=m.sha256,
                                 package_sha256=f"{v}".ljust(64, "0"),
                                 size=pkg.stat().st_size, path=str(pkg), manifest=m.to_dict())
            paths.append(pkg)
        plan = plan_gc(home, reg, keep=0)
        assert plan.delete == [paths[0]]  # v2 is the newest build: kept
        freed = paths[0].stat().st_size + bundle_path(paths[0]).stat().st_size
        assert apply_gc(plan) == plan.bytes_freed == freed
        assert not paths[0].exists() and not bundle_path(paths[0]).exists()
        assert paths[1].exists() and bundle_path(paths[1]).exists()
    finally:
        reg.close()


def test_deploying_a_ready_package_without_its_bundle_sends_nothing(  # type: ignore[no-untyped-def]
        run_fleet, home: FleetHome, registry: Registry, tmp_path: Path) -> None:
    """`fleet deploy OUT.fpkg` needs OUT.fpkg.envelopes beside it (what `fleet package -o`
    writes): without it no device could open the package, so it is refused up front."""
    init_signing_key(home)
    d = make_device(tmp_path / "a", load_signing_key(home))
    pem, fp = public_pem(d.key)
    registry.add_device("a", f"local://a?root={d.ctx.root}", public_key=pem, fingerprint=fp)
    model = make_tiny_mnn(tmp_path / "tiny.mnn")
    out = tmp_path / "tiny.fpkg"
    r = run_fleet("package", str(model), "--for", "a", "-o", str(out), "--json")
    assert r.exit_code == 0, r.output
    assert bundle_path(out).is_file()
    bundle_path(out).unlink()
    r = run_fleet("deploy", str(out), "--device", "a", "--json")
    assert r.exit_code == 15, r.output  # PackageError: MissingEnvelopeError
    assert "tiny.fpkg.envelopes" in r.output
    assert not list(d.ctx.root.rglob("*.fpkg"))
