"""One test per attack on a package (issue 3). Each device first installs v1; each attack
is then tried with a v2 and must be refused with its own error, leave nothing new in the
store and leave v1 active and openable."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from fleet_agent.store import Store

from fleet.artifacts import read_manifest
from fleet.artifacts.build import base_binding
from fleet.core import errors
from fleet.core.package import (
    Limits,
    Recipient,
    decrypt_chunks,
    encode_header,
    parse_header,
)
from fleet.core.package.chunks import chunk_aad, chunk_nonce
from fleet.core.package.orders import sign_rollback_order
from tests.package_kit import (
    CHUNK,
    Device,
    data_key_of,
    envelope_of,
    make_device,
    make_package,
    payload_bytes,
    split,
)


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


def assert_untouched(d: Device, before: list[str], version: int = 1) -> None:
    """The refused package left nothing behind and the active model still opens."""
    assert d.stored_files() == before
    st = Store(d.ctx)
    slot = st.active("m")
    assert slot is not None and slot.version == version
    with st.open_payload("m") as opened:
        assert opened.manifest.version == version
        assert Path(opened.entry).read_bytes()[:16] == payload_bytes(16, version)


def refused(d: Device, pkg: Path, exc: type[errors.FleetError], **kw: object
            ) -> errors.FleetError:
    before = d.stored_files()
    with pytest.raises(exc) as info:
        d.store().stage(pkg, **kw)  # type: ignore[arg-type]
    assert type(info.value) is exc, f"expected exactly {exc.__name__}"
    assert_untouched(d, before, version=d.store().active("m").version)  # type: ignore[union-attr]
    return info.value


def test_unsigned_manifest(tmp_path: Path, signer: ed25519.Ed25519PrivateKey, dev: Device
                           ) -> None:
    pkg, _ = make_package(tmp_path, signer, [dev], version=2)
    header, chunks = split(pkg)
    h = parse_header(header)
    pkg.write_bytes(encode_header(h.manifest_bytes, None) + b"".join(chunks))
    refused(dev, pkg, errors.UnsignedError)


def test_signed_by_another_key(tmp_path: Path, dev: Device) -> None:
    other = ed25519.Ed25519PrivateKey.generate()
    pkg, _ = make_package(tmp_path, other, [dev], version=2)
    err = refused(dev, pkg, errors.UntrustedSignerError)
    assert err.details["signer"] != err.details["trusted"]


def test_other_key_claiming_to_be_the_trusted_signer(tmp_path: Path,
                                                     signer: ed25519.Ed25519PrivateKey,
                                                     dev: Device) -> None:
    pkg, _ = make_package(tmp_path, signer, [dev], version=2)
    header, chunks = split(pkg)
    h = parse_header(header)
    forged = ed25519.Ed25519PrivateKey.generate().sign(h.manifest_bytes)
    pkg.write_bytes(encode_header(h.manifest_bytes, forged) + b"".join(chunks))
    refused(dev, pkg, errors.BadSignatureError)


def test_manifest_edited_after_signing(tmp_path: Path, signer: ed25519.Ed25519PrivateKey,
                                       dev: Device) -> None:
    pkg, _ = make_package(tmp_path, signer, [dev], version=2)
    header, chunks = split(pkg)
    h = parse_header(header)
    edited = h.manifest_bytes.replace(b'"version":2', b'"version":9')
    assert edited != h.manifest_bytes
    pkg.write_bytes(encode_header(edited, h.signature) + b"".join(chunks))
    refused(dev, pkg, errors.BadSignatureError)


@pytest.mark.parametrize("which", ["first", "middle", "last"])
def test_one_flipped_bit_in_a_chunk(tmp_path: Path, signer: ed25519.Ed25519PrivateKey,
                                    dev: Device, which: str) -> None:
    pkg, _ = make_package(tmp_path, signer, [dev], version=2, size=5 * CHUNK - 300)
    header, chunks = split(pkg)
    i = {"first": 0, "middle": 2, "last": len(chunks) - 1}[which]
    bad = bytearray(chunks[i])
    bad[len(bad) // 3] ^= 0x10
    chunks[i] = bytes(bad)
    pkg.write_bytes(header + b"".join(chunks))
    err = refused(dev, pkg, errors.ChunkAuthError)
    assert err.details["chunk"] == i and err.details["reason"] == "spliced_or_corrupt"


def test_truncated_last_chunk_removed(tmp_path: Path, signer: ed25519.Ed25519PrivateKey,
                                      dev: Device) -> None:
    pkg, _ = make_package(tmp_path, signer, [dev], version=2)
    header, chunks = split(pkg)
    pkg.write_bytes(header + b"".join(chunks[:-1]))
    refused(dev, pkg, errors.TruncatedPayloadError)


def test_truncated_stream_is_caught_without_knowing_the_file_size(
        tmp_path: Path, signer: ed25519.Ed25519PrivateKey, dev: Device) -> None:
    pkg, m = make_package(tmp_path, signer, [dev], version=2)
    header, chunks = split(pkg)
    key = data_key_of(pkg, m, dev)
    stream = io.BytesIO(b"".join(chunks[:-1]))
    with pytest.raises(errors.TruncatedPayloadError):
        for _ in decrypt_chunks(stream, key, parse_header(header).header_digest, m.size,
                                m.chunk_size):
            pass


def test_chunks_reordered(tmp_path: Path, signer: ed25519.Ed25519PrivateKey, dev: Device
                          ) -> None:
    pkg, _ = make_package(tmp_path, signer, [dev], version=2)
    header, chunks = split(pkg)
    chunks[0], chunks[1] = chunks[1], chunks[0]
    pkg.write_bytes(header + b"".join(chunks))
    err = refused(dev, pkg, errors.ChunkOrderError)
    assert err.details == {"chunk": 0, "found": 1}


def test_chunk_spliced_from_another_package(tmp_path: Path, signer: ed25519.Ed25519PrivateKey,
                                            dev: Device) -> None:
    pkg, _ = make_package(tmp_path, signer, [dev], version=2)
    other, _ = make_package(tmp_path, signer, [dev], version=2)  # same content, new key
    header, chunks = split(pkg)
    _, foreign = split(other)
    chunks[1] = foreign[1]
    pkg.write_bytes(header + b"".join(chunks))
    err = refused(dev, pkg, errors.ChunkAuthError)
    assert err.details["chunk"] == 1 and err.details["reason"] == "spliced_or_corrupt"
    assert err.details["probed"] == len(chunks) - 1  # tried at every other position


def test_bytes_appended_past_the_declared_size(tmp_path: Path,
                                               signer: ed25519.Ed25519PrivateKey,
                                               dev: Device) -> None:
    pkg, _ = make_package(tmp_path, signer, [dev], version=2)
    with pkg.open("ab") as f:
        f.write(b"\x00" * 100)
    refused(dev, pkg, errors.TrailingDataError)


class _Endless(io.RawIOBase):
    """The payload, then zeros forever: a reader must stop after one extra byte."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos, self.extra_read = data, 0, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b):  # type: ignore[no-untyped-def]
        n = len(b)
        chunk = self.data[self.pos:self.pos + n]
        k = len(chunk)
        b[:k] = chunk
        b[k:n] = b"\x00" * (n - k)
        self.pos += n
        self.extra_read += n - k
        return n


