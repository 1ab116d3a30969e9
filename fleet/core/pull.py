"""Pull mode's signed documents, shared by the fleet server and the agent (pure, no I/O).

Three documents travel between a device that polls and ``fleet server``
(``docs/device-api.md``):

- **Desired state** (server -> device): what the device should run, signed with the
  controller's online Ed25519 key (an online key of the root of trust the device pinned),
  addressed to one device key, with an expiry (freeze protection) and a ``counter`` from
  the registry's monotonic counter (never the clock: no replay of an older state)::

      {"state": {"type": "fleet.desired-state/1", "device": "SHA256:…", "counter": 42,
                 "created": "…Z", "expires": "…Z", "signer": "SHA256:…",
                 "models": [{"name", "version", "kind", "package_sha256", "size",
                             "digest", "envelope", "activate", "order",
                             "deployment"}]},
       "signature": "<base64 Ed25519 over the canonical JSON of state>"}

  ``type`` differs from a manifest's and a rollback order's, so no signature of the same
  key passes for another kind of document.
- **Auth challenge** (device proves it holds its key): the device signs
  ``b"fleet.pull/1 auth\\n" + challenge`` (ECDSA P-256, SHA-256, DER) and trades it for a
  short-lived bearer token (Mender's scheme).
- **Report** (device -> server): an activation report signed by the device key over
  ``b"fleet.pull/1 report\\n"`` + the exact JSON text uploaded, so a report forged by
  anyone without the device key is refused even with a stolen bearer token.

Each refusal is its own error class (python-tuf's style): ``FormatError``,
``UntrustedSignerError``/``BadSignatureError``, ``NotRecipientError`` (addressed to
another device), ``ExpiredError``/``ClockSkewError``, ``ReplayError`` (counter below the
last one accepted).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fleet.core import errors
from fleet.core.package.canonical import canonical_bytes
from fleet.core.package.keyid import fingerprint_public_key
from fleet.core.package.layout import SIG_ED25519
from fleet.core.package.manifest import Manifest
from fleet.core.package.trust import ClockReading, check_freshness, format_time
from fleet.core.package.verify import Signers, check_signature

__all__ = ["API_PREFIX", "AUTH_TAG", "REPORT_TAG", "STATE_TYPE", "DesiredModel",
           "DesiredState", "in_window", "parse_window", "sign_desired_state", "sign_device",
           "sign_report",
           "verify_desired_state", "verify_device_signature", "verify_report"]

#: every device endpoint lives under this prefix (the API's major version is in it)
API_PREFIX = "/api/device/v1"
STATE_TYPE = "fleet.desired-state/1"
REPORT_TYPE = "fleet.pull-report/1"
AUTH_TAG = b"fleet.pull/1 auth\n"
REPORT_TAG = b"fleet.pull/1 report\n"
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class DesiredModel:
    """One model the device should run. ``order``: a signed rollback order when the
    version is older than what the device may hold (a rollback through the desired
    state); ``envelope``: this device's key envelope (base64) for the package."""

    name: str
    version: int
    kind: str
    package_sha256: str
    size: int
    digest: str
    envelope: str | None = None
    activate: bool = True
    order: dict[str, Any] | None = None
    deployment: str | None = None
    #: ``HH:MM-HH:MM``, device-local: install (activate) only inside it; download and
    #: stage may happen before (:func:`parse_window`, :func:`in_window`)
    window: str | None = None

    def to_dict(self) -> dict[str, Any]:
        doc = {"name": self.name, "version": self.version, "kind": self.kind,
               "package_sha256": self.package_sha256, "size": self.size,
               "digest": self.digest, "envelope": self.envelope, "activate": self.activate,
               "order": self.order, "deployment": self.deployment}
        if self.window is not None:  # absent rather than null: older documents stay
            doc["window"] = self.window
        return doc

    @classmethod
    def from_dict(cls, d: Any) -> DesiredModel:
        if not isinstance(d, dict):
            raise errors.FormatError("desired model entry must be an object")
        try:
            m = cls(name=d["name"], version=d["version"], kind=d["kind"],
                    package_sha256=d["package_sha256"], size=d["size"], digest=d["digest"],
                    envelope=d.get("envelope"), activate=d.get("activate", True),
                    order=d.get("order"), deployment=d.get("deployment"),
                    window=d.get("window"))
        except KeyError as exc:
            raise errors.FormatError(f"desired model entry lacks {exc}") from None
        ok = (isinstance(m.name, str) and Manifest.valid_name(m.name)
              and isinstance(m.version, int) and not isinstance(m.version, bool)
              and m.version >= 1 and m.kind in ("model", "lora")
              and _is_hex64(m.package_sha256) and _is_hex64(m.digest)
              and isinstance(m.size, int) and m.size >= 0
              and (m.envelope is None or isinstance(m.envelope, str))
              and isinstance(m.activate, bool)
              and (m.order is None or isinstance(m.order, dict))
              and (m.deployment is None or isinstance(m.deployment, str))
              and (m.window is None or _window_ok(m.window)))
        if not ok:
            raise errors.FormatError("malformed desired model entry", entry=d.get("name"))
        return m


