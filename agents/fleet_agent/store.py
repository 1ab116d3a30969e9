"""The device store: packages kept encrypted, slots switched atomically.

Layout under the device root (ARCHITECTURE.md "Device store")::

    store/<sha256 of the package file>.fpkg     encrypted, exactly the bytes verified
    slots/<name>/current, slots/<name>/previous  small JSON pointers, replaced by rename
    state.json                                   versions, floors, sequence numbers

Trust (docs/package-format.md, "Root of trust"): ``identity/root.<N>.json`` are the root
documents this device accepted, v1 pinned at enrollment and each later one checked
against its predecessor (:mod:`fleet.core.package.trust`); the newest root's online keys
sign what may be staged. A device enrolled before roots existed has only
``identity/controller.pub`` (a pinned key) until its first root chain arrives. Stored
packages are re-read (status, open) with every key any accepted root listed, so a key
rotation never strands an installed model; staging and switching to a version need a
key the *current* root lists, so a revoked key's packages are refused from then on.
``identity/device_key.retired-<n>.pem`` are device keys replaced by ``rekey``: they open
packages already in the store, never a new one.

Key envelopes (package format 2): the data key of a package reaches this device in its
own 181-byte envelope, sent with ``stage`` (or found in the bundle ``PATH.envelopes``
beside a package staged from a path); it is checked with the header and kept, base64, in
the version's ``state.json`` record, so opening a stored package later needs nothing
else. The package file stays exactly the verified (encrypted) bytes.

``slots/<name>/current`` is the truth about what is active; ``state.json`` holds what
was accepted (the version floor and sequence numbers the trust rules need) and a mirror
of the slots for ``status``. Every file is written to a temp file, fsynced, renamed, and
the directory fsynced, so a crash at any instant leaves the old or the new state.

Room: a package pushed into ``incoming/`` is *moved* into ``store/`` (rename, same
filesystem), verified there under a temp name and renamed into place, so staging needs no
second package-sized copy; any other path is copied while it is verified. Whatever fails,
the temp file and the pushed file it came from are removed (nothing left behind), and
ENOSPC/EDQUOT is :class:`~fleet.core.errors.DiskFullError`.

Hygiene: after each activation the store keeps the active version, the previous one,
versions staged but not yet activated (newer than the active one), and up to ``keep``
more (default 1, per root in ``state.json``); the rest is deleted (:mod:`fleet_agent.gc`).
A version the device refuses at activation is deleted and its floor raise undone.

Concurrency: one ``flock`` per root (``.store.lock``) serialises every mutation; it is
re-entrant within a thread, so a verb may hold it around several store calls. A caller
that cannot get it within ``lock_timeout`` seconds gets :class:`~fleet.core.errors.BusyError`.

Test hook: ``FLEET_AGENT_CRASH_AT=<step>`` makes the process exit with status 137 at that
step (``stage:written``, ``stage:stored``, ``stage:state``, ``activate:previous``,
``activate:current``, ``activate:state``, ``rollback:consumed``); the crash tests kill
the agent at each one. It is inert unless the variable names a step.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import hashlib
import json
import os
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fleet.core import errors
from fleet.core.filelock import exclusive
from fleet.core.fsutil import atomic_write, fsync_dir, os_error
from fleet.core.package import (
    ENVELOPE_SIZE,
    ClockReading,
    Envelope,
    KeyRing,
    Limits,
    Manifest,
    ModelState,
    RollbackAllowance,
    apply_root_chain,
    bundle_path,
    check_base_binding,
    check_freshness,
    decrypt_package,
    find_envelope,
    fingerprint_public_key,
    load_trusted_public_key,
    online_keys,
    open_header,
    parse_root,
    verify_rollback_order,
)
from fleet.core.package.trust import parse_time, verify_first_root
from fleet.core.package.verify import check_recipient
from fleet_agent import gc
from fleet_agent.context import AgentContext
from fleet_agent.identity import load_device_key
from fleet_agent.unpack import OpenedPayload, open_in_memory

__all__ = ["CRASH_ENV", "DEFAULT_LOCK_TIMEOUT_S", "LOCK_TIMEOUT_ENV", "SlotChange",
           "SlotInfo", "Staged", "Store", "root_lock"]

CRASH_ENV = "FLEET_AGENT_CRASH_AT"
STATE_SCHEMA = "fleet.store/1"
#: seconds a mutation waits for the root's lock before :class:`BusyError`
DEFAULT_LOCK_TIMEOUT_S = 90.0
LOCK_TIMEOUT_ENV = "FLEET_AGENT_LOCK_TIMEOUT"


def _crash_point(step: str) -> None:
    if os.environ.get(CRASH_ENV) == step:
        os._exit(137)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _lock_timeout() -> float:
    try:
        return float(os.environ.get(LOCK_TIMEOUT_ENV, DEFAULT_LOCK_TIMEOUT_S))
    except ValueError:
        return DEFAULT_LOCK_TIMEOUT_S


_held = threading.local()


@contextlib.contextmanager
def root_lock(ctx: AgentContext, timeout: float | None = None) -> Iterator[None]:
    """Hold the root's lock (re-entrant in this thread). Waits up to ``timeout`` seconds
    (default ``$FLEET_AGENT_LOCK_TIMEOUT`` or :data:`DEFAULT_LOCK_TIMEOUT_S`), then raises
    :class:`BusyError`. The lock dies with the process (flock), so a killed holder never
    blocks the next operation."""
    ctx.ensure()
    key = str(ctx.root.resolve())
    depth: dict[str, int] = getattr(_held, "depth", None) or {}
    _held.depth = depth
    if depth.get(key):
        depth[key] += 1
        try:
            yield
        finally:
            depth[key] -= 1
        return
    with exclusive(ctx.root / ".store.lock",
                   timeout=_lock_timeout() if timeout is None else timeout):
        depth[key] = 1
        try:
            yield
        finally:
            depth[key] = 0


@dataclass(frozen=True)
class Staged:
    name: str
    version: int
    kind: str
    package: str  # file name in store/
    package_sha256: str
    manifest: Manifest
    already: bool = False  # the same package was staged before: nothing was done
    root_version: int | None = None  # the root of trust the device holds after staging

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "kind": self.kind,
                "package": self.package, "package_sha256": self.package_sha256,
                "payload_sha256": self.manifest.sha256, "size": self.manifest.size,
                "already": self.already, "root_version": self.root_version,
                "expires": self.manifest.expires}


@dataclass(frozen=True)
class SlotInfo:
    name: str
    version: int
    package: str
    activated: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "package": self.package,
                "activated": self.activated}


@dataclass(frozen=True)
class SlotChange:
    name: str
    current: int
    previous: int | None
    changed: bool

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "current": self.current, "previous": self.previous,
                "changed": self.changed}


class Store:
    """The agent's package store for one device root. Mutations hold a file lock."""

    def __init__(self, ctx: AgentContext, *, limits: Limits | None = None,
                 lock_timeout: float | None = None,
                 clock: Callable[[], datetime] | None = None) -> None:
        self.ctx = ctx
        self.limits = limits or Limits()
        self.lock_timeout = lock_timeout
        self.clock = clock or (lambda: datetime.now(UTC))  # tests set the device's clock
        self._device_key: ec.EllipticCurvePrivateKey | None = None
        self._trusted: KeyRing | None = None

    # -- keys and state -----------------------------------------------------------------
    @property
    def device_key(self) -> ec.EllipticCurvePrivateKey:
        if self._device_key is None:
            self._device_key = load_device_key(self.ctx.device_key)
        return self._device_key

    @property
    def fingerprint(self) -> str:
        return fingerprint_public_key(self.device_key.public_key())

    # -- trust (root of trust; decisions in fleet.core.package.trust) -------------------
    def _root_path(self, version: int) -> Path:
        return self.ctx.identity_dir / f"root.{version}.json"

    def roots(self) -> list[Any]:
        """Every root document this device accepted, oldest first (python-tuf metadata)."""
        found = []
        for p in self.ctx.identity_dir.glob("root.*.json"):
            v = p.name.split(".")[1]
            if v.isdigit():
                found.append((int(v), p))
        return [parse_root(p.read_bytes()) for _, p in sorted(found)]

    def _legacy_key(self) -> ed25519.Ed25519PublicKey | None:
        try:
            return load_trusted_public_key(self.ctx.trust_file.read_bytes())
        except FileNotFoundError:
            return None

    @property
    def root_version(self) -> int | None:
        roots = self.roots()
        return roots[-1].signed.version if roots else None

    @property
    def trusted_signer(self) -> KeyRing:
        """The online keys of the current root (or the pre-root pinned key): who may sign
        what is staged now."""
        if self._trusted is None:
            roots = self.roots()
            if roots:
                self._trusted = online_keys(roots[-1])
            else:
                legacy = self._legacy_key()
                if legacy is None:
                    raise errors.KeyMaterialError(
                        "no root of trust pinned on this device; enroll it",
                        path=str(self.ctx.identity_dir))
                self._trusted = KeyRing.single(legacy)
        return self._trusted

    def _known_keys(self) -> KeyRing:
        """Every online key any accepted root listed (and the pre-root key): for re-reading
        packages already verified into the store."""
        ring: dict[str, ed25519.Ed25519PublicKey] = {}
        legacy = self._legacy_key()
        if legacy is not None:
            ring[fingerprint_public_key(legacy)] = legacy
        for md in self.roots():
            ring.update(online_keys(md))
        return KeyRing(ring).union(self.trusted_signer)

    def update_trust(self, chain: Sequence[Any], *, pin: bool = False) -> int | None:
        """Apply a root chain (documents as dicts); ``pin`` (enrollment) lets a device with
        no root pin the chain's v1 first. Returns the root version now held."""
        with self._locked():
            return self._update_trust_locked(chain, pin=pin)

    def _update_trust_locked(self, chain: Sequence[Any], *, pin: bool) -> int | None:
        if not isinstance(chain, list | tuple) or not chain:
            raise errors.UsageError("trust must be a non-empty list of root documents")
        parsed = sorted((parse_root(d) for d in chain), key=lambda m: m.signed.version)
        roots = self.roots()
        first = parsed[0]
        if roots and first.signed.version == 1 \
                and first.signed_bytes != roots[0].signed_bytes:
            raise errors.TrustChainError(
                "this device trusts another root v1; a root of trust is replaced only "
                "by wiping the device", reason="foreign_root")
        if not roots:
            if not pin:
                raise errors.TrustChainError(
                    "no root of trust pinned on this device; enroll it first",
                    reason="no_chain")
            verify_first_root(first)
            legacy = self._legacy_key()
            if legacy is not None and fingerprint_public_key(legacy) \
                    not in online_keys(first):
                raise errors.TrustChainError(
                    "root v1 does not list the controller key this device pinned; a trust "
                    "change needs a chain the pinned key vouches for", reason="foreign_root")
            atomic_write(self._root_path(1), first.to_bytes())
            roots = [first]
        _cur, accepted = apply_root_chain(roots[-1], parsed, self.clock())
        for md in accepted:
            atomic_write(self._root_path(md.signed.version), md.to_bytes())
        if accepted or len(roots) == 1:
            fsync_dir(self.ctx.identity_dir)
        self._trusted = None
        return self.root_version

    def _clock_reading(self, controller_time: str | None) -> ClockReading:
        hint = None
        if controller_time is not None:
            try:
                hint = parse_time(controller_time, "controller_time")
            except errors.FormatError as exc:
                raise errors.UsageError(str(exc.message)) from exc
        return ClockReading(now=self.clock(), tolerance_s=self.limits.clock_tolerance_s,
                            controller_time=hint)

    def _still_trusted(self, name: str, version: int, state: dict[str, Any]) -> None:
        """Switching to a version needs its signer in the current root (revocation)."""
        rec = state["models"].get(name, {}).get("versions", {}).get(str(version)) or {}
        signer = rec.get("signer")
        if signer is not None and signer not in self.trusted_signer:
            raise errors.UntrustedSignerError(
                f"{name} v{version} is signed by {signer}, which root "
                f"v{self.trusted_signer.version} no longer lists (revoked); not switched",
                signer=signer, name=name, version=version)

    def _device_keys(self) -> list[ec.EllipticCurvePrivateKey]:
        """The current device key, then keys retired by ``rekey`` (stored packages only)."""
        keys = [self.device_key]
        for p in sorted(self.ctx.identity_dir.glob("device_key.retired-*.pem")):
            keys.append(load_device_key(p))
        return keys

    def _key_for(self, m: Manifest, envelope: bytes | None) -> ec.EllipticCurvePrivateKey:
        """The device key (current or retired) a stored package was addressed to."""
        want = None
        if m.uses_envelopes and envelope is not None and len(envelope) == ENVELOPE_SIZE:
            want = Envelope.parse(envelope).fingerprint
        for key in self._device_keys():
            fp = fingerprint_public_key(key.public_key())
            if fp == want or (not m.uses_envelopes and fp in m.recipients):
                return key
        return self.device_key  # NotRecipientError / WrongKeyError follow from the check

    @staticmethod
    def _stored_envelope(name: str, version: int, state: dict[str, Any]) -> bytes | None:
        rec = state["models"].get(name, {}).get("versions", {}).get(str(version)) or {}
        env = rec.get("envelope")
        if env is None:
            return None
        try:
            return base64.b64decode(env, validate=True)
        except (binascii.Error, TypeError) as exc:
            raise errors.StoreError(f"state.json: the key envelope of {name} v{version} is "
                                    "corrupt", name=name, version=version) from exc

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with root_lock(self.ctx, self.lock_timeout):
            yield

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """The root's lock for a whole verb (re-entrant: store calls inside it reuse it)."""
        return self._locked()

    def _load_state(self) -> dict[str, Any]:
        try:
            state = json.loads(self.ctx.state_file.read_text())
        except FileNotFoundError:
            state = {}
        except ValueError as exc:
            raise errors.StoreError("state.json is corrupt", path=str(self.ctx.state_file)
                                    ) from exc
        state.setdefault("schema", STATE_SCHEMA)
        state.setdefault("models", {})
        state.setdefault("slots", {})
        return state

    def _save_state(self, state: dict[str, Any]) -> None:
        atomic_write(self.ctx.state_file,
                      json.dumps(state, indent=1, sort_keys=True).encode() + b"\n")

    def model_state(self, name: str, state: dict[str, Any] | None = None) -> ModelState:
        st = (state or self._load_state())["models"].get(name)
        slot = self.active(name)
        if st is None:
            return ModelState(active=slot.version if slot else None)
        return ModelState(active=slot.version if slot else None, floor=int(st["floor"]),
                          sequence=int(st["sequence"]))

    def _states(self, state: dict[str, Any]) -> dict[str, ModelState]:
        return {name: self.model_state(name, state) for name in state["models"]}

    def _package_path(self, name: str, version: int, state: dict[str, Any] | None = None
                      ) -> Path:
        st = (state or self._load_state())["models"].get(name, {})
        rec = st.get("versions", {}).get(str(version))
        if rec is None:
            gone = st.get("deleted", {}).get(str(version))
            if gone is not None:
                raise errors.NotFoundError(
                    f"{name} version {version} is no longer on this device (deleted: "
                    f"{gone}); stage it again (with a signed rollback order if it is older)",
                    name=name, version=version, deleted=gone)
            raise errors.NotFoundError(f"{name} version {version} is not staged here",
                                       name=name, version=version)
        path = self.ctx.store / rec["package"]
        if not path.exists():
            raise errors.StoreError(f"package file of {name} v{version} is missing",
                                    path=str(path))
        return path

    def manifest(self, name: str, version: int | None = None) -> Manifest:
        """The (re-verified) manifest of a stored version; the active one by default."""
        if version is None:
            slot = self.active(name)
            if slot is None:
                raise errors.NoActiveModelError(f"no active version of {name}", name=name)
            version = slot.version
        with self._package_path(name, version).open("rb") as f:
            return open_header(f, self._known_keys(), None, limits=self.limits).manifest

    # -- slots --------------------------------------------------------------------------
    def _slot_file(self, name: str, which: str) -> Path:
        if not Manifest.valid_name(name):
            raise errors.UsageError(f"bad model name {name!r}", name=name)
        return self.ctx.slots / name / which

    def _read_slot(self, name: str, which: str) -> SlotInfo | None:
        try:
            d = json.loads(self._slot_file(name, which).read_text())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise errors.StoreError(f"slot {name}/{which} is corrupt", name=name) from exc
        return SlotInfo(d["name"], int(d["version"]), d["package"], d["activated"])

    def _write_slot(self, name: str, which: str, slot: SlotInfo) -> None:
        atomic_write(self._slot_file(name, which),
                      json.dumps(slot.to_dict(), sort_keys=True).encode() + b"\n")

    def active(self, name: str) -> SlotInfo | None:
        return self._read_slot(name, "current")

    def previous(self, name: str) -> SlotInfo | None:
        return self._read_slot(name, "previous")

    def installed(self) -> dict[str, dict[str, Any]]:
        """Every model name here: active and previous version, staged versions, floor."""
        state = self._load_state()
        out: dict[str, dict[str, Any]] = {}
        for name, st in sorted(state["models"].items()):
            cur, prev = self.active(name), self.previous(name)
            out[name] = {"kind": st.get("kind"), "active": cur.version if cur else None,
                         "previous": prev.version if prev else None,
                         "versions": sorted(int(v) for v in st.get("versions", {})),
                         "floor": st["floor"], "sequence": st["sequence"]}
        return out

    def _switch(self, name: str, target: int, state: dict[str, Any], step: str) -> SlotChange:
        cur = self.active(name)
        rec = state["models"][name]["versions"][str(target)]
        new = SlotInfo(name, target, rec["package"], _now())
        if cur is not None:
            self._write_slot(name, "previous", cur)
        _crash_point(f"{step}:previous")
        self._write_slot(name, "current", new)  # the commit point
        _crash_point(f"{step}:current")
        state["slots"][name] = {"current": target, "previous": cur.version if cur else None}
        self._save_state(state)
        _crash_point(f"{step}:state")
        return SlotChange(name, target, cur.version if cur else None, True)

    # -- verbs --------------------------------------------------------------------------
    def _base_check(self, m: Manifest) -> None:
        if m.kind != "lora":
            return
        base_name = (m.base or {}).get("name")
        base = None
        if isinstance(base_name, str) and Manifest.valid_name(base_name) \
                and self.active(base_name) is not None:
            base = self.manifest(base_name)
        check_base_binding(m, base)

    def stage(self, package_path: str | os.PathLike[str], *,
              order: dict[str, Any] | None = None, trust: Sequence[Any] | None = None,
              controller_time: str | None = None, envelope: bytes | None = None) -> Staged:
        """Verify a package completely and keep it, encrypted, in ``store/``.

        Nothing lands unless every check passed. A package in ``incoming/`` is the agent's
        to take: it is moved (renamed) into a temp name in ``store/``, verified there
        (authenticated, plaintext hashed and dropped) and renamed into place, so the store
        never holds two copies; on any failure it is deleted. A package elsewhere is copied
        to the temp name while it is verified. ``order`` is a signed rollback order that
        allows an older version to be staged (consumed only by :meth:`rollback`).
        ``trust`` is a root chain applied first (a rotation or revocation travels with the
        next push); ``controller_time`` the controller's clock, named in a clock-skew
        refusal (:func:`fleet.core.package.trust.check_freshness`). ``envelope`` is this
        device's key envelope (format 2); without one, the bundle ``PATH.envelopes``
        beside the package is searched for it.

        Raises the package's :class:`PackageError` (an envelope that is missing, malformed,
        for another package or device, altered or forged: its :class:`EnvelopeError`,
        :class:`NotRecipientError` or :class:`WrongKeyError`), :class:`DiskFullError`
        (ENOSPC/EDQUOT; nothing left behind), :class:`BusyError` (the root's lock was held
        too long)."""
        src = Path(package_path)
        owned = self._owned_upload(src)
        with self._locked():
            try:
                if trust:
                    self._update_trust_locked(trust, pin=False)
                state = self._load_state()
                self._clean_temp()
                return self._stage_locked(src, owned, state, order,
                                          self._clock_reading(controller_time), envelope)
            except BaseException:
                if owned:  # a refused or failed upload only keeps the disk full
                    with contextlib.suppress(OSError):
                        src.unlink()
                raise

    def _bundle_envelope(self, src: Path, m: Manifest) -> bytes | None:
        """This device's envelope from the bundle beside ``src`` (a package staged from a
        path, e.g. ``fleet package -o`` output copied by hand); None without a bundle.
        Failing this key's, one for a key ``rekey`` retired is returned (refused next as
        addressed to another key); a bundle with neither is NotRecipientError."""
        bundle = bundle_path(src)
        if not bundle.is_file():
            return None
        for key in self._device_keys():
            env = find_envelope(bundle, fingerprint_public_key(key.public_key()))
            if env is not None:
                return env
        raise errors.NotRecipientError(
            f"package {m.name} v{m.version} is not addressed to this device (its envelope "
            f"bundle {bundle.name} has none for this device's key)", device=self.fingerprint)

    def _owned_upload(self, src: Path) -> bool:
        """Is ``src`` a pushed file in this root's ``incoming/`` (the agent may consume it)?"""
        try:
            return src.resolve().parent == self.ctx.incoming.resolve() and not src.is_symlink()
        except OSError:
            return False

    def _stage_locked(self, src: Path, owned: bool, state: dict[str, Any],
                      order: dict[str, Any] | None, clock: ClockReading,
                      envelope: bytes | None) -> Staged:
        if owned and not src.exists():
            # A concurrent deploy of the same package already took this upload into the
            # store (both pushes land on incoming/<package sha>.fpkg): that is success.
            done = self._staged_by_file(src.name, state)
            if done is not None:
                return done
        try:
            f = src.open("rb")
        except OSError as exc:
            raise errors.StoreError(f"cannot read the package {src}: {exc.strerror}",
                                    path=str(src)) from exc
        with f:  # cheap header look: is this package for this device, already here?
            m0 = open_header(f, self.trusted_signer, None, limits=self.limits).manifest
        if m0.uses_envelopes and envelope is None:
            envelope = self._bundle_envelope(src, m0)
        check_recipient(m0, self.fingerprint, envelope)
        rec = state["models"].get(m0.name, {}).get("versions", {}).get(str(m0.version))
        if rec and rec.get("package_id") == m0.package_id \
                and (self.ctx.store / rec["package"]).exists():
            if owned:
                src.unlink(missing_ok=True)
            return Staged(m0.name, m0.version, m0.kind, rec["package"],
                          rec["package_sha256"], m0, already=True,
                          root_version=self.trusted_signer.version)
        check_freshness(f"package {m0.name}@{m0.version}", m0.created, m0.expires, clock)
        allowance: RollbackAllowance | None = None
        if order is not None:
            o = verify_rollback_order(order, self.trusted_signer, self.fingerprint,
                                      self.model_state(m0.name, state), clock)
            allowance = o.allowance()
        m, pkg_sha, stored = self._verify_into_store(src, owned, state, allowance, envelope)
        st = state["models"].setdefault(m.name, {"kind": m.kind, "floor": 0,
                                                 "sequence": 0, "versions": {}})
        st["versions"][str(m.version)] = {
            "package": stored, "package_sha256": pkg_sha, "package_id": m.package_id,
            "payload_sha256": m.sha256, "size": m.size, "staged": _now(),
            "floor_before": int(st["floor"]), "signer": m.signer}
        if m.uses_envelopes and envelope is not None:  # verified with the package above
            st["versions"][str(m.version)]["envelope"] = base64.b64encode(envelope).decode()
        st.get("deleted", {}).pop(str(m.version), None)
        st["floor"] = max(int(st["floor"]), m.version)
        st["sequence"] = max(int(st["sequence"]), m.sequence)
        st["kind"] = m.kind
        try:
            self._save_state(state)
        except errors.FleetError:
            (self.ctx.store / stored).unlink(missing_ok=True)  # unreferenced: not kept
            raise
        _crash_point("stage:state")
        return Staged(m.name, m.version, m.kind, stored, pkg_sha, m,
                      root_version=self.trusted_signer.version)

    def _staged_by_file(self, file_name: str, state: dict[str, Any]) -> Staged | None:
        """The staged version whose package file is ``file_name`` (``<sha>.fpkg``), if any."""
        for name, st in state["models"].items():
            for v, rec in st.get("versions", {}).items():
                path = self.ctx.store / rec["package"]
                if rec["package"] == file_name and path.exists():
                    with path.open("rb") as f:
                        m = open_header(f, self._known_keys(), None,
                                        limits=self.limits).manifest
                    return Staged(name, int(v), m.kind, rec["package"],
                                  rec["package_sha256"], m, already=True)
        return None

    def _verify_into_store(self, src: Path, owned: bool, state: dict[str, Any],
                           allowance: RollbackAllowance | None, envelope: bytes | None
                           ) -> tuple[Manifest, str, str]:
        """Verify ``src`` into ``store/<sha256>.fpkg``: moved when ``owned`` (falls back to
        a copy across filesystems), copied otherwise. The temp file never survives a
        failure; OS errors become :class:`DiskFullError` / :class:`StoreError`."""
        store = self.ctx.store
        tmp = store / f".incoming-{secrets.token_hex(6)}.tmp"
        moved = False
        if owned:
            try:
                os.rename(src, tmp)
                moved = True
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise os_error(exc, src, "move") from exc
        h = hashlib.sha256()
        try:
            if moved:
                m = self._verify(tmp, state, allowance, h.update, envelope)
            else:
                m = self._verify_copy(src, tmp, state, allowance, h, envelope)
            _crash_point("stage:written")
            name = f"{h.hexdigest()}.fpkg"
            os.replace(tmp, store / name)
            fsync_dir(store)
            _crash_point("stage:stored")
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise os_error(exc, tmp) from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return m, h.hexdigest(), name

    def _verify(self, path: Path, state: dict[str, Any],
                allowance: RollbackAllowance | None,
                keep: Any, envelope: bytes | None) -> Manifest:
        """Every check on the package at ``path``; ``keep`` sees every stored byte."""
        def check(m: Manifest) -> None:
            self._base_check(m)

        return decrypt_package(path, self.trusted_signer, self.device_key,
                               installed_state=self._states(state), write=None,
                               on_header=keep, on_ciphertext=keep, limits=self.limits,
                               allowance=allowance, check_manifest=check, envelope=envelope)

    def _verify_copy(self, src: Path, tmp: Path, state: dict[str, Any],
                     allowance: RollbackAllowance | None, h: Any,
                     envelope: bytes | None) -> Manifest:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            def keep(view: memoryview | bytes) -> None:
                h.update(view)
                out.write(view)

            m = self._verify(src, state, allowance, keep, envelope)
            out.flush()
            os.fsync(out.fileno())
        return m

    def _clean_temp(self) -> None:
        """Leftovers of a crashed stage (temp files are never referenced by anything)."""
        for p in self.ctx.store.glob(".incoming-*.tmp"):
            p.unlink(missing_ok=True)

    # -- hygiene (the policy and the deleting live in fleet_agent.gc) ---------------------
    def load_state(self) -> dict[str, Any]:
        """``state.json`` as a dict (for :mod:`fleet_agent.gc`; hold :meth:`locked` to
        change it and save with :meth:`save_state`)."""
        return self._load_state()

    def save_state(self, state: dict[str, Any]) -> None:
        self._save_state(state)

    @property
    def keep(self) -> int:
        """Versions kept beyond the active and previous one (this root's policy)."""
        return gc.keep_of(self._load_state())

    def prune(self, name: str, keep: int | None = None) -> dict[str, Any]:
        """Apply the keep policy to ``name`` now (:func:`fleet_agent.gc.prune`)."""
        return gc.prune(self, name, keep)

    def refuse(self, name: str, version: int, reason: str) -> dict[str, Any]:
        """The device refused ``name@version`` (:func:`fleet_agent.gc.refuse`)."""
        return gc.refuse(self, name, version, reason)

    def activate(self, name: str, version: int) -> SlotChange:
        """Make a staged version current; the old current becomes ``previous``."""
        with self._locked():
            state = self._load_state()
            self._package_path(name, version, state)
            cur = self.active(name)
            if cur is not None and cur.version == version:
                prev = self.previous(name)
                return SlotChange(name, version, prev.version if prev else None, False)
            if cur is not None and version < cur.version:
                raise errors.RollbackError(
                    f"{name} v{version} is older than active v{cur.version}; use rollback",
                    name=name, version=version, active=cur.version)
            self._still_trusted(name, version, state)
            change = self._switch(name, version, state, "activate")
            with contextlib.suppress(errors.DiskFullError, errors.StoreError):
                self.prune(name)  # hygiene must not turn a done activation into a failure
            return change

    def rollback(self, name: str, order: dict[str, Any] | None = None, *,
                 trust: Sequence[Any] | None = None, controller_time: str | None = None
                 ) -> SlotChange:
        """Switch back to ``previous`` (an operator action on the device: both versions
        were verified when staged), or, with a signed rollback order, to the version it
        names (which must be staged; stage it with the same order first). ``trust`` and
        ``controller_time`` as in :meth:`stage`."""
        with self._locked():
            if trust:
                self._update_trust_locked(trust, pin=False)
            state = self._load_state()
            cur = self.active(name)
            if order is None:
                prev = self.previous(name)
                if prev is None or cur is None or prev.version == cur.version:
                    raise errors.StoreError(f"{name} has no previous version to go back to",
                                            name=name)
                self._package_path(name, prev.version, state)
                self._still_trusted(name, prev.version, state)
                return self._switch(name, prev.version, state, "rollback")
            o = verify_rollback_order(order, self.trusted_signer, self.fingerprint,
                                      self.model_state(name, state),
                                      self._clock_reading(controller_time))
            if o.name != name:
                raise errors.UsageError(f"rollback order is for {o.name}, not {name}")
            self._package_path(name, o.version, state)
            self._still_trusted(name, o.version, state)
            # Consume the order before switching: a crash in between loses the rollback
            # (the operator re-issues it), never lets the same order be used twice.
            state["models"][name]["sequence"] = o.sequence
            self._save_state(state)
            _crash_point("rollback:consumed")
            if cur is not None and cur.version == o.version:
                return SlotChange(name, o.version, None, False)
            return self._switch(name, o.version, state, "rollback")

    @contextlib.contextmanager
    def open_payload(self, name: str, version: int | None = None, *, as_dir: bool = False
                     ) -> Iterator[OpenedPayload]:
        """Decrypt a stored version (the active one by default) into memory; yields
        ``OpenedPayload`` (``.paths``: payload file -> ``/proc/self/fd/N``, ``.manifest``,
        ``.entry``). Plaintext never touches disk; the fds close on exit."""
        if version is None:
            slot = self.active(name)
            if slot is None:
                raise errors.NoActiveModelError(f"no active version of {name}", name=name)
            version = slot.version
        state = self._load_state()
        path = self._package_path(name, version, state)
        envelope = self._stored_envelope(name, version, state)
        key = self._key_for(self.manifest(name, version), envelope)
        with open_in_memory(path, self._known_keys(), key, as_dir=as_dir,
                            limits=self.limits, envelope=envelope) as opened:
            yield opened