def test_endless_data_stops_after_the_last_chunk(tmp_path: Path,
                                                 signer: ed25519.Ed25519PrivateKey,
                                                 dev: Device) -> None:
    pkg, m = make_package(tmp_path, signer, [dev], version=2)
    header, chunks = split(pkg)
    key = data_key_of(pkg, m, dev)
    src = _Endless(b"".join(chunks))
    with pytest.raises(errors.TrailingDataError):
        for _ in decrypt_chunks(io.BufferedReader(src, 1), key,
                                parse_header(header).header_digest, m.size, m.chunk_size):
            pass
    assert src.extra_read <= 8  # read one byte past the end, not the endless rest


def test_package_for_another_device(tmp_path: Path, signer: ed25519.Ed25519PrivateKey,
                                    dev: Device) -> None:
    """Format 2 names no recipient in the manifest: the device learns it is not one from
    the envelope it is sent (the other device's, here: all a confused controller has)."""
    other = make_device(tmp_path / "dev-b", signer)
    pkg, _ = make_package(tmp_path, signer, [other], version=2)
    err = refused(dev, pkg, errors.NotRecipientError, envelope=envelope_of(pkg, other))
    assert err.details["device"] == dev.recipient.fingerprint
    assert err.details["envelope_for"] == other.recipient.fingerprint
    refused(dev, pkg, errors.NotRecipientError)  # nor does the bundle beside it


