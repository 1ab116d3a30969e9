"""Make the committed test vectors (run once; the committed files are the reference).

    .venv/bin/python docs/test-vectors/make_vectors.py

Writes vector1.fpkg (two files, 4 KiB chunks, so three chunks and a short last one), the
recipient's P-256 private key, the controller's Ed25519 public key, and vector1.json with
the expected plaintext digests and every intermediate value an implementation can check
step by step (ECDH secret, KEK, data key, header digest, chunk 0's nonce and AAD).
These keys are published test keys: never use them for anything else.
"""

from __future__ import annotations

import base64
import json
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fleet.artifacts import build_package
from fleet.artifacts.keys import public_pem
from fleet.core.package import Recipient, parse_header, unwrap_data_key
from fleet.core.package.chunks import chunk_aad, chunk_nonce
from fleet.core.package.recipients import derive_kek

HERE = Path(__file__).resolve().parent


def plaintext(n: int, mul: int) -> bytes:
    """Byte i is (i * mul) mod 251: easy to regenerate in any language."""
    return bytes((i * mul) % 251 for i in range(n))


def main() -> int:
    controller = ed25519.Ed25519PrivateKey.generate()
    device = ec.generate_private_key(ec.SECP256R1())
    files = {"model.mnn": plaintext(9000, 7), "golden.npz": plaintext(300, 13)}
    with tempfile.TemporaryDirectory() as tmp:
        pairs = []
        for rel, data in files.items():
            p = Path(tmp) / rel
            p.write_bytes(data)
            pairs.append((rel, p))
        r = Recipient.from_public_key(device.public_key(), "vector-device")
        m = build_package(pairs, HERE / "vector1.fpkg", name="vector-model", version=1,
                          kind="model", recipients=[r], signing_key=controller,
                          entry="model.mnn", mnn_facts=None, golden="golden.npz",
                          sequence=1, chunk_size=4096,
                          expires_in=timedelta(days=3650))  # a decoding vector: long-lived
    raw = (HERE / "vector1.fpkg").read_bytes()
    h = parse_header(raw)
    w = m.recipients[r.fingerprint]
    epk = base64.b64decode(w.epk)
    z = device.exchange(ec.ECDH(), ec.EllipticCurvePublicKey.from_encoded_point(
        ec.SECP256R1(), epk))
    content = m.content_digest()
    kek = derive_kek(z, content, r.fingerprint, epk)
    data_key = unwrap_data_key(w, device, r.fingerprint, content)
    (HERE / "vector1.recipient-key.pem").write_bytes(device.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (HERE / "vector1.controller-pub.pem").write_text(public_pem(controller.public_key()))
    expected = {
        "package": "vector1.fpkg",
        "plaintext_rule": "file bytes: model.mnn byte i = (i*7) mod 251, 9000 bytes; "
                          "golden.npz byte i = (i*13) mod 251, 300 bytes",
        "payload_sha256": m.sha256,
        "files": [f.to_dict() for f in m.files],
        "recipient_fingerprint": r.fingerprint,
        "controller_fingerprint": m.signer,
        "manifest_length": len(h.manifest_bytes),
        "payload_offset": h.payload_offset,
        "header_sha256": h.header_digest.hex(),
        "content_sha256": content.hex(),
        "ecdh_shared_secret": z.hex(),
        "hkdf_info": (b"fleet.kek/1\x00" + r.fingerprint.encode() + b"\x00" + epk).hex(),
        "kek": kek.hex(),
        "data_key": data_key.hex(),
        "chunk0_nonce": chunk_nonce(h.header_digest, 0, False).hex(),
        "chunk0_aad": chunk_aad(h.header_digest, 0, False).hex(),
        "last_chunk_nonce": chunk_nonce(h.header_digest, m.chunks - 1, True).hex(),
        "chunks": m.chunks,
    }
    (HERE / "vector1.json").write_text(json.dumps(expected, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
