"""The device store: packages kept encrypted, slots switched atomically.

Layout under the device root (ARCHITECTURE.md "Device store")::

    store/<sha256 of the package file>.fpkg     encrypted, exactly the bytes verified
    slots/<name>/current, slots/<name>/previous  small JSON pointers, replaced by rename
    state.json                                   versions, floors, sequence numbers

``slots/<name>/current`` is the truth about what is active; ``state.json`` holds what
was accepted (the version floor and sequence numbers the trust rules need) and a mirror
of the slots for ``status``. Every file is written to a temp file, fsynced, renamed, and
the directory fsynced, so a crash at any instant leaves the old or the new state.

Test hook: ``FLEET_AGENT_CRASH_AT=<step>`` makes the process exit with status 137 at that
step (``stage:written``, ``stage:stored``, ``stage:state``, ``activate:previous``,
``activate:current``, ``activate:state``, ``rollback:consumed``); the crash tests kill
the agent at each one. It is inert unless the variable names a step.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fleet.core import errors
from fleet.core.filelock import exclusive
from fleet.core.package import (
    Limits,
    Manifest,
    ModelState,
    RollbackAllowance,
    check_base_binding,
    check_version,
    decrypt_package,
    fingerprint_public_key,
    load_trusted_public_key,
    open_header,
    verify_rollback_order,
)
from fleet_agent.context import AgentContext
from fleet_agent.identity import load_device_key
from fleet_agent.unpack import OpenedPayload, open_in_memory

__all__ = ["CRASH_ENV", "SlotChange", "SlotInfo", "Staged", "Store"]

CRASH_ENV = "FLEET_AGENT_CRASH_AT"
STATE_SCHEMA = "fleet.store/1"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _crash_point(step: str) -> None:
    if os.environ.get(CRASH_ENV) == step:
        os._exit(137)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_full(exc: OSError, path: Path) -> errors.FleetError:
    if exc.errno in _DISK_FULL:
        return errors.DiskFullError(f"no space left writing {path}", path=str(path))
    return errors.StoreError(f"cannot write {path}: {exc.strerror}", path=str(path))


def _atomic_write(path: Path, data: bytes) -> None:
    """temp + fsync + rename + fsync(dir); the old content stays until the rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _disk_full(exc, path) from exc


