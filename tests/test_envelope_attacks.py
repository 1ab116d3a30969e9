"""Attacks on per-device key envelopes (package format 2, issue 16), in the style of
``test_package_attacks``: the device installs v1, each attack is tried with a v2, and must
be refused with exactly its own error class, leave nothing new in the store and leave v1
active and openable. Plus: the envelope is kept with the stored package, format 1 is still
read, and the agent's ``stage`` verb takes the envelope as the controller sends it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from fleet_agent.cli import dispatch

from fleet.core import errors
from fleet.core.package import (
    ENVELOPE_SIZE,
    Envelope,
    bundle_path,
    encode_header,
    parse_header,
    seal_envelope,
)
from fleet.core.package.chunks import chunk_aad, chunk_nonce
from fleet.core.package.envelope import envelope_to_text
from tests.package_kit import (
    CHUNK,
    Device,
    envelope_of,
    make_device,
    make_package,
    payload_bytes,
    split,
)
from tests.test_package_attacks import assert_untouched, refused


@pytest.fixture
def signer() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture
def dev(tmp_path: Path, signer: ed25519.Ed25519PrivateKey) -> Device:
    d = make_device(tmp_path / "dev-a", signer)
    pkg, _ = make_package(tmp_path, signer, [d], version=1)
    st = d.store()
    st.stage(pkg)
    st.activate("m", 1)
    return d


def _v2(tmp_path: Path, signer: ed25519.Ed25519PrivateKey, devs: list[Device]
        ) -> tuple[Path, bytes]:
    """A v2 for ``devs`` without its bundle (the envelope comes only as an argument), and
    the first device's envelope."""
    pkg, _ = make_package(tmp_path, signer, devs, version=2)
    env = envelope_of(pkg, devs[0])
    assert env is not None and len(env) == ENVELOPE_SIZE
    bundle_path(pkg).unlink()
    return pkg, env


def test_the_manifest_names_no_recipient_and_stays_small(tmp_path: Path,
                                                         signer: ed25519.Ed25519PrivateKey
                                                         ) -> None:
    devs = [make_device(tmp_path / f"d{i}", signer) for i in range(3)]
    one, _ = make_package(tmp_path, signer, devs[:1], version=1)
    three, m = make_package(tmp_path, signer, devs, version=1)
    doc = json.loads(parse_header(three.read_bytes()).manifest_bytes)
    assert doc["type"] == "fleet.package/2" and "recipients" not in doc
    assert len(doc["key_commitment"]) == 64
    assert parse_header(three.read_bytes()).version == 2
    # the package is the same size for 1 or 3 devices; only the bundle grows, 181 B each
    assert one.stat().st_size == three.stat().st_size
    assert bundle_path(three).stat().st_size - bundle_path(one).stat().st_size \
        == 2 * ENVELOPE_SIZE
    assert {Envelope.parse(envelope_of(three, d) or b"").manifest_digest
            for d in devs} == {m.content_digest()}


def test_envelope_sent_as_an_argument_is_kept_with_the_stored_package(
        tmp_path: Path, signer: ed25519.Ed25519PrivateKey, dev: Device) -> None:
    pkg, env = _v2(tmp_path, signer, [dev])
    st = dev.store()
    staged = st.stage(pkg, envelope=env)
    state = json.loads(dev.ctx.state_file.read_text())
    kept = state["models"]["m"]["versions"]["2"]["envelope"]
    assert kept == envelope_to_text(env)
    assert (dev.ctx.store / staged.package).read_bytes() == pkg.read_bytes()  # encrypted
    st.activate("m", 2)
    with st.open_payload("m") as opened:  # the stored envelope opens it, nothing else
        assert Path(opened.entry).read_bytes()[:16] == payload_bytes(16, 2)


def test_missing_envelope(tmp_path: Path, signer: ed25519.Ed25519PrivateKey, dev: Device
                          ) -> None:
    pkg, _ = _v2(tmp_path, signer, [dev])
    err = refused(dev, pkg, errors.MissingEnvelopeError)
    assert err.details == {"name": "m", "version": 2}


def test_envelope_for_another_device(tmp_path: Path, signer: ed25519.Ed25519PrivateKey,
                                     dev: Device) -> None:
    other = make_device(tmp_path / "dev-b", signer)
    pkg, env_b = _v2(tmp_path, signer, [other, dev])  # dev is a recipient, too
    err = refused(dev, pkg, errors.NotRecipientError, envelope=env_b)
    assert err.details["envelope_for"] == other.recipient.fingerprint


def test_envelope_from_another_package(tmp_path: Path, signer: ed25519.Ed25519PrivateKey,
                                       dev: Device) -> None:
    pkg, _ = _v2(tmp_path, signer, [dev])
    _, env_other = _v2(tmp_path, signer, [dev])  # same content and version, other package
    err = refused(dev, pkg, errors.EnvelopeMismatchError, envelope=env_other)
    assert err.details["envelope_for"] != err.details["manifest"]