def parse_window(text: str) -> tuple[int, int]:
    """``HH:MM-HH:MM`` (24-hour, device-local) as (start, end) minutes after midnight;
    an end before the start wraps past midnight (``22:00-02:00``). UsageError (exit 2)
    for anything else, or an empty window (start = end)."""
    def minutes(part: str) -> int:
        hh, sep, mm = part.strip().partition(":")
        if not (sep and hh.isdigit() and mm.isdigit() and len(mm) == 2
                and 1 <= len(hh) <= 2 and int(hh) < 24 and int(mm) < 60):
            raise ValueError(part)
        return int(hh) * 60 + int(mm)

    try:
        a, sep, b = str(text).partition("-")
        if not sep:
            raise ValueError(text)
        start, end = minutes(a), minutes(b)
    except ValueError:
        raise errors.UsageError(f"--window {text!r}: give HH:MM-HH:MM, device-local "
                                "24-hour time (e.g. 02:00-04:00)") from None
    if start == end:
        raise errors.UsageError(f"--window {text!r} is empty (start = end)")
    return start, end


def _window_ok(v: Any) -> bool:
    try:
        parse_window(v)
    except errors.UsageError:
        return False
    return isinstance(v, str)


def in_window(window: str | None, local: datetime) -> bool:
    """Whether the device-local time ``local`` is inside ``window`` (None: always)."""
    if window is None:
        return True
    start, end = parse_window(window)
    now = local.hour * 60 + local.minute
    return start <= now < end if start < end else (now >= start or now < end)


def _is_hex64(v: Any) -> bool:
    return isinstance(v, str) and len(v) == 64 and set(v) <= _HEX


@dataclass(frozen=True)
class DesiredState:
    device: str
    counter: int
    created: str
    expires: str
    signer: str
    models: tuple[DesiredModel, ...]

    def model(self, name: str) -> DesiredModel | None:
        return next((m for m in self.models if m.name == name), None)


