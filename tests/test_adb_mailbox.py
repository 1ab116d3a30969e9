"""The mailbox documents (fleet.mailbox), pure: what the controller accepts as an answer.

The end-to-end mailbox over adb is in test_adb_transport.py; these pin the format shared
with the emulated iOS and Android apps (fleet.lab.ios_app.handle_request)."""

from __future__ import annotations

import base64
import json

import pytest

from fleet.core import errors
from fleet.lab.ios_app import handle_request
from fleet.mailbox import SCHEMA, decode_response, encode_request


def _response(rid: str, **over: object) -> bytes:
    doc = {"schema": SCHEMA, "id": rid, "exit_code": 3,
           "stdout_b64": base64.b64encode(b"out").decode(),
           "stderr_b64": base64.b64encode(b"err").decode(), "duration_s": 0.1}
    doc.update(over)
    return json.dumps(doc).encode()


def test_request_carries_argv_stdin_and_deadline() -> None:
    doc = json.loads(encode_request("abc", ["fleet-agent", "status"], stdin=b"\x00\xff",
                                    timeout=9.0))
    assert doc == {"schema": SCHEMA, "id": "abc", "argv": ["fleet-agent", "status"],
                   "stdin_b64": "AP8=", "timeout_s": 9.0}


def test_response_round_trip() -> None:
    assert decode_response(_response("r1"), "r1") == (3, b"out", b"err")


@pytest.mark.parametrize("bad", [_response("other"), _response("r1", schema="x/1"),
                                 b"not json", _response("r1", exit_code=None)])
def test_foreign_or_malformed_answers_are_refused(bad: bytes) -> None:
    with pytest.raises(errors.TransportError, match="malformed mailbox response"):
        decode_response(bad, "r1")


def test_the_app_side_answers_in_the_same_format(tmp_path) -> None:  # type: ignore[no-untyped-def]
    request = json.loads(encode_request("r2", ["/bin/sh", "-c", "echo no"]))
    code, out, err = decode_response(json.dumps(handle_request(tmp_path, request)).encode(),
                                     "r2")
    assert code == 127 and out == b"" and b"runs only fleet-agent" in err  # not a shell