@pytest.mark.parametrize(("edit", "exc"), [
    ("truncated", errors.EnvelopeFormatError),
    ("padded", errors.EnvelopeFormatError),
    ("magic", errors.EnvelopeFormatError),
    ("version", errors.EnvelopeFormatError),
    ("epk_not_a_point", errors.EnvelopeFormatError),
    ("digest_bit", errors.EnvelopeMismatchError),
    ("key_id_bit", errors.NotRecipientError),
    ("wrapped_bit", errors.WrongKeyError),
    ("epk_other_point", errors.WrongKeyError),
])
def test_tampered_envelope(tmp_path: Path, signer: ed25519.Ed25519PrivateKey, dev: Device,
                           edit: str, exc: type[errors.FleetError]) -> None:
    pkg, env = _v2(tmp_path, signer, [dev])
    b = bytearray(env)
    other_epk = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    if edit == "truncated":
        b = b[:-1]
    elif edit == "padded":
        b += b"\x00"
    elif edit == "magic":
        b[0] ^= 0x01
    elif edit == "version":
        b[9] = 2
    elif edit == "epk_not_a_point":
        b[77] ^= 0x01  # X changes, Y stays: off the curve
    elif edit == "digest_bit":
        b[12] ^= 0x80
    elif edit == "key_id_bit":
        b[44] ^= 0x80
    elif edit == "wrapped_bit":
        b[150] ^= 0x04
    elif edit == "epk_other_point":
        b[76:141] = other_epk
    refused(dev, pkg, exc, envelope=bytes(b))


def test_forged_envelope_with_the_attackers_own_data_key(
        tmp_path: Path, signer: ed25519.Ed25519PrivateKey, dev: Device) -> None:
    """Anyone can wrap a key of their own to the device's public key, name this manifest
    (its digest is public: SHA-256 of the signed manifest bytes) and re-seal every chunk
    under that key (nonces and AAD come from the public header). The signed key
    commitment refuses it before a byte of payload is read."""
    pkg, env = _v2(tmp_path, signer, [dev])
    header, chunks = split(pkg)
    digest = hashlib.sha256(parse_header(header).manifest_bytes).digest()
    assert digest == Envelope.parse(env).manifest_digest
    evil_key = os.urandom(32)
    forged = seal_envelope(evil_key, dev.recipient, digest).to_bytes()
    hd, n = parse_header(header).header_digest, len(chunks)
    evil = payload_bytes(4 * CHUNK, 99)
    aead = AESGCM(evil_key)
    pkg.write_bytes(header + b"".join(
        aead.encrypt(chunk_nonce(hd, i, i == n - 1), evil[i * CHUNK:(i + 1) * CHUNK],
                     chunk_aad(hd, i, i == n - 1)) for i in range(n)))
    refused(dev, pkg, errors.KeyCommitmentError, envelope=forged)


def test_a_format_1_header_holding_a_format_2_manifest_is_refused(
        tmp_path: Path, signer: ed25519.Ed25519PrivateKey, dev: Device) -> None:
    pkg, env = _v2(tmp_path, signer, [dev])
    header, chunks = split(pkg)
    h = parse_header(header)
    pkg.write_bytes(encode_header(h.manifest_bytes, h.signature, 1) + b"".join(chunks))
    refused(dev, pkg, errors.FormatError, envelope=env)


def test_format_1_packages_are_still_read(tmp_path: Path, signer: ed25519.Ed25519PrivateKey,
                                          dev: Device) -> None:
    """Stored before format 2, or made then: the inline form stages, opens, and ignores
    an envelope that comes with it."""
    pkg, m = make_package(tmp_path, signer, [dev], version=2, envelopes=False)
    assert m.format == 1 and dev.recipient.fingerprint in m.recipients
    assert not bundle_path(pkg).exists()
    st = dev.store()
    st.stage(pkg)
    st.activate("m", 2)
    with st.open_payload("m") as opened:
        assert Path(opened.entry).read_bytes()[:16] == payload_bytes(16, 2)
    assert "envelope" not in json.loads(dev.ctx.state_file.read_text())[
        "models"]["m"]["versions"]["2"]


def test_the_stage_verb_takes_the_envelope_as_the_controller_sends_it(
        tmp_path: Path, signer: ed25519.Ed25519PrivateKey, dev: Device) -> None:
    pkg, env = _v2(tmp_path, signer, [dev])
    before = dev.stored_files()
    bad = dispatch(dev.ctx, "stage", {"path": str(pkg), "envelope": "not base64!"})
    assert not bad["ok"] and bad["error"]["code"] == "envelope_format", bad
    none = dispatch(dev.ctx, "stage", {"path": str(pkg)})
    assert not none["ok"] and none["error"]["code"] == "missing_envelope", none
    assert_untouched(dev, before)
    ok = dispatch(dev.ctx, "stage", {"path": str(pkg), "envelope": envelope_to_text(env)})
    assert ok["ok"] and ok["version"] == 2, ok


def test_format_1_past_the_device_limit_is_refused_at_build(
        tmp_path: Path, signer: ed25519.Ed25519PrivateKey) -> None:
    """Format 1 grows ~225 bytes per recipient; past the devices' manifest limit (1 MiB,
    ~4,600 recipients; 4 KiB here) the build refuses it rather than make a package no
    device accepts. Format 2 for the same devices stays small and builds."""
    from fleet.artifacts import build_package
    from fleet.core.package import Limits, Recipient

    src = tmp_path / "m.mnn"
    src.write_bytes(b"x" * 100)
    many = [Recipient.from_public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
            for _ in range(20)]
    small = Limits(max_manifest_bytes=4096)
    out = tmp_path / "o.fpkg"
    with pytest.raises(errors.UsageError) as info:
        build_package([("m.mnn", src)], out, name="m", version=1, kind="model",
                      recipients=many, signing_key=signer, entry="m.mnn", mnn_facts=None,
                      envelopes=False, limits=small)
    assert info.value.details["recipients"] == 20
    assert not out.exists() and list(tmp_path.iterdir()) == [src]
    m = build_package([("m.mnn", src)], out, name="m", version=1, kind="model",
                      recipients=many, signing_key=signer, entry="m.mnn", mnn_facts=None,
                      limits=small)
    assert m.format == 2 and bundle_path(out).stat().st_size == 48 + 20 * ENVELOPE_SIZE
