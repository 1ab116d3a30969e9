"""The agent protocol envelope: ``{"schema": "fleet.agent/1", "ok": ..., "verb": ...}``.

Errors are data: ``{"ok": false, "error": {"code", "type", "message", "details"}}``. The
same documents travel over exec (ssh, adb shell, local) and the mailbox (iOS, app agents).
Arguments travel as JSON on stdin or, where a transport has no stdin, as base64url JSON in
``--args-b64``.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from fleet.core.errors import FleetError

__all__ = ["SCHEMA", "decode_args", "encode_args", "fail", "ok"]

SCHEMA = "fleet.agent/1"


def ok(verb: str, **data: Any) -> dict[str, Any]:
    return {"schema": SCHEMA, "ok": True, "verb": verb, **data}


def fail(verb: str, err: BaseException) -> dict[str, Any]:
    if isinstance(err, FleetError):
        error = err.to_dict()
    else:
        error = {"code": "internal", "type": type(err).__name__, "message": str(err),
                 "details": {}}
    return {"schema": SCHEMA, "ok": False, "verb": verb, "error": error}


def encode_args(args: dict[str, Any]) -> str:
    raw = json.dumps(args, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_args(text: str) -> dict[str, Any]:
    pad = "=" * (-len(text) % 4)
    value = json.loads(base64.urlsafe_b64decode(text + pad))
    if not isinstance(value, dict):
        raise ValueError("agent arguments must be a JSON object")
    return value
