"""The root of trust, decided as pure functions over documents and state (no I/O).

The root document has TUF's shape and is python-tuf's own ``Metadata[Root]``
(``tuf.api.metadata``): keys, roles with thresholds, version, expiry, signatures over the
canonical JSON of ``signed``. Two roles matter here:

- ``root``: the offline root key(s). Only they sign root documents.
- ``targets``: the controller's online Ed25519 signing key(s). A package manifest or a
  rollback order is accepted only when its ``signer`` is one of them (threshold 1: one
  Ed25519 signature per manifest). ``snapshot`` and ``timestamp`` list the same keys so
  the document stays a valid TUF root; nothing else uses them.

Key ids are the project's fingerprints (``SHA256:`` + base64 of the SPKI DER,
:mod:`fleet.core.package.keyid`), not TUF's hex digests: one name per key everywhere
(``fleet keys show``, manifests' ``signer``, ``fleet keys revoke FINGERPRINT``).
:func:`check_root` refuses a key whose id is not its fingerprint.

A device pins root v1 at enrollment and accepts root vN+1 only when it is signed by a
threshold of vN's root keys *and* of vN+1's own (TUF's 5.3.4/5.3.5), and its version is
exactly N+1 (:func:`verify_root_update`); the last root of a chain must not be expired.
Revoking an online key is a new root without it: from that root on the key signs nothing
the device accepts.

Freshness (:func:`check_freshness`): manifests and orders carry ``expires``; the device
compares it with its own clock, with :attr:`Limits.clock_tolerance_s` of slack. When the
controller's clock came with the request and the two clocks are further apart than the
tolerance, the refusal is :class:`ClockSkewError` naming both clocks, so an operator
fixes the device clock instead of chasing a "stale" package.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519
from securesystemslib.exceptions import UnverifiedSignatureError
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root

from fleet.core import errors
from fleet.core.package.keyid import fingerprint_public_key

__all__ = ["ONLINE_ROLE", "ROOT_ROLE", "TIME_FORMAT", "KeyRing", "apply_root_chain",
           "check_freshness", "check_root", "format_time", "online_keys", "parse_root",
           "parse_time", "verify_first_root", "verify_root_update"]

ROOT_ROLE = "root"
#: the role whose keys sign packages and rollback orders (TUF's "targets")
ONLINE_ROLE = "targets"
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def format_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime(TIME_FORMAT)


def parse_time(s: Any, what: str = "time") -> datetime:
    if not isinstance(s, str):
        raise errors.FormatError(f"{what} is not a timestamp", value=s)
    try:
        return datetime.strptime(s, TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError as exc:
        raise errors.FormatError(f"{what} {s!r} is not YYYY-MM-DDTHH:MM:SSZ") from exc


class KeyRing(Mapping[str, ed25519.Ed25519PublicKey]):
    """The online keys a device trusts now: fingerprint -> Ed25519 public key.

    ``version`` is the root version they come from (None: a pre-root pinned key)."""

    def __init__(self, keys: Mapping[str, ed25519.Ed25519PublicKey],
                 version: int | None = None) -> None:
        self._keys = dict(keys)
        self.version = version

    @classmethod
    def single(cls, key: ed25519.Ed25519PublicKey) -> KeyRing:
        return cls({fingerprint_public_key(key): key})

    def __getitem__(self, fp: str) -> ed25519.Ed25519PublicKey:
        return self._keys[fp]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def union(self, other: Mapping[str, ed25519.Ed25519PublicKey]) -> KeyRing:
        return KeyRing({**other, **self._keys}, self.version)

    def describe(self) -> str:
        return ", ".join(sorted(self._keys)) or "(none)"


def _ed25519(key: Any, keyid: str) -> ed25519.Ed25519PublicKey:
    val = (getattr(key, "keyval", None) or {}).get("public")
    if getattr(key, "keytype", None) != "ed25519" or getattr(key, "scheme", None) != "ed25519" \
            or not isinstance(val, str):
        raise errors.TrustChainError(f"root key {keyid} is not an Ed25519 key",
                                     reason="bad_key", keyid=keyid)
    try:
        pub = ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(val))
    except ValueError as exc:
        raise errors.TrustChainError(f"root key {keyid} is malformed", reason="bad_key",
                                     keyid=keyid) from exc
    if fingerprint_public_key(pub) != keyid:
        raise errors.TrustChainError(f"root key id {keyid} is not the key's fingerprint",
                                     reason="bad_key", keyid=keyid)
    return pub


def parse_root(doc: Any) -> Metadata[Root]:
    """A root document (dict, JSON bytes, or already parsed) as python-tuf metadata;
    FormatError if it is not one."""
    if isinstance(doc, Metadata):
        md = doc
    else:
        try:
            # from_dict consumes the dict it is given: hand it a copy
            md = Metadata.from_dict(copy.deepcopy(dict(doc))) if isinstance(doc, Mapping) \
                else Metadata.from_bytes(bytes(doc))
        except Exception as exc:  # python-tuf: ValueError/KeyError/TypeError/Deserialization
            raise errors.FormatError(f"not a root document: {exc}") from exc
    if not isinstance(md.signed, Root):
        raise errors.FormatError(f"not a root document (type {md.signed.type!r})")
    return md


def check_root(md: Metadata[Root]) -> None:
    """Our invariants on top of TUF's: every key Ed25519 with its fingerprint as id, and
    at least one online key."""
    for keyid, key in md.signed.keys.items():
        _ed25519(key, keyid)
    if not md.signed.roles[ONLINE_ROLE].keyids:
        raise errors.TrustChainError("root lists no online signing key", reason="bad_key")


def online_keys(md: Metadata[Root]) -> KeyRing:
    """The keys that may sign packages and rollback orders under this root."""
    root = md.signed
    return KeyRing({kid: _ed25519(root.keys[kid], kid)
                    for kid in root.roles[ONLINE_ROLE].keyids}, version=root.version)


def _signed_by_threshold(delegator: Root, md: Metadata[Root]) -> bool:
    try:
        delegator.verify_delegate(ROOT_ROLE, md.signed_bytes, md.signatures)
    except (UnsignedMetadataError, UnverifiedSignatureError, ValueError):
        return False
    return True


def verify_first_root(md: Metadata[Root]) -> Metadata[Root]:
    """Root v1, pinned at enrollment (trust on first use): version 1, signed by a threshold
    of its own root keys, our key invariants."""
    if md.signed.version != 1:
        raise errors.TrustChainError("enrollment needs the chain from root v1",
                                     reason="no_chain", got=md.signed.version)
    if not _signed_by_threshold(md.signed, md):
        raise errors.TrustChainError("root v1 is not signed by a threshold of its root keys",
                                     reason="new_threshold", version=1)
    check_root(md)
    return md


def verify_root_update(trusted: Metadata[Root], new: Metadata[Root]) -> Metadata[Root]:
    """Accept ``new`` as the successor of ``trusted`` or raise :class:`TrustChainError`."""
    old_v, new_v = trusted.signed.version, new.signed.version
    if new_v != old_v + 1:
        raise errors.TrustChainError(
            f"root v{new_v} does not follow the trusted root v{old_v}", reason="version",
            trusted=old_v, got=new_v)
    if not _signed_by_threshold(trusted.signed, new):
        raise errors.TrustChainError(
            f"root v{new_v} is not signed by a threshold of the root keys of v{old_v}",
            reason="old_threshold", version=new_v)
    if not _signed_by_threshold(new.signed, new):
        raise errors.TrustChainError(
            f"root v{new_v} is not signed by a threshold of its own root keys",
            reason="new_threshold", version=new_v)
    check_root(new)
    return new


def apply_root_chain(trusted: Metadata[Root], chain: Sequence[Any], now: datetime,
                     ) -> tuple[Metadata[Root], list[Metadata[Root]]]:
    """Walk ``chain`` (root documents in any order, older ones ignored) from ``trusted``;
    return the newest root and the ones newly accepted (to be persisted in order).

    The newest root must not be expired (a frozen chain); intermediate ones may be, as in
    TUF. A chain that jumps a version is refused (``reason: version``)."""
    parsed = sorted((parse_root(d) for d in chain), key=lambda m: m.signed.version)
    cur, accepted = trusted, []
    for md in parsed:
        if md.signed.version <= cur.signed.version:
            continue
        cur = verify_root_update(cur, md)
        accepted.append(cur)
    if accepted and cur.signed.expires < now:
        raise errors.ExpiredError(
            f"root v{cur.signed.version} expired at {format_time(cur.signed.expires)}; "
            f"device clock {format_time(now)}", expires=format_time(cur.signed.expires),
            device_time=format_time(now), what="root")
    return cur, accepted


@dataclass(frozen=True)
class ClockReading:
    """What the device knows about time when it checks freshness."""

    now: datetime
    tolerance_s: int
    controller_time: datetime | None = None  #: sent with the request (unsigned, a hint)

    @property
    def skew_s(self) -> int | None:
        if self.controller_time is None:
            return None
        return int((self.now - self.controller_time).total_seconds())


def check_freshness(what: str, created: str, expires: str | None, clock: ClockReading
                    ) -> None:
    """Refuse ``what`` (a manifest or an order) past ``expires`` by the device clock.

    A missing ``expires`` is refused too: it was signed before expiry existed, and a
    document that never expires is exactly what a freeze attack replays."""
    now = clock.now
    if expires is None:
        raise errors.ExpiredError(
            f"{what} carries no expiry (signed {created}, before expiry existed); "
            "re-issue it", created=created, expires=None, device_time=format_time(now),
            reason="no_expiry")
    exp = parse_time(expires, f"{what} expires")
    if now.timestamp() <= exp.timestamp() + clock.tolerance_s:
        return
    skew = clock.skew_s
    if skew is not None and clock.controller_time is not None \
            and abs(skew) > clock.tolerance_s \
            and clock.controller_time.timestamp() <= exp.timestamp() + clock.tolerance_s:
        raise errors.ClockSkewError(
            f"the device clock is {format_time(now)} but the controller's is "
            f"{format_time(clock.controller_time)} ({abs(skew)} s apart, tolerance "
            f"{clock.tolerance_s} s): {what} (signed {created}, expires {expires}) is "
            "fresh by the controller's clock; set the device clock (NTP)",
            device_time=format_time(now), controller_time=format_time(clock.controller_time),
            skew_s=skew, tolerance_s=clock.tolerance_s, expires=expires, created=created)
    raise errors.ExpiredError(
        f"{what} expired at {expires} (signed {created}); device clock {format_time(now)}, "
        f"tolerance {clock.tolerance_s} s", expires=expires, created=created,
        device_time=format_time(now), tolerance_s=clock.tolerance_s)
