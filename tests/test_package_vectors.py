"""The committed test vectors open, both through fleet.artifacts and through a second,
from-the-document implementation that uses only ``cryptography`` primitives: what an app
developer writes with javax.crypto or CryptoKit."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap

from fleet.core.package import decrypt_package, load_trusted_public_key

VEC = Path(__file__).resolve().parents[1] / "docs" / "test-vectors"


def _expected(name: str = "vector1") -> dict:  # type: ignore[type-arg]
    return json.loads((VEC / f"{name}.json").read_text())  # type: ignore[no-any-return]


def _plain(n: int, mul: int) -> bytes:
    return bytes((i * mul) % 251 for i in range(n))


def _keys(name: str = "vector1") -> tuple[ec.EllipticCurvePrivateKey,
                                          ed25519.Ed25519PublicKey]:
    dev = serialization.load_pem_private_key(
        (VEC / f"{name}.recipient-key.pem").read_bytes(), None)
    assert isinstance(dev, ec.EllipticCurvePrivateKey)
    return dev, load_trusted_public_key((VEC / f"{name}.controller-pub.pem").read_bytes())


@pytest.mark.parametrize("name", ["vector1", "vector2"])
def test_vector_opens_with_fleet_artifacts(name: str) -> None:
    exp = _expected(name)
    dev, ctrl = _keys(name)
    got: dict[str, bytearray] = {}
    envelope = (VEC / exp["envelope"]).read_bytes() if "envelope" in exp else None
    m = decrypt_package(VEC / exp["package"], ctrl, dev, envelope=envelope,
                        write=lambda p, v: got.setdefault(p, bytearray()).extend(v))
    assert m.sha256 == exp["payload_sha256"]
    assert m.format == (2 if name == "vector2" else 1)
    assert bytes(got["model.mnn"]) == _plain(9000, 7)
    assert bytes(got["golden.npz"]) == _plain(300, 13)


def test_vector_opens_with_an_independent_implementation_of_the_document() -> None:
    exp = _expected()
    dev, ctrl = _keys()
    raw = (VEC / exp["package"]).read_bytes()
    # Layout: magic, version, flags, manifest length, manifest, sig alg, sig len, sig.
    magic, version, flags, mlen = struct.unpack_from(">8sHHI", raw, 0)
    assert (magic, version, flags, mlen) == (b"\x89FPKG\r\n\x1a", 1, 0, exp["manifest_length"])
    manifest_bytes = raw[16:16 + mlen]
    alg, slen = struct.unpack_from(">HH", raw, 16 + mlen)
    assert (alg, slen) == (1, 64)
    sig = raw[20 + mlen:20 + mlen + slen]
    ctrl.verify(sig, manifest_bytes)  # raises if wrong
    payload_at = 20 + mlen + slen
    assert payload_at == exp["payload_offset"]
    header_digest = hashlib.sha256(raw[:payload_at]).digest()
    assert header_digest.hex() == exp["header_sha256"]
    manifest = json.loads(manifest_bytes)
    assert json.dumps(manifest, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode() == manifest_bytes  # canonical
    # Key unwrap: ECDH with the ephemeral key, HKDF bound to the content digest.
    content = {k: v for k, v in manifest.items() if k != "recipients"}
    content_digest = hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":"),
                                               ensure_ascii=False).encode()).digest()
    assert content_digest.hex() == exp["content_sha256"]
    fp = exp["recipient_fingerprint"]
    entry = manifest["recipients"][fp]
    epk = base64.b64decode(entry["epk"])
    z = dev.exchange(ec.ECDH(), ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(),
                                                                             epk))
    assert z.hex() == exp["ecdh_shared_secret"]
    info = b"fleet.kek/1\x00" + fp.encode() + b"\x00" + epk
    assert info.hex() == exp["hkdf_info"]
    kek = HKDF(hashes.SHA256(), 32, salt=content_digest, info=info).derive(z)
    assert kek.hex() == exp["kek"]
    data_key = aes_key_unwrap(kek, base64.b64decode(entry["wrapped_key"]))
    assert data_key.hex() == exp["data_key"]
    # Chunks: nonce = digest[:7] || u32 index || u8 last; aad = digest || u64 index || u8 last.
    size, csize = manifest["payload"]["size"], manifest["payload"]["chunk_size"]
    n = max(1, -(-size // csize))
    assert n == exp["chunks"]
    body, plain, pos = raw[payload_at:], bytearray(), 0
    aead = AESGCM(data_key)
    for i in range(n):
        last = i == n - 1
        clen = (csize if not last else size - csize * (n - 1)) + 16
        nonce = header_digest[:7] + struct.pack(">IB", i, last)
        aad = header_digest + struct.pack(">QB", i, last)
        if i == 0:
            assert (nonce.hex(), aad.hex()) == (exp["chunk0_nonce"], exp["chunk0_aad"])
        plain += aead.decrypt(nonce, body[pos:pos + clen], aad)
        pos += clen
    assert pos == len(body)  # nothing after the last chunk
    assert hashlib.sha256(plain).hexdigest() == exp["payload_sha256"] == manifest["payload"][
        "sha256"]
    for f in exp["files"]:
        part = bytes(plain[f["offset"]:f["offset"] + f["size"]])
        assert hashlib.sha256(part).hexdigest() == f["sha256"]
    assert bytes(plain[:9000]) == _plain(9000, 7)


def _chunks(raw: bytes, payload_at: int, header_digest: bytes, manifest: dict[str, Any],
            data_key: bytes) -> bytes:
    size, csize = manifest["payload"]["size"], manifest["payload"]["chunk_size"]
    n = max(1, -(-size // csize))
    body, plain, pos = raw[payload_at:], bytearray(), 0
    aead = AESGCM(data_key)
    for i in range(n):
        last = i == n - 1
        clen = (csize if not last else size - csize * (n - 1)) + 16
        plain += aead.decrypt(header_digest[:7] + struct.pack(">IB", i, last),
                              body[pos:pos + clen], header_digest + struct.pack(">QB", i, last))
        pos += clen
    assert pos == len(body)
    return bytes(plain)


def test_vector2_envelope_and_bundle_with_an_independent_implementation() -> None:
    """Format 2 from the document alone: the manifest names no recipient; the device's
    181-byte envelope (and the bundle of all three) carries its wrapped data key, bound to
    the manifest digest and its fingerprint; the manifest commits to the data key."""
    exp = _expected("vector2")
    dev, ctrl = _keys("vector2")
    raw = (VEC / exp["package"]).read_bytes()
    magic, version, flags, mlen = struct.unpack_from(">8sHHI", raw, 0)
    assert (magic, version, flags) == (b"\x89FPKG\r\n\x1a", 2, 0)
    manifest_bytes = raw[16:16 + mlen]
    alg, slen = struct.unpack_from(">HH", raw, 16 + mlen)
    assert (alg, slen) == (1, 64)
    ctrl.verify(raw[20 + mlen:20 + mlen + slen], manifest_bytes)
    payload_at = 20 + mlen + slen
    header_digest = hashlib.sha256(raw[:payload_at]).digest()
    assert header_digest.hex() == exp["header_sha256"]
    manifest = json.loads(manifest_bytes)
    assert manifest["type"] == "fleet.package/2" and "recipients" not in manifest
    assert manifest["key_wrap"] == "ECDH-P256+HKDF-SHA256+AES-KW/2"
    manifest_digest = hashlib.sha256(manifest_bytes).digest()  # the whole manifest
    assert manifest_digest.hex() == exp["manifest_sha256"] == exp["content_sha256"]
    # The envelope: magic, version, flags, manifest digest, key id, epk, wrapped key.
    env = (VEC / exp["envelope"]).read_bytes()
    assert len(env) == 181
    e_magic, e_ver, e_flags, e_digest, key_id, epk, wrapped = struct.unpack(
        ">8sHH32s32s65s40s", env)
    assert (e_magic, e_ver, e_flags) == (b"\x89FENV\r\n\x1a", 1, 0)
    assert e_digest == manifest_digest
    spki = dev.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    assert key_id == hashlib.sha256(spki).digest()
    fp = "SHA256:" + base64.b64encode(key_id).decode().rstrip("=")
    assert fp == exp["recipient_fingerprint"]
    z = dev.exchange(ec.ECDH(), ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(),
                                                                             epk))
    assert z.hex() == exp["ecdh_shared_secret"]
    info = b"fleet.kek/2\x00" + fp.encode() + b"\x00" + epk
    assert info.hex() == exp["hkdf_info"]
    kek = HKDF(hashes.SHA256(), 32, salt=manifest_digest, info=info).derive(z)
    assert kek.hex() == exp["kek"]
    data_key = aes_key_unwrap(kek, wrapped)
    assert data_key.hex() == exp["data_key"]
    commitment = hashlib.sha256(b"fleet.key-commitment/2\x00" + data_key).hexdigest()
    assert commitment == manifest["key_commitment"] == exp["key_commitment"]
    plain = _chunks(raw, payload_at, header_digest, manifest, data_key)
    assert hashlib.sha256(plain).hexdigest() == exp["payload_sha256"]
    assert plain[:9000] == _plain(9000, 7) and plain[9000:] == _plain(300, 13)
    # The bundle: a 48-byte head, then the records sorted by key id; ours is among them.
    bundle = (VEC / exp["bundle"]).read_bytes()
    b_magic, b_ver, rsize, count, b_digest = struct.unpack_from(">8sHHI32s", bundle, 0)
    assert (b_magic, b_ver, rsize, count) == (b"\x89FENB\r\n\x1a", 1, 181, 3)
    assert b_digest == manifest_digest and len(bundle) == 48 + 3 * 181
    records = [bundle[48 + i * 181:48 + (i + 1) * 181] for i in range(count)]
    assert [r[44:76] for r in records] == sorted(r[44:76] for r in records)
    assert records[exp["bundle_record_index"]] == env
