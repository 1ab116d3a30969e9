"""Freshness (issue 14): packages and rollback orders expire by the device clock (with
``Limits.clock_tolerance_s``); a device clock far from the controller's is named as such;
sequence numbers come from the registry's counter, never the clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from fleet.core import errors
from fleet.core.package.orders import sign_rollback_order
from fleet.core.package.trust import format_time
from fleet.home import FleetHome
from fleet.registry import Registry
from fleet.registry.counters import next_value
from tests.package_kit import Device, make_device, make_package
from tests.test_package_attacks import refused

YEAR = timedelta(days=365)


@pytest.fixture
def signer() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture
def dev(tmp_path: Path, signer: ed25519.Ed25519PrivateKey) -> Device:
    d = make_device(tmp_path / "dev-a", signer)
    pkg, _ = make_package(tmp_path, signer, [d], version=1)
    d.store().stage(pkg)
    d.store().activate("m", 1)
    return d


def _old_package(tmp_path: Path, signer: ed25519.Ed25519PrivateKey, dev: Device,
                 when: datetime) -> Path:
    from fleet.artifacts.build import build_package
    src = tmp_path / f"src-{when.year}"
    src.write_bytes(b"x" * 5000)
    out = tmp_path / f"old-{when.year}.fpkg"
    build_package([("model.mnn", src)], out, name="m", version=2, kind="model",
                  recipients=[dev.recipient], signing_key=signer, entry="model.mnn",
                  mnn_facts=None, chunk_size=4096, now=when)
    return out


def test_expired_manifest_is_refused(tmp_path: Path, signer: ed25519.Ed25519PrivateKey,
                                     dev: Device) -> None:
    pkg = _old_package(tmp_path, signer, dev, datetime(2001, 6, 1, tzinfo=UTC))
    err = refused(dev, pkg, errors.ExpiredError)
    assert err.details["expires"] == "2001-08-30T00:00:00Z"


def test_manifest_without_expiry_is_refused(tmp_path: Path, signer: ed25519.Ed25519PrivateKey,
                                            dev: Device) -> None:
    """A package signed before expiry existed never expires: a freeze attack's tool."""
    from fleet.artifacts.build import build_package
    from fleet.core.package import Manifest
    orig = Manifest.content_dict

    def legacy(self: Manifest) -> dict[str, object]:
        d = orig(self)
        d.pop("expires", None)
        return d

    src = tmp_path / "src"
    src.write_bytes(b"y" * 5000)
    out = tmp_path / "legacy.fpkg"
    mp = pytest.MonkeyPatch()
    mp.setattr(Manifest, "content_dict", legacy)
    try:
        build_package([("model.mnn", src)], out, name="m", version=2, kind="model",
                      recipients=[dev.recipient], signing_key=signer, entry="model.mnn",
                      mnn_facts=None, chunk_size=4096)
    finally:
        mp.undo()
    err = refused(dev, out, errors.ExpiredError)
    assert err.details["reason"] == "no_expiry"


def test_expiry_tolerance_is_honoured(tmp_path: Path, signer: ed25519.Ed25519PrivateKey,
                                      dev: Device) -> None:
    """Expired ten minutes ago by a device clock within the stated tolerance: accepted."""
    pkg = _old_package(tmp_path, signer, dev, datetime.now(UTC) - timedelta(days=90, minutes=10))
    assert dev.store().stage(pkg).version == 2


def test_expired_rollback_order_is_refused(tmp_path: Path, signer: ed25519.Ed25519PrivateKey,
                                           dev: Device) -> None:
    st = dev.store()
    v2, _ = make_package(tmp_path, signer, [dev], version=2)
    st.stage(v2)
    st.activate("m", 2)
    order = sign_rollback_order(signer, name="m", version=1, sequence=10**15,
                                devices=[dev.recipient.fingerprint],
                                now=datetime.now(UTC) - timedelta(days=2))
    with pytest.raises(errors.ExpiredError) as info:
        st.rollback("m", order)
    assert type(info.value) is errors.ExpiredError
    assert st.active("m").version == 2  # type: ignore[union-attr]
    assert st.model_state("m").sequence < 10**15  # not consumed


def test_device_clock_far_ahead_is_told_so(tmp_path: Path, signer: ed25519.Ed25519PrivateKey,
                                           dev: Device) -> None:
    """The device clock is a year ahead: a fresh package looks expired by it. With the
    controller's clock in the request, the error names both clocks."""
    from fleet_agent.store import Store
    pkg, _ = make_package(tmp_path, signer, [dev], version=2)
    ahead = datetime.now(UTC) + YEAR
    st = Store(dev.ctx, clock=lambda: ahead)
    before = dev.stored_files()
    controller_now = format_time(datetime.now(UTC))
    with pytest.raises(errors.ClockSkewError) as info:
        st.stage(pkg, controller_time=controller_now)
    assert type(info.value) is errors.ClockSkewError
    assert info.value.details["controller_time"] == controller_now
    assert info.value.details["device_time"] == format_time(ahead)
    assert controller_now in info.value.message and format_time(ahead) in info.value.message
    assert dev.stored_files() == before
    with pytest.raises(errors.ExpiredError):  # no controller clock to compare: plain expiry
        st.stage(pkg)


def test_controller_clock_ahead_does_not_block_later_rollbacks(
        tmp_path: Path, signer: ed25519.Ed25519PrivateKey, dev: Device) -> None:
    """The sequence comes from the registry counter: a package made while the controller
    clock was a year ahead carries no clock-based number, so the next order wins."""
    home = FleetHome(tmp_path / "home")
    home.ensure()
    reg = Registry.init(home)
    from fleet.artifacts.build import build_package
    src = tmp_path / "v2"
    src.write_bytes(b"z" * 5000)
    v2 = tmp_path / "v2.fpkg"
    m = build_package([("model.mnn", src)], v2, name="m", version=2, kind="model",
                      recipients=[dev.recipient], signing_key=signer, entry="model.mnn",
                      mnn_facts=None, chunk_size=4096, sequence=next_value(reg),
                      now=datetime.now(UTC) + YEAR)
    st = dev.store()
    st.stage(v2)
    st.activate("m", 2)
    order = sign_rollback_order(signer, name="m", version=1, sequence=next_value(reg),
                                devices=[dev.recipient.fingerprint])
    assert order["order"]["sequence"] == m.sequence + 1
    assert st.rollback("m", order).current == 1
    reg.close()


def test_counter_is_monotonic_and_seeded_above_issued_numbers(tmp_path: Path) -> None:
    home = FleetHome(tmp_path / "home")
    home.ensure()
    reg = Registry.init(home)
    first = next_value(reg)
    assert first >= 1_600_000_000_000  # seeded once above clock-based numbers of old releases
    assert [next_value(reg) for _ in range(3)] == [first + 1, first + 2, first + 3]
    reg.close()
