"""Device authentication after enrollment: a signed challenge traded for a bearer token.

Mender's scheme, without server-side session state: the server hands out a challenge
(``POST /auth/challenge``), the device signs ``b"fleet.pull/1 auth\\n" + challenge`` with
its P-256 key, and the server, once the signature verifies with the key the registry
holds for that device (and the device is not revoked), answers a bearer token valid for
``token_ttl_s`` (15 minutes by default). Challenges and tokens are
``base64url(JSON) "." base64url(HMAC-SHA256)`` under a server secret
(``$FLEET_HOME/keys/server_secret``, 32 random bytes, 0600, shared by every worker), so any
worker checks what another issued with no database read and nothing to expire. What a
token cannot say (the device was revoked a minute ago) is checked on every request
against the device row the request loads anyway.

Pure apart from :func:`load_secret`; times are Unix seconds (ints).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet.core import errors

__all__ = ["Claims", "check_challenge", "check_token", "load_secret", "make_challenge",
           "make_token"]

CHALLENGE_TTL_S = 120
_CHALLENGE = "c1"
_TOKEN = "t1"


def load_secret(path: Path) -> bytes:
    """The server secret, made on first use (O_EXCL: two workers starting at once agree
    on one file)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
            f.flush()
            os.fsync(f.fileno())
    data = path.read_bytes()
    if len(data) < 32:  # another worker is between create and write: read again
        import time

        for _ in range(50):
            time.sleep(0.02)
            data = path.read_bytes()
            if len(data) >= 32:
                break
    if len(data) < 32:
        raise errors.KeyMaterialError(f"server secret {path} is too short", path=str(path))
    return data


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _seal(secret: bytes, kind: str, claims: dict[str, Any]) -> str:
    body = _b64(json.dumps({"k": kind, **claims}, separators=(",", ":"),
                           sort_keys=True).encode())
    mac = hmac.new(secret, body.encode(), hashlib.sha256).digest()
    return f"{body}.{_b64(mac)}"


def _open(secret: bytes, kind: str, text: str, now: int, what: str) -> dict[str, Any]:
    if not isinstance(text, str) or text.count(".") != 1 or len(text) > 2048:
        raise errors.ServerAuthError(f"malformed {what}", status=401)
    body, mac = text.split(".")
    want = hmac.new(secret, body.encode(), hashlib.sha256).digest()
    try:
        got = _unb64(mac)
        claims = json.loads(_unb64(body))
    except (binascii.Error, ValueError) as exc:
        raise errors.ServerAuthError(f"malformed {what}", status=401) from exc
    if not hmac.compare_digest(want, got) or not isinstance(claims, dict) \
            or claims.get("k") != kind:
        raise errors.ServerAuthError(f"{what} was not issued by this server", status=401)
    exp = claims.get("exp")
    if not isinstance(exp, int) or now > exp:
        raise errors.ServerAuthError(f"{what} expired", status=401)
    return claims


def make_challenge(secret: bytes, fingerprint: str, now: int) -> str:
    return _seal(secret, _CHALLENGE, {"fp": fingerprint, "n": secrets.token_hex(16),
                                      "exp": now + CHALLENGE_TTL_S})


def check_challenge(secret: bytes, challenge: str, now: int) -> str:
    """The fingerprint a challenge was issued to; ServerAuthError when it is not one of
    ours or has expired."""
    claims = _open(secret, _CHALLENGE, challenge, now, "challenge")
    fp = claims.get("fp")
    if not isinstance(fp, str):
        raise errors.ServerAuthError("malformed challenge", status=401)
    return fp


@dataclass(frozen=True)
class Claims:
    device_id: str
    fingerprint: str
    expires: int


def make_token(secret: bytes, device_id: str, fingerprint: str, now: int, ttl_s: int) -> str:
    return _seal(secret, _TOKEN, {"d": device_id, "fp": fingerprint, "exp": now + ttl_s})


def check_token(secret: bytes, token: str, now: int) -> Claims:
    claims = _open(secret, _TOKEN, token, now, "token")
    d, fp = claims.get("d"), claims.get("fp")
    if not isinstance(d, str) or not isinstance(fp, str):
        raise errors.ServerAuthError("malformed token", status=401)
    return Claims(d, fp, int(claims["exp"]))
