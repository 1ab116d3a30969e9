"""The controller's root of trust: the offline root key, root documents, rotation and
revocation, the signing sequence counter, and expiry policy.

Files under ``$FLEET_HOME/keys/`` (directory 0700, private keys 0600; docs/package-format.md
"Root of trust"):

- ``root_key.pem``: the **root** key (Ed25519). It signs root documents only, so it is
  needed only for ``fleet keys init|rotate|revoke``; keep it offline (move the file to
  removable media between trust changes; commands that need it say so when it is gone).
- ``signing_key.pem``: the **online** key that signs manifests and rollback orders.
- ``roots/root.<N>.json``: every root document (public, signed); devices receive the
  chain and keep what verifies.
- ``trust.json``: the revoked online keys (never listed again) with their dates.

The root document is python-tuf's ``Metadata[Root]`` (``tuf.api.metadata``, signed with
securesystemslib's ``CryptoSigner``); the verification is in
:mod:`fleet.core.package.trust`, shared with the agent. Rotation lists the new online key
and keeps the previous one as *retiring* (packages it signed, staged but not yet active,
still verify on devices); a retiring key leaves the root at the next trust change once
every device reports the root that introduced its successor (``fleet keys status``), or at
once with ``fleet keys revoke``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import Metadata, Role, Root

from fleet.artifacts.keys import init_signing_key, load_signing_key, write_private_key
from fleet.core import errors
from fleet.core.fsutil import atomic_write
from fleet.core.package.keyid import fingerprint_public_key
from fleet.core.package.orders import sign_rollback_order
from fleet.core.package.trust import (
    ONLINE_ROLE,
    ROOT_ROLE,
    KeyRing,
    format_time,
    online_keys,
    parse_root,
    verify_first_root,
    verify_root_update,
)
from fleet.home import FleetHome
from fleet.registry import Device, Registry
from fleet.registry.counters import next_value

__all__ = ["ROOT_TTL", "TrustPaths", "chain_docs", "current_root", "init_trust",
           "next_sequence", "order_ttl", "package_ttl", "revoke_key", "rotate_key",
           "sign_order", "trust_status", "trusted_keys"]

#: a root document's lifetime; a device refuses to move to an expired root
ROOT_TTL = timedelta(days=365)
PACKAGE_TTL_ENV = "FLEET_PACKAGE_EXPIRES_DAYS"
ORDER_TTL_ENV = "FLEET_ORDER_EXPIRES_HOURS"
_OTHER_ROLES = ("snapshot", "timestamp")  # unused here; they list the online keys


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise errors.UsageError(f"{name}={raw!r} is not a number") from exc
    if value <= 0:
        raise errors.UsageError(f"{name} must be positive")
    return value


def package_ttl() -> timedelta:
    """How long a package stays valid: ``$FLEET_PACKAGE_EXPIRES_DAYS`` (default 90)."""
    return timedelta(days=_env_number(PACKAGE_TTL_ENV, 90))


def order_ttl() -> timedelta:
    """How long a rollback order stays valid: ``$FLEET_ORDER_EXPIRES_HOURS`` (default 24)."""
    return timedelta(hours=_env_number(ORDER_TTL_ENV, 24))


def next_sequence(reg: Registry) -> int:
    """The next signing sequence number: the registry's counter, never the clock."""
    return next_value(reg)


@dataclass(frozen=True)
class TrustPaths:
    home: FleetHome

    @property
    def root_key(self) -> Path:
        return self.home.keys_dir / "root_key.pem"

    @property
    def roots(self) -> Path:
        return self.home.keys_dir / "roots"

    @property
    def state(self) -> Path:
        return self.home.keys_dir / "trust.json"

    def root_file(self, version: int) -> Path:
        return self.roots / f"root.{version}.json"


def _sslib(pub: ed25519.Ed25519PublicKey) -> SSlibKey:
    return SSlibKey.from_crypto(pub, keyid=fingerprint_public_key(pub), scheme="ed25519")


def _load_root_key(paths: TrustPaths) -> ed25519.Ed25519PrivateKey:
    if not paths.root_key.exists():
        raise errors.KeyMaterialError(
            f"the offline root key is not at {paths.root_key}; put it back (it signs trust "
            "changes) and run the command again", path=str(paths.root_key))
    return load_signing_key(paths.root_key)