def sign_desired_state(key: ed25519.Ed25519PrivateKey, *, device: str, counter: int,
                       models: list[DesiredModel], now: datetime, ttl: timedelta
                       ) -> dict[str, Any]:
    """The signed desired state for ``device`` (its fingerprint), valid ``ttl`` from
    ``now``. ``counter`` comes from the registry's counter."""
    state = {"type": STATE_TYPE, "device": device, "counter": counter,
             "created": format_time(now), "expires": format_time(now + ttl),
             "signer": fingerprint_public_key(key.public_key()),
             "models": [m.to_dict() for m in sorted(models, key=lambda m: m.name)]}
    sig = key.sign(canonical_bytes(state))
    return {"state": state, "signature": base64.b64encode(sig).decode()}


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise errors.FormatError(f"{what} signature must be base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise errors.FormatError(f"{what} signature is not base64") from exc


def verify_desired_state(doc: Any, trusted: Signers, device_fingerprint: str,
                         last_counter: int, clock: ClockReading) -> DesiredState:
    """Check a desired state as a device must, in this order: shape and signature
    (signer an online key of the device's root), type, addressee (this device's key),
    expiry by the device clock, and ``counter`` not below ``last_counter`` (an equal
    counter is the same state signed again: accepted)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("state"), dict):
        raise errors.FormatError("desired state must be {state: {...}, signature: ...}")
    sig = _b64(doc.get("signature"), "desired state")
    body = canonical_bytes(doc["state"])
    s = check_signature(body, SIG_ED25519 if sig else 0, sig, trusted, what="desired state")
    if s.get("type") != STATE_TYPE:
        raise errors.FormatError(f"not a desired state (type {s.get('type')!r})")
    device, counter = s.get("device"), s.get("counter")
    models = s.get("models")
    if not (isinstance(device, str) and isinstance(counter, int)
            and not isinstance(counter, bool) and counter >= 0
            and isinstance(models, list) and isinstance(s.get("created"), str)
            and isinstance(s.get("expires"), str)):
        raise errors.FormatError("malformed desired state")
    if device != device_fingerprint:
        raise errors.NotRecipientError("desired state is addressed to another device",
                                       device=device_fingerprint, addressed_to=device)
    check_freshness(f"desired state #{counter}", s["created"], s["expires"], clock)
    if counter < last_counter:
        raise errors.ReplayError(
            f"desired state #{counter} is older than #{last_counter} accepted here",
            counter=counter, seen=last_counter)
    parsed = tuple(DesiredModel.from_dict(m) for m in models)
    if len({m.name for m in parsed}) != len(parsed):
        raise errors.FormatError("desired state names a model twice")
    return DesiredState(device, counter, s["created"], s["expires"], str(s.get("signer")),
                        parsed)


def sign_device(key: ec.EllipticCurvePrivateKey, tag: bytes, body: bytes) -> str:
    """Base64 DER ECDSA-SHA256 signature of the device key over ``tag + body``."""
    return base64.b64encode(key.sign(tag + body, ec.ECDSA(hashes.SHA256()))).decode()


def verify_device_signature(public_key: ec.EllipticCurvePublicKey, tag: bytes, body: bytes,
                            signature: Any, what: str) -> None:
    """BadSignatureError unless ``signature`` (base64 DER) is the device key's over
    ``tag + body``; FormatError when it is not base64."""
    raw = _b64(signature, what)
    try:
        public_key.verify(raw, tag + body, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError) as exc:
        raise errors.BadSignatureError(f"{what} is not signed by this device's key") from exc


def sign_report(key: ec.EllipticCurvePrivateKey, report: dict[str, Any]) -> dict[str, Any]:
    """``{"report": JSON text, "signature": ...}`` as the device uploads it. The report
    (timings are floats, which canonical JSON refuses) is signed as the exact UTF-8 bytes
    of the text sent, with ``type`` and ``device`` added inside it."""
    body = {**report, "type": REPORT_TYPE,
            "device": fingerprint_public_key(key.public_key())}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return {"report": text, "signature": sign_device(key, REPORT_TAG, text.encode())}


def verify_report(doc: Any, public_key: ec.EllipticCurvePublicKey, fingerprint: str
                  ) -> dict[str, Any]:
    """The report a device uploaded, once its signature by ``public_key`` checks and it
    names that device; FormatError / BadSignatureError / NotRecipientError otherwise."""
    if not isinstance(doc, dict) or not isinstance(doc.get("report"), str):
        raise errors.FormatError("report must be {report: JSON text, signature: ...}")
    text = doc["report"]
    verify_device_signature(public_key, REPORT_TAG, text.encode(), doc.get("signature"),
                            "report")
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise errors.FormatError("report is not JSON") from exc
    if not isinstance(body, dict) or body.get("type") != REPORT_TYPE:
        raise errors.FormatError("not a pull report")
    if body.get("device") != fingerprint:
        raise errors.NotRecipientError("report names another device", device=fingerprint)
    return body
