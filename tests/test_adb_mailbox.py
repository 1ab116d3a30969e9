"""The mailbox documents (``fleet.mailbox/2``), pure: exactly the fields that
``docs/agent-protocol.md`` lists, written by the controller and read by the app side.

The end-to-end mailbox over adb is in test_adb_transport.py, over AFC in
test_ios_transport.py; the attacks are in test_mailbox_auth.py."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fleet.core import mailbox as mb
from fleet.core.package.keyid import fingerprint_public_key
from fleet.lab.ios_app import handle_request

NOW = 1_800_000_000


def test_request_document_fields() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    data = mb.sign_request(key, rid="ab" * 16, argv=["fleet-agent", "status"],
                           device="SHA256:" + "A" * 43, now=NOW, timeout_s=9.5,
                           stdin=b"\x00\xff", nonce="0" * 32)
    doc = json.loads(data)
    assert set(doc) == {"schema", "id", "argv", "stdin_b64", "timeout_s", "device", "nonce",
                        "expires", "signer", "sig"}
    assert doc["schema"] == "fleet.mailbox/2" and doc["stdin_b64"] == "AP8="
    assert doc["timeout_s"] == 9 and doc["expires"] == NOW + mb.DEFAULT_TTL_S
    assert doc["signer"] == fingerprint_public_key(key.public_key())
    # canonical JSON: the exact bytes are what the answer binds to
    assert data == json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    body = {k: v for k, v in doc.items() if k != "sig"}
    key.public_key().verify(base64.b64decode(doc["sig"]), b"fleet.mailbox/2 request\n"
                            + json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def test_answer_document_fields() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    data = mb.sign_answer(key, rid="ab" * 16, request=b"req", exit_code=3, stdout=b"out",
                          stderr=b"err", duration_s=0.1234, with_public_key=True)
    doc = json.loads(data)
    assert set(doc) == {"schema", "id", "request_sha256", "exit_code", "stdout_b64",
                        "stderr_b64", "duration_ms", "signer", "signer_pub", "sig"}
    assert (doc["exit_code"], doc["duration_ms"]) == (3, 123)
    assert doc["request_sha256"] == mb.request_sha256(b"req")
    ans = mb.verify_answer(data, rid="ab" * 16, request=b"req", device_key=key.public_key())
    assert (ans.exit_code, ans.stdout, ans.stderr) == (3, b"out", b"err")


def test_the_app_side_answers_in_the_same_format(tmp_path: Path) -> None:
    """The lab app hands the bytes to the agent's handler (a real child process): an
    unenrolled app refuses an unsigned request, unsigned itself (it has no key yet)."""
    req = json.dumps({"schema": mb.SCHEMA, "id": "ab" * 16,
                      "argv": ["/bin/sh", "-c", "echo no"]}).encode()
    answer = handle_request(tmp_path, req, "ab" * 16)
    assert answer is not None
    doc = json.loads(answer)
    assert doc["id"] == "ab" * 16 and doc["request_sha256"] == mb.request_sha256(req)
    err = json.loads(base64.b64decode(doc["stdout_b64"]))["error"]
    assert err["code"] == "mailbox_unsigned" and "sig" not in doc