def _chain(paths: TrustPaths) -> list[Metadata[Root]]:
    found = []
    if paths.roots.is_dir():
        for p in paths.roots.glob("root.*.json"):
            v = p.name.split(".")[1]
            if v.isdigit():
                found.append((int(v), p))
    return [parse_root(p.read_bytes()) for _, p in sorted(found)]


def current_root(home: FleetHome) -> Metadata[Root] | None:
    chain = _chain(TrustPaths(home))
    return chain[-1] if chain else None


def chain_docs(home: FleetHome) -> list[dict[str, Any]] | None:
    """Every root document, v1 first, as sent to agents (None before ``keys init``)."""
    chain = _chain(TrustPaths(home))
    return [md.to_dict() for md in chain] or None


def trusted_keys(home: FleetHome) -> KeyRing:
    """What a device holding the newest root accepts (the controller's own checks)."""
    root = current_root(home)
    if root is not None:
        return online_keys(root)
    return KeyRing.single(load_signing_key(home).public_key())


def _write_root(paths: TrustPaths, root: Root, root_key: ed25519.Ed25519PrivateKey,
                extra_signers: Sequence[ed25519.Ed25519PrivateKey] = ()) -> Metadata[Root]:
    md = Metadata(root)
    for key in (root_key, *extra_signers):
        md.sign(CryptoSigner(key, _sslib(key.public_key())), append=True)
    paths.roots.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(paths.root_file(root.version), md.to_bytes(), mode=0o644)
    return md


def _root_doc(version: int, root_key: ed25519.Ed25519PublicKey,
              online: Sequence[ed25519.Ed25519PublicKey]) -> Root:
    root = Root(version=version, expires=datetime.now(UTC).replace(microsecond=0) + ROOT_TTL,
                consistent_snapshot=False,
                roles={name: Role([], 1) for name in (ROOT_ROLE, ONLINE_ROLE, *_OTHER_ROLES)})
    root.add_key(_sslib(root_key), ROOT_ROLE)
    for pub in online:
        for role in (ONLINE_ROLE, *_OTHER_ROLES):
            root.add_key(_sslib(pub), role)
    return root


def init_trust(home: FleetHome, *, force: bool = False) -> dict[str, Any]:
    """Make what is missing: the root key, the online key, root v1 listing the online key.

    A home that has a signing key but no root (made before roots existed) keeps its key:
    root v1 lists it, so devices that pinned it accept v1. ``force`` starts over (new keys,
    new v1): every device must then be wiped and enrolled again."""
    paths = TrustPaths(home)
    have_all = home.signing_key.exists() and paths.root_key.exists() and _chain(paths)
    if have_all and not force:
        raise errors.DuplicateError(
            f"keys and a root of trust already exist in {home.keys_dir}; devices trust them. "
            "Use `fleet keys rotate` to change the signing key (--force starts over: every "
            "device must then be wiped and re-enrolled)", path=str(home.keys_dir))
    home.ensure()
    if force or not home.signing_key.exists():
        init_signing_key(home, force=True)
    if force or not paths.root_key.exists():
        write_private_key(paths.root_key, ed25519.Ed25519PrivateKey.generate())
    if force and paths.roots.is_dir():
        for p in paths.roots.glob("root.*.json"):
            p.unlink()
        atomic_write(paths.state, b"{}\n")
    root_key = _load_root_key(paths)
    if not _chain(paths):
        md = _write_root(paths, _root_doc(1, root_key.public_key(),
                                          [load_signing_key(home).public_key()]), root_key)
        verify_first_root(md)
    return trust_status(home, None)


def _state(paths: TrustPaths) -> dict[str, Any]:
    try:
        doc = json.loads(paths.state.read_text())
    except FileNotFoundError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _devices_behind(reg: Registry | None, version: int) -> list[str]:
    if reg is None:
        return []
    return [d.name for d in reg.list_devices() if d.fingerprint and d.revoked_at is None
            and (d.root_version or 0) < version]


def _next_root(paths: TrustPaths, cur: Metadata[Root],
               online: Sequence[ed25519.Ed25519PublicKey]) -> Metadata[Root]:
    root_key = _load_root_key(paths)
    new = _root_doc(cur.signed.version + 1, root_key.public_key(), online)
    md = Metadata(new)
    md.sign(CryptoSigner(root_key, _sslib(root_key.public_key())))
    verify_root_update(cur, md)  # what every device will check, before anything is kept
    return _write_root(paths, new, root_key)


