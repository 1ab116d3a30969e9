"""Rollback orders: the only way back to an older version.

A device refuses any package at or below the highest version it accepted (a replayed old
package is an attack: it may carry a fixed vulnerability). When the operator really wants
to go back, the controller signs an order naming the model, the version and a sequence
number higher than any the device has seen for that name; the device accepts it once
(the sequence number it then records makes a replay of the same order stale).

An order expires (``expires``, one day by default): a withheld order cannot be played
later. Its ``sequence`` comes from the registry's monotonic counter (the controller's
:func:`fleet.artifacts.trust.next_sequence`), never the clock: a clock that was once
ahead must not block every later order. :func:`default_sequence` (milliseconds) is only
the fallback of this low-level API when no counter is given.

Wire form, as sent in agent arguments: ``{"order": {...}, "signature": "<base64>"}``; the
signature is Ed25519 over the canonical JSON of ``order``. ``order.type`` differs from a
manifest's, so a signed order can never pass for a manifest or the other way round.
"""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from fleet.core import errors
from fleet.core.package.canonical import canonical_bytes
from fleet.core.package.keyid import fingerprint_public_key
from fleet.core.package.layout import SIG_ED25519
from fleet.core.package.manifest import Manifest
from fleet.core.package.trust import ClockReading, check_freshness, format_time
from fleet.core.package.verify import ModelState, RollbackAllowance, Signers, check_signature

__all__ = ["DEFAULT_ORDER_TTL", "ORDER_TYPE", "RollbackOrder", "default_sequence",
           "sign_rollback_order", "verify_rollback_order"]

ORDER_TYPE = "fleet.rollback-order/1"
#: how long a signed rollback order stays valid unless the caller says otherwise
DEFAULT_ORDER_TTL = timedelta(days=1)


def default_sequence() -> int:
    """Milliseconds since the epoch: a counter that needs no state on the controller and
    only goes up while its clock does. Pass an explicit sequence to override."""
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class RollbackOrder:
    name: str
    version: int
    sequence: int
    devices: tuple[str, ...] | None
    created: str
    signer: str
    expires: str | None = None

    def allowance(self) -> RollbackAllowance:
        return RollbackAllowance(self.name, self.version, self.sequence)


def sign_rollback_order(signing_key: ed25519.Ed25519PrivateKey, *, name: str, version: int,
                        sequence: int | None = None, devices: list[str] | None = None,
                        expires_in: timedelta = DEFAULT_ORDER_TTL,
                        now: datetime | None = None) -> dict[str, Any]:
    """A signed order allowing ``name`` ``version`` on ``devices`` (fingerprints; None: all),
    valid for ``expires_in`` from ``now``."""
    if not Manifest.valid_name(name) or version < 1:
        raise errors.UsageError("rollback order needs a valid model name and version >= 1")
    created = now or datetime.now(UTC)
    order = {
        "type": ORDER_TYPE, "name": name, "version": version,
        "sequence": default_sequence() if sequence is None else sequence,
        "devices": sorted(devices) if devices is not None else None,
        "created": format_time(created), "expires": format_time(created + expires_in),
        "signer": fingerprint_public_key(signing_key.public_key()),
    }
    sig = signing_key.sign(canonical_bytes(order))
    return {"order": order, "signature": base64.b64encode(sig).decode()}


def verify_rollback_order(doc: Any, trusted_signer: Signers,
                          device_fingerprint: str | None, state: ModelState | None,
                          clock: ClockReading | None = None) -> RollbackOrder:
    """Check an order's signature, expiry (given the device's ``clock``), addressee and
    sequence; pure."""
    if not isinstance(doc, dict) or not isinstance(doc.get("order"), dict):
        raise errors.FormatError("rollback order must be {order: {...}, signature: ...}")
    try:
        sig = base64.b64decode(doc.get("signature") or "", validate=True)
    except (binascii.Error, TypeError) as exc:
        raise errors.FormatError("rollback order signature is not base64") from exc
    body = canonical_bytes(doc["order"])
    o = check_signature(body, SIG_ED25519 if sig else 0, sig, trusted_signer,
                        what="rollback order")
    if o.get("type") != ORDER_TYPE:
        raise errors.FormatError(f"not a rollback order (type {o.get('type')!r})")
    name, version, seq = o.get("name"), o.get("version"), o.get("sequence")
    devices = o.get("devices")
    expires = o.get("expires")
    if not (expires is None or isinstance(expires, str)):
        raise errors.FormatError("malformed rollback order expiry")
    if clock is not None:
        check_freshness(f"rollback order for {name}@{version}", str(o.get("created")),
                        expires, clock)
    if not (isinstance(name, str) and Manifest.valid_name(name)
            and isinstance(version, int) and version >= 1
            and isinstance(seq, int) and seq >= 0
            and (devices is None or (isinstance(devices, list)
                                     and all(isinstance(d, str) for d in devices)))):
        raise errors.FormatError("malformed rollback order")
    if device_fingerprint is not None and devices is not None \
            and device_fingerprint not in devices:
        raise errors.NotRecipientError("rollback order is not addressed to this device",
                                       device=device_fingerprint)
    if state is not None and seq <= state.sequence:
        raise errors.ReplayError(
            f"rollback order sequence {seq} is not newer than {state.sequence} seen here",
            sequence=seq, seen=state.sequence, name=name)
    return RollbackOrder(name=name, version=version, sequence=seq,
                         devices=tuple(devices) if devices is not None else None,
                         created=str(o.get("created")), signer=str(o.get("signer")),
                         expires=expires)