def test_wrapped_key_that_does_not_open_with_this_device_key(
        tmp_path: Path, signer: ed25519.Ed25519PrivateKey, dev: Device) -> None:
    other = make_device(tmp_path / "dev-b", signer)
    # Addressed to this device's fingerprint, but wrapped to another device's key.
    liar = Recipient(dev.recipient.fingerprint, other.key.public_key())
    pkg, _ = make_package(tmp_path, signer, [], version=2, recipients=[liar])
    refused(dev, pkg, errors.WrongKeyError)


def test_payload_over_the_device_size_limit(tmp_path: Path, signer: ed25519.Ed25519PrivateKey,
                                            dev: Device) -> None:
    pkg, _ = make_package(tmp_path, signer, [dev], version=2, size=10 * CHUNK)
    before = dev.stored_files()
    with pytest.raises(errors.SizeLimitError):
        Store(dev.ctx, limits=Limits(max_payload_bytes=8 * CHUNK)).stage(pkg)
    assert_untouched(dev, before)


def test_fellow_recipient_reencrypting_other_content(tmp_path: Path,
                                                    signer: ed25519.Ed25519PrivateKey,
                                                    dev: Device) -> None:
    """A recipient knows the data key and can re-seal every chunk with other content:
    AES-GCM alone cannot see it; the signed plaintext digest does."""
    pkg, m = make_package(tmp_path, signer, [dev], version=2)
    header, chunks = split(pkg)
    key = data_key_of(pkg, m, dev)
    hd = parse_header(header).header_digest
    evil = payload_bytes(m.size, 99)
    aead, n = AESGCM(key), len(chunks)
    resealed = [aead.encrypt(chunk_nonce(hd, i, i == n - 1), evil[i * CHUNK:(i + 1) * CHUNK],
                             chunk_aad(hd, i, i == n - 1)) for i in range(n)]
    pkg.write_bytes(header + b"".join(resealed))
    refused(dev, pkg, errors.DigestMismatchError)


def test_older_version_is_a_rollback(tmp_path: Path, signer: ed25519.Ed25519PrivateKey,
                                     dev: Device) -> None:
    v2, _ = make_package(tmp_path, signer, [dev], version=2)
    dev.store().stage(v2)
    dev.store().activate("m", 2)
    old, _ = make_package(tmp_path, signer, [dev], version=1, seed=1)  # a fresh v1 build
    err = refused(dev, old, errors.RollbackError)
    assert err.details["floor"] == 2


def test_same_version_is_a_replay(tmp_path: Path, signer: ed25519.Ed25519PrivateKey,
                                  dev: Device) -> None:
    again, _ = make_package(tmp_path, signer, [dev], version=1)
    refused(dev, again, errors.ReplayError)


def test_restaging_the_identical_package_is_a_no_op(tmp_path: Path,
                                                    signer: ed25519.Ed25519PrivateKey,
                                                    dev: Device) -> None:
    pkg, _ = make_package(tmp_path, signer, [dev], version=2)
    first = dev.store().stage(pkg)
    before = dev.stored_files()
    second = dev.store().stage(pkg)  # a controller retry after a lost answer
    assert second.already and not first.already
    assert dev.stored_files() == before