def _require_root(home: FleetHome) -> tuple[TrustPaths, Metadata[Root]]:
    paths = TrustPaths(home)
    cur = current_root(home)
    if cur is None:
        raise errors.KeyMaterialError("no root of trust yet; run `fleet keys init`")
    return paths, cur


def rotate_key(home: FleetHome, reg: Registry | None) -> dict[str, Any]:
    """A new online key; root vN+1 lists it and keeps the old one as retiring (keys
    retiring from before leave once every device holds vN)."""
    paths, cur = _require_root(home)
    old = load_signing_key(home)
    old_fp = fingerprint_public_key(old.public_key())
    behind = _devices_behind(reg, cur.signed.version)
    keep = {fp: k for fp, k in online_keys(cur).items() if fp == old_fp or behind}
    new = ed25519.Ed25519PrivateKey.generate()
    staged = home.signing_key.with_name("signing_key.next.pem")
    write_private_key(staged, new)
    md = _next_root(paths, cur, [new.public_key(), *keep.values()])
    os.replace(staged, home.signing_key)  # from now on the controller signs with it
    return {"root_version": md.signed.version, "fingerprint": fingerprint_public_key(
        new.public_key()), "retiring": sorted(keep), "devices_behind": behind}


def revoke_key(home: FleetHome, fingerprint: str) -> dict[str, Any]:
    """Root vN+1 without ``fingerprint``: from that root on a device refuses what it
    signs. The current signing key cannot be revoked (rotate first)."""
    paths, cur = _require_root(home)
    state = _state(paths)
    revoked: dict[str, str] = dict(state.get("revoked") or {})
    ring = online_keys(cur)
    signing_fp = fingerprint_public_key(load_signing_key(home).public_key())
    if fingerprint == signing_fp:
        raise errors.UsageError(
            f"{fingerprint} is the current signing key; `fleet keys rotate` first, then "
            "revoke it", fingerprint=fingerprint)
    if fingerprint not in ring:
        if fingerprint in revoked:
            return {"root_version": cur.signed.version, "revoked": fingerprint,
                    "already": True}
        raise errors.NotFoundError(
            f"{fingerprint} is not an online key of root v{cur.signed.version} "
            f"(listed: {ring.describe()})", fingerprint=fingerprint)
    md = _next_root(paths, cur, [k for fp, k in ring.items() if fp != fingerprint])
    revoked[fingerprint] = format_time(datetime.now(UTC))
    state["revoked"] = revoked
    atomic_write(paths.state, (json.dumps(state, indent=2, sort_keys=True) + "\n").encode())
    return {"root_version": md.signed.version, "revoked": fingerprint, "already": False}


def trust_status(home: FleetHome, reg: Registry | None) -> dict[str, Any]:
    """Root version and expiry, the online keys (signing / retiring), revoked keys, and
    the root version each device reported (from the registry)."""
    paths = TrustPaths(home)
    cur = current_root(home)
    signing = fingerprint_public_key(load_signing_key(home).public_key()) \
        if home.signing_key.exists() else None
    out: dict[str, Any] = {
        "root_version": cur.signed.version if cur else None,
        "root_expires": format_time(cur.signed.expires) if cur else None,
        "root_key": str(paths.root_key) if paths.root_key.exists() else None,
        "root_keys": sorted(cur.signed.roles[ROOT_ROLE].keyids) if cur else [],
        "online_keys": [{"fingerprint": fp, "state": "signing" if fp == signing else "retiring"}
                        for fp in sorted(online_keys(cur))] if cur else [],
        "signing_key": signing,
        "revoked": dict(_state(paths).get("revoked") or {}),
    }
    if reg is not None:
        out["devices"] = [_device_trust(d, out["root_version"]) for d in reg.list_devices()]
    return out


def _device_trust(d: Device, version: int | None) -> dict[str, Any]:
    return {"name": d.name, "root_version": d.root_version,
            "up_to_date": version is not None and d.root_version == version,
            "revoked": d.revoked_at is not None}


def sign_order(home: FleetHome, reg: Registry, *, name: str, version: int,
               devices: list[str] | None) -> dict[str, Any]:
    """A rollback order: the registry's next sequence number, ``order_ttl()`` expiry."""
    return sign_rollback_order(load_signing_key(home), name=name, version=version,
                               sequence=next_sequence(reg), devices=devices,
                               expires_in=order_ttl())
