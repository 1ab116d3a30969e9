"""Pull mode's pure parts, one attack or edge case per test: the desired state a device
accepts, the server's challenge and bearer tokens, the per-device rate limit, the escrow
envelope for a late device, the fleet CA."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fleet.core import errors
from fleet.core.package import ClockReading, KeyRing, decrypt_package
from fleet.core.package.envelope import envelope_from_text
from fleet.core.package.keyid import fingerprint_public_key
from fleet.core.pull import DesiredModel, sign_desired_state, verify_desired_state
from fleet.home import FleetHome
from fleet.server import auth
from fleet.server.ratelimit import RateLimiter

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
DEVICE = ec.generate_private_key(ec.SECP256R1())
FP = fingerprint_public_key(DEVICE.public_key())
ONLINE = ed25519.Ed25519PrivateKey.generate()
RING = KeyRing.single(ONLINE.public_key())
MODEL = DesiredModel(name="m", version=2, kind="model", package_sha256="a" * 64, size=10,
                     digest="b" * 64, deployment="d")


def _clock(at: datetime = NOW) -> ClockReading:
    return ClockReading(now=at, tolerance_s=3600)


def _state(counter: int = 5, device: str = FP, key: ed25519.Ed25519PrivateKey = ONLINE,
           now: datetime = NOW) -> dict[str, object]:
    return sign_desired_state(key, device=device, counter=counter, models=[MODEL], now=now,
                              ttl=timedelta(days=1))


def test_a_fresh_state_for_this_device_is_accepted() -> None:
    got = verify_desired_state(_state(), RING, FP, 5, _clock())
    assert got.counter == 5 and got.model("m") == MODEL


def test_an_expired_state_is_refused() -> None:
    with pytest.raises(errors.ExpiredError):
        verify_desired_state(_state(now=NOW - timedelta(days=3)), RING, FP, 0, _clock())


def test_an_older_counter_is_a_replay() -> None:
    with pytest.raises(errors.ReplayError):
        verify_desired_state(_state(counter=4), RING, FP, 5, _clock())


def test_a_state_for_another_device_is_refused() -> None:
    other = fingerprint_public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
    with pytest.raises(errors.NotRecipientError):
        verify_desired_state(_state(device=other), RING, FP, 0, _clock())


def test_a_state_signed_by_another_key_is_refused() -> None:
    with pytest.raises(errors.UntrustedSignerError):
        verify_desired_state(_state(key=ed25519.Ed25519PrivateKey.generate()), RING, FP, 0,
                             _clock())


def test_an_edited_state_is_refused() -> None:
    doc = _state()
    state = dict(doc["state"])  # type: ignore[arg-type]
    state["counter"] = 99
    with pytest.raises(errors.BadSignatureError):
        verify_desired_state({**doc, "state": state}, RING, FP, 0, _clock())


def test_bearer_tokens_are_checked_for_mac_kind_and_expiry() -> None:
    secret = b"s" * 32
    tok = auth.make_token(secret, "dev-id", FP, 1000, 900)
    assert auth.check_token(secret, tok, 1500).device_id == "dev-id"
    with pytest.raises(errors.ServerAuthError, match="expired"):
        auth.check_token(secret, tok, 1901)
    with pytest.raises(errors.ServerAuthError, match="not issued"):
        auth.check_token(b"t" * 32, tok, 1500)
    challenge = auth.make_challenge(secret, FP, 1000)
    with pytest.raises(errors.ServerAuthError, match="not issued"):
        auth.check_token(secret, challenge, 1000)  # a challenge is no token
    body, mac = tok.split(".")
    with pytest.raises(errors.ServerAuthError):
        auth.check_token(secret, body[:-2] + "xx." + mac, 1500)


def test_rate_limit_refuses_past_the_burst_and_refills() -> None:
    t = [0.0]
    lim = RateLimiter(per_min=60, burst=3, clock=lambda: t[0])
    for _ in range(3):
        lim.take("dev:a")
    with pytest.raises(errors.RateLimitedError) as exc:
        lim.take("dev:a")
    assert exc.value.details["retry_after_s"] > 0
    lim.take("dev:b")  # per device
    t[0] = 1.1
    lim.take("dev:a")


def test_escrow_seals_a_working_envelope_for_a_device_enrolled_later(tmp_path: Path) -> None:
    from fleet.artifacts.build import build_package
    from fleet.core.package import Recipient
    from fleet.registry.models import Device
    from fleet.server.escrow import envelope_for_device, escrow_device

    home = FleetHome(tmp_path / "home")
    home.ensure()
    esc = escrow_device(home)
    payload = tmp_path / "model.bin"
    payload.write_bytes(bytes(range(256)) * 40)
    pkg = tmp_path / "p.fpkg"
    build_package([("model.bin", payload)], pkg, name="m", version=1, kind="model",
                  recipients=[Recipient.from_pem(esc.public_key or "")],
                  signing_key=ONLINE, entry="model.bin", mnn_facts=None)
    late = ec.generate_private_key(ec.SECP256R1())
    from cryptography.hazmat.primitives import serialization

    pem = late.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    dev = Device(name="late", platform="linux", uri="pull://late", public_key=pem,
                 fingerprint=fingerprint_public_key(late.public_key()))
    env = envelope_for_device(home, pkg, dev)
    assert env is not None
    got = bytearray()
    decrypt_package(pkg, RING, late, envelope=envelope_from_text(env),
                    write=lambda _p, view: got.extend(view))
    assert bytes(got) == payload.read_bytes()
    stranger = ec.generate_private_key(ec.SECP256R1())  # the envelope opens for no one else
    with pytest.raises(errors.NotRecipientError):
        decrypt_package(pkg, RING, stranger, envelope=envelope_from_text(env))


def test_init_tls_makes_a_ca_and_a_certificate_it_signed(tmp_path: Path) -> None:
    from fleet.server.tls import init_tls

    home = FleetHome(tmp_path / "home")
    p = init_tls(home, san=["10.77.0.1", "fleet.lab"])
    ca = x509.load_pem_x509_certificate(p.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(p.cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.77.0.1") in names.get_values_for_type(x509.IPAddress)
    assert "fleet.lab" in names.get_values_for_type(x509.DNSName)
    assert p.key.stat().st_mode & 0o077 == 0 and p.ca_key.stat().st_mode & 0o077 == 0
    again = init_tls(home)  # the CA stays; a new server certificate
    assert again.ca_cert.read_bytes() == p.ca_cert.read_bytes()
    with pytest.raises(errors.UsageError):
        init_tls(home, san=["not a name"])


def test_install_window_parsing_and_wrapping_past_midnight() -> None:
    from fleet.core.pull import in_window, parse_window

    assert parse_window("02:00-04:00") == (120, 240)
    for bad in ("2-4", "24:00-01:00", "02:00-02:00", "02:60-03:00", "02:00", ""):
        with pytest.raises(errors.UsageError):
            parse_window(bad)
    at = lambda h, m=0: datetime(2026, 6, 1, h, m)  # noqa: E731
    assert in_window("02:00-04:00", at(2)) and in_window("02:00-04:00", at(3, 59))
    assert not in_window("02:00-04:00", at(4)) and not in_window("02:00-04:00", at(1, 59))
    assert in_window("22:00-02:00", at(23)) and in_window("22:00-02:00", at(1))
    assert not in_window("22:00-02:00", at(12)) and in_window(None, at(12))
    with pytest.raises(errors.FormatError):  # a signed entry with a bad window is refused
        DesiredModel.from_dict({**MODEL.to_dict(), "window": "nope"})


def test_seen_batches_last_seen_in_one_write_and_spares_revoked_devices(
        tmp_path: Path) -> None:
    from fleet.registry import Registry
    from fleet.server.seen import SeenWriter

    reg = Registry.init(FleetHome.from_env(tmp_path / "home"))
    a = reg.add_device("a", "pull://a")
    b = reg.add_device("b", "pull://b")
    reg.update_device("b", revoked_at=NOW)
    writer = SeenWriter(lambda: reg, every_s=3600)  # no timer: flush by hand
    writer.note(a.id, NOW, agent_version="9.9", root_version=3)
    writer.note(b.id, NOW)
    assert reg.get_device("a").last_seen is None  # noted, not written yet
    assert writer.flush() == 2 and writer.flush() == 0
    got = reg.get_device("a")
    assert got.last_seen == NOW and got.status == "ok" and got.agent_version == "9.9"
    assert got.root_version == 3
    assert reg.get_device("b").last_seen is None  # revoked meanwhile: left alone
    writer.close()
    reg.close()