def test_signed_rollback_order_allows_going_back(tmp_path: Path,
                                                signer: ed25519.Ed25519PrivateKey,
                                                dev: Device) -> None:
    st = dev.store()
    v2, _ = make_package(tmp_path, signer, [dev], version=2)
    st.stage(v2)
    st.activate("m", 2)
    order = sign_rollback_order(signer, name="m", version=1,
                                devices=[dev.recipient.fingerprint])
    change = st.rollback("m", order)
    assert (change.current, change.previous) == (1, 2)
    assert st.active("m").version == 1  # type: ignore[union-attr]
    with pytest.raises(errors.ReplayError):  # the same order cannot be used twice
        st.rollback("m", order)
    # An older package that was never staged comes in only with an order, too.
    st.activate("m", 2)
    pkg0, _ = make_package(tmp_path, signer, [dev], version=1, name="m", seed=5)
    with pytest.raises(errors.RollbackError):
        st.stage(pkg0)
    forged = sign_rollback_order(ed25519.Ed25519PrivateKey.generate(), name="m", version=1)
    with pytest.raises(errors.UntrustedSignerError):
        st.rollback("m", forged)
    elsewhere = sign_rollback_order(signer, name="m", version=1, devices=["SHA256:" + "A" * 43])
    with pytest.raises(errors.NotRecipientError):
        st.rollback("m", elsewhere)


def test_lora_bound_to_another_base(tmp_path: Path, signer: ed25519.Ed25519PrivateKey,
                                    dev: Device) -> None:
    st = dev.store()
    base_files = [("llm.mnn", payload_bytes(3000, 1)), ("llm.mnn.weight", payload_bytes(9000, 2))]
    base_pkg, base_m = make_package(tmp_path, signer, [dev], version=1, name="qwen",
                                    files=base_files)
    st.stage(base_pkg)
    st.activate("qwen", 1)
    binding = base_binding(base_m)
    wrong = dict(binding, llm_weight_sha256="0" * 64)  # another export of the base
    lora = [("lora.mnn", payload_bytes(500, 3))]
    bad, _ = make_package(tmp_path, signer, [dev], version=1, name="ad", kind="lora",
                          base=wrong, files=lora)
    before = dev.stored_files()
    with pytest.raises(errors.BaseMismatchError) as info:
        st.stage(bad)
    assert "llm_weight_sha256" in info.value.details["mismatches"]
    assert dev.stored_files() == before
    assert st.active("qwen").version == 1  # type: ignore[union-attr]
    good, _ = make_package(tmp_path, signer, [dev], version=1, name="ad", kind="lora",
                           base=binding, files=lora)
    assert st.stage(good).kind == "lora"


def test_lora_without_its_base_installed(tmp_path: Path, signer: ed25519.Ed25519PrivateKey,
                                         dev: Device) -> None:
    base = {"name": "absent", "llm_mnn_sha256": "1" * 64, "llm_weight_sha256": "2" * 64}
    lora, _ = make_package(tmp_path, signer, [dev], version=1, name="ad", kind="lora",
                           base=base, files=[("lora.mnn", b"x" * 100)])
    with pytest.raises(errors.BaseMismatchError) as info:
        dev.store().stage(lora)
    assert info.value.details["reason"] == "base_not_installed"


def test_not_a_package_at_all(tmp_path: Path, dev: Device) -> None:
    junk = tmp_path / "junk.fpkg"
    junk.write_bytes(b"PK\x03\x04 definitely a zip file" * 10)
    refused(dev, junk, errors.FormatError)


def test_read_manifest_checks_the_signature_when_given_the_key(
        tmp_path: Path, signer: ed25519.Ed25519PrivateKey, dev: Device) -> None:
    pkg, m = make_package(tmp_path, signer, [dev], version=2)
    assert read_manifest(pkg).package_id == m.package_id
    assert read_manifest(pkg, signer.public_key()).version == 2
    with pytest.raises(errors.UntrustedSignerError):
        read_manifest(pkg, ed25519.Ed25519PrivateKey.generate().public_key())
    assert json.loads(parse_header(pkg.read_bytes()).manifest_bytes)["name"] == "m"
