"""Make the committed test vectors (run once per vector; the committed files are the
reference, and running this again replaces them with new, equally valid ones).

    .venv/bin/python docs/test-vectors/make_vectors.py 2        # vector2 only
    .venv/bin/python docs/test-vectors/make_vectors.py 1 2      # both

Both hold the same two files (4 KiB chunks, so three chunks and a short last one).

- ``vector1``: format 1, the recipient's wrapped key inside the signed manifest.
  ``vector1.fpkg``, the recipient's P-256 private key, the controller's Ed25519 public key,
  and ``vector1.json`` with the expected plaintext digests and every intermediate value an
  implementation can check step by step (ECDH secret, KEK, data key, header digest, chunk
  0's nonce and AAD).
- ``vector2``: format 2, what the controller builds now: ``vector2.fpkg`` names no
  recipient; ``vector2.envelope`` is the vector device's 181-byte key envelope and
  ``vector2.fpkg.envelopes`` the bundle of all three recipients' envelopes (the other two
  private keys are thrown away). ``vector2.json`` adds the manifest digest, the envelope's
  fields, the key commitment and the bundle's layout.

These keys are published test keys: never use them for anything else.
"""

from __future__ import annotations

import base64
import json
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fleet.artifacts import build_package
from fleet.artifacts.keys import public_pem
from fleet.core.package import (
    Envelope,
    Manifest,
    Recipient,
    bundle_path,
    find_envelope,
    parse_header,
    unwrap_data_key,
)
from fleet.core.package.chunks import chunk_aad, chunk_nonce
from fleet.core.package.envelope import derive_kek2, key_commitment, open_envelope
from fleet.core.package.recipients import derive_kek

HERE = Path(__file__).resolve().parent


def plaintext(n: int, mul: int) -> bytes:
    """Byte i is (i * mul) mod 251: easy to regenerate in any language."""
    return bytes((i * mul) % 251 for i in range(n))


def _build(name: str, recipients: list[Recipient], controller: ed25519.Ed25519PrivateKey,
           envelopes: bool) -> Manifest:
    files = {"model.mnn": plaintext(9000, 7), "golden.npz": plaintext(300, 13)}
    with tempfile.TemporaryDirectory() as tmp:
        pairs = []
        for rel, data in files.items():
            p = Path(tmp) / rel
            p.write_bytes(data)
            pairs.append((rel, p))
        return build_package(pairs, HERE / f"{name}.fpkg", name="vector-model", version=1,
                             kind="model", recipients=recipients, signing_key=controller,
                             entry="model.mnn", mnn_facts=None, golden="golden.npz",
                             sequence=1, chunk_size=4096, envelopes=envelopes,
                             expires_in=timedelta(days=3650))  # a decoding vector: long-lived


def _common(name: str, m: Manifest, r: Recipient, z: bytes, info: bytes, kek: bytes,
            data_key: bytes, device: ec.EllipticCurvePrivateKey,
            controller: ed25519.Ed25519PrivateKey) -> dict[str, Any]:
    raw = (HERE / f"{name}.fpkg").read_bytes()
    h = parse_header(raw)
    (HERE / f"{name}.recipient-key.pem").write_bytes(device.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (HERE / f"{name}.controller-pub.pem").write_text(public_pem(controller.public_key()))
    return {
        "package": f"{name}.fpkg",
        "format": h.version,
        "plaintext_rule": "file bytes: model.mnn byte i = (i*7) mod 251, 9000 bytes; "
                          "golden.npz byte i = (i*13) mod 251, 300 bytes",
        "payload_sha256": m.sha256,
        "files": [f.to_dict() for f in m.files],
        "recipient_fingerprint": r.fingerprint,
        "controller_fingerprint": m.signer,
        "manifest_length": len(h.manifest_bytes),
        "payload_offset": h.payload_offset,
        "header_sha256": h.header_digest.hex(),
        "content_sha256": m.content_digest().hex(),
        "ecdh_shared_secret": z.hex(),
        "hkdf_info": info.hex(),
        "kek": kek.hex(),
        "data_key": data_key.hex(),
        "chunk0_nonce": chunk_nonce(h.header_digest, 0, False).hex(),
        "chunk0_aad": chunk_aad(h.header_digest, 0, False).hex(),
        "last_chunk_nonce": chunk_nonce(h.header_digest, m.chunks - 1, True).hex(),
        "chunks": m.chunks,
    }


def vector1() -> dict[str, Any]:
    controller = ed25519.Ed25519PrivateKey.generate()
    device = ec.generate_private_key(ec.SECP256R1())
    r = Recipient.from_public_key(device.public_key(), "vector-device")
    m = _build("vector1", [r], controller, envelopes=False)
    w = m.recipients[r.fingerprint]
    epk = base64.b64decode(w.epk)
    z = device.exchange(ec.ECDH(), ec.EllipticCurvePublicKey.from_encoded_point(
        ec.SECP256R1(), epk))
    content = m.content_digest()
    kek = derive_kek(z, content, r.fingerprint, epk)
    data_key = unwrap_data_key(w, device, r.fingerprint, content)
    info = b"fleet.kek/1\x00" + r.fingerprint.encode() + b"\x00" + epk
    return _common("vector1", m, r, z, info, kek, data_key, device, controller)


def vector2() -> dict[str, Any]:
    controller = ed25519.Ed25519PrivateKey.generate()
    device = ec.generate_private_key(ec.SECP256R1())
    r = Recipient.from_public_key(device.public_key(), "vector-device")
    others = [Recipient.from_public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
              for _ in range(2)]
    m = _build("vector2", [others[0], r, others[1]], controller, envelopes=True)
    raw_env = find_envelope(bundle_path(HERE / "vector2.fpkg"), r.fingerprint)
    assert raw_env is not None
    (HERE / "vector2.envelope").write_bytes(raw_env)
    env = Envelope.parse(raw_env)
    z = device.exchange(ec.ECDH(), ec.EllipticCurvePublicKey.from_encoded_point(
        ec.SECP256R1(), env.epk))
    kek = derive_kek2(z, env.manifest_digest, r.fingerprint, env.epk)
    data_key = open_envelope(env, device, m)
    info = b"fleet.kek/2\x00" + r.fingerprint.encode() + b"\x00" + env.epk
    doc = _common("vector2", m, r, z, info, kek, data_key, device, controller)
    bundle = bundle_path(HERE / "vector2.fpkg").read_bytes()
    doc.update({
        "envelope": "vector2.envelope",
        "bundle": "vector2.fpkg.envelopes",
        "manifest_sha256": env.manifest_digest.hex(),
        "envelope_key_id": env.key_id.hex(),
        "envelope_epk": env.epk.hex(),
        "envelope_wrapped_key": env.wrapped.hex(),
        "key_commitment": key_commitment(data_key),
        "bundle_records": int.from_bytes(bundle[12:16], "big"),
        "bundle_record_index": [bundle[48 + i * 181:48 + (i + 1) * 181]
                                for i in range(3)].index(raw_env),
    })
    return doc


def main(argv: list[str]) -> int:
    makers = {"1": vector1, "2": vector2}
    wanted = argv or sorted(makers)
    for which in wanted:
        doc = makers[which]()
        (HERE / f"vector{which}.json").write_text(
            json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