@dataclass(frozen=True)
class Staged:
    name: str
    version: int
    kind: str
    package: str  # file name in store/
    package_sha256: str
    manifest: Manifest
    already: bool = False  # the same package was staged before: nothing was done

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "kind": self.kind,
                "package": self.package, "package_sha256": self.package_sha256,
                "payload_sha256": self.manifest.sha256, "size": self.manifest.size,
                "already": self.already}


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

    def __init__(self, ctx: AgentContext, *, limits: Limits | None = None) -> None:
        self.ctx = ctx
        self.limits = limits or Limits()
        self._device_key: ec.EllipticCurvePrivateKey | None = None
        self._trusted: ed25519.Ed25519PublicKey | None = None

    # -- keys and state -----------------------------------------------------------------
    @property
    def device_key(self) -> ec.EllipticCurvePrivateKey:
        if self._device_key is None:
            self._device_key = load_device_key(self.ctx.device_key)
        return self._device_key

    @property
    def fingerprint(self) -> str:
        return fingerprint_public_key(self.device_key.public_key())

    @property
    def trusted_signer(self) -> ed25519.Ed25519PublicKey:
        if self._trusted is None:
            try:
                pem = self.ctx.trust_file.read_bytes()
            except FileNotFoundError as exc:
                raise errors.KeyMaterialError(
                    "no controller key pinned on this device; enroll it with controller_pub",
                    path=str(self.ctx.trust_file)) from exc
            self._trusted = load_trusted_public_key(pem)
        return self._trusted

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.ctx.ensure()
        with exclusive(self.ctx.root / ".store.lock"):
            yield

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
        _atomic_write(self.ctx.state_file,
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
            return open_header(f, self.trusted_signer, None, limits=self.limits).manifest

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
        _atomic_write(self._slot_file(name, which),
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
              order: dict[str, Any] | None = None) -> Staged:
        """Verify a package completely and keep it, encrypted, in ``store/``.

        Nothing lands unless every check passed: the ciphertext is copied to a temp file
        while it is authenticated and its plaintext hashed (the plaintext goes nowhere),
        then renamed into place. ``order`` is a signed rollback order that allows an
        older version to be staged (it is consumed only by :meth:`rollback`)."""
        src = Path(package_path)
        with self._locked():
            state = self._load_state()
            self._clean_temp()
            with src.open("rb") as f:  # cheap header look: is this package already here?
                m0 = open_header(f, self.trusted_signer, None,
                                 device_fingerprint=self.fingerprint,
                                 limits=self.limits).manifest
            rec = state["models"].get(m0.name, {}).get("versions", {}).get(str(m0.version))
            if rec and rec.get("package_id") == m0.package_id \
                    and (self.ctx.store / rec["package"]).exists():
                return Staged(m0.name, m0.version, m0.kind, rec["package"],
                              rec["package_sha256"], m0, already=True)
            allowance: RollbackAllowance | None = None
            if order is not None:
                o = verify_rollback_order(order, self.trusted_signer, self.fingerprint,
                                          self.model_state(m0.name, state))
                allowance = o.allowance()
            m, pkg_sha, stored = self._verify_and_copy(src, state, allowance)
            st = state["models"].setdefault(m.name, {"kind": m.kind, "floor": 0,
                                                     "sequence": 0, "versions": {}})
            st["versions"][str(m.version)] = {
                "package": stored, "package_sha256": pkg_sha, "package_id": m.package_id,
                "payload_sha256": m.sha256, "size": m.size, "staged": _now()}
            st["floor"] = max(int(st["floor"]), m.version)
            st["sequence"] = max(int(st["sequence"]), m.sequence)
            st["kind"] = m.kind
            self._save_state(state)
            _crash_point("stage:state")
            return Staged(m.name, m.version, m.kind, stored, pkg_sha, m)

    def _verify_and_copy(self, src: Path, state: dict[str, Any],
                         allowance: RollbackAllowance | None) -> tuple[Manifest, str, str]:
        store = self.ctx.store
        tmp = store / f".incoming-{secrets.token_hex(6)}.tmp"
        h = hashlib.sha256()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise _disk_full(exc, tmp) from exc
        try:
            with os.fdopen(fd, "wb") as out:
                def keep(view: memoryview | bytes) -> None:
                    h.update(view)
                    out.write(view)

                def check(m: Manifest) -> None:
                    self._base_check(m)

                m = decrypt_package(src, self.trusted_signer, self.device_key,
                                    installed_state=self._states(state), write=None,
                                    on_header=keep, on_ciphertext=keep, limits=self.limits,
                                    allowance=allowance, check_manifest=check)
                out.flush()
                os.fsync(out.fileno())
            _crash_point("stage:written")
            name = f"{h.hexdigest()}.fpkg"
            os.replace(tmp, store / name)
            _fsync_dir(store)
            _crash_point("stage:stored")
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _disk_full(exc, tmp) from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return m, h.hexdigest(), name

    def _clean_temp(self) -> None:
        """Leftovers of a crashed stage (temp files are never referenced by anything)."""
        for p in self.ctx.store.glob(".incoming-*.tmp"):
            p.unlink(missing_ok=True)

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
            return self._switch(name, version, state, "activate")

    def rollback(self, name: str, order: dict[str, Any] | None = None) -> SlotChange:
        """Switch back to ``previous`` (an operator action on the device: both versions
        were verified when staged), or, with a signed rollback order, to the version it
        names (which must be staged; stage it with the same order first)."""
        with self._locked():
            state = self._load_state()
            cur = self.active(name)
            if order is None:
                prev = self.previous(name)
                if prev is None or cur is None or prev.version == cur.version:
                    raise errors.StoreError(f"{name} has no previous version to go back to",
                                            name=name)
                self._package_path(name, prev.version, state)
                return self._switch(name, prev.version, state, "rollback")
            o = verify_rollback_order(order, self.trusted_signer, self.fingerprint,
                                      self.model_state(name, state))
            if o.name != name:
                raise errors.UsageError(f"rollback order is for {o.name}, not {name}")
            self._package_path(name, o.version, state)
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
        path = self._package_path(name, version)
        with open_in_memory(path, self.trusted_signer, self.device_key, as_dir=as_dir,
                            limits=self.limits) as opened:
            yield opened

    def check_version(self, m: Manifest) -> None:
        """The version rule alone, against this device's state (for dry runs)."""
        check_version(m, self.model_state(m.name))
