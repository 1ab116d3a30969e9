"""One-time enrollment tokens for ``pull://`` devices (``fleet device add pull://NAME``).

The token is 32 random bytes (``fpe_`` + base64url), printed once; the registry keeps its
SHA-256 only, with an expiry (``FLEET_ENROLL_TOKEN_TTL_H``, default 24 h) and, once
redeemed, when. Redeeming is one transaction that marks the token used and records the
device key, so two agents racing with one token cannot both enroll.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlmodel import col, select

from fleet.core import errors
from fleet.core.package import Recipient
from fleet.registry import Device, Registry
from fleet.registry.db import serialize
from fleet.registry.models import EnrollmentToken
from fleet.registry.types import utcnow

__all__ = ["TOKEN_TTL_ENV", "Enrolled", "issue_token", "redeem_token", "token_ttl"]

TOKEN_TTL_ENV = "FLEET_ENROLL_TOKEN_TTL_H"
PREFIX = "fpe_"


def token_ttl() -> timedelta:
    raw = os.environ.get(TOKEN_TTL_ENV, "")
    try:
        hours = float(raw) if raw else 24.0
    except ValueError as exc:
        raise errors.UsageError(f"{TOKEN_TTL_ENV}={raw!r} is not a number of hours") from exc
    if hours <= 0:
        raise errors.UsageError(f"{TOKEN_TTL_ENV} must be positive")
    return timedelta(hours=hours)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def issue_token(reg: Registry, device: Device, *, ttl: timedelta | None = None,
                now: datetime | None = None) -> tuple[str, datetime]:
    """A new token for ``device`` (earlier unused ones stay valid until they expire);
    returns (token, expiry)."""
    token = PREFIX + secrets.token_urlsafe(32)
    expires = (now or utcnow()) + (ttl or token_ttl())
    with reg.session() as s:
        s.add(EnrollmentToken(device_id=device.id, token_sha256=_digest(token),
                              expires_at=expires))
    return token, expires


@dataclass(frozen=True)
class Enrolled:
    device: Device
    fingerprint: str


def redeem_token(reg: Registry, token: str, public_key_pem: str, *,
                 agent_version: str | None = None, now: datetime | None = None) -> Enrolled:
    """Mark ``token`` used and record the device's key. EnrollTokenError when the token is
    unknown, used or expired; RevokedError for a revoked device; KeyMaterialError for a
    key that is not P-256."""
    if not isinstance(token, str) or not token.startswith(PREFIX) or len(token) > 128:
        raise errors.EnrollTokenError("unknown enrollment token", status=401)
    rec = Recipient.from_pem(public_key_pem, name="enrolling device")
    t = now or utcnow()
    with reg.session() as s:
        serialize(s, f"enroll-token:{_digest(token)}")
        row = s.exec(select(EnrollmentToken).where(
            col(EnrollmentToken.token_sha256) == _digest(token)).with_for_update()).first()
        if row is None:
            raise errors.EnrollTokenError("unknown enrollment token", status=401)
        if row.used_at is not None:
            raise errors.EnrollTokenError("enrollment token already used", status=401)
        if row.expires_at < t:
            raise errors.EnrollTokenError("enrollment token expired", status=401,
                                          expired_at=row.expires_at.isoformat())
        dev = s.get(Device, row.device_id)
        if dev is None:
            raise errors.EnrollTokenError("unknown enrollment token", status=401)
        if dev.revoked_at is not None:
            raise errors.RevokedError(f"device {dev.name} is revoked", status=403)
        other = s.exec(select(Device.name).where(col(Device.fingerprint) == rec.fingerprint)
                       .where(col(Device.id) != dev.id)).first()
        if other is not None:
            raise errors.DuplicateError(f"this key is already enrolled as {other!r}",
                                        status=409, existing=other)
        row.used_at = t
        dev.public_key = public_key_pem
        dev.fingerprint = rec.fingerprint
        dev.status = "enrolled"
        dev.last_seen = t
        if agent_version:
            dev.agent_version = agent_version
        s.add(row)
        s.add(dev)
        s.flush()
        return Enrolled(dev, rec.fingerprint)
