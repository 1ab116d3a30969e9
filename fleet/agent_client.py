"""The controller's typed client of a device's agent (``docs/agent-protocol.md``).

One method per verb, so callers never spell verbs or argument names; answers come back
as small dataclasses where the protocol fixes their fields, or as the raw document where
it is free-form (reports, lora answers). The wire is unchanged: ``argv`` is the exec form
``fleet-agent --root ROOT VERB [SUB] --args-b64 B64`` over whatever transport the device
has; an error document becomes the :mod:`fleet.core.errors` class its code names.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet.core import errors
from fleet.core.protocol import SCHEMA, encode_args
from fleet.registry.models import Device
from fleet.transports.base import ProgressCallback, TransferResult, Transport

__all__ = [
    "ActivateResult",
    "AgentClient",
    "AgentStatus",
    "EnrollResult",
    "RollbackResult",
    "StageResult",
    "Upload",
]


@dataclass(frozen=True)
class AgentStatus:
    """``status``: the agent and what it has installed (name -> store record)."""

    agent_version: str | None
    root: str | None
    enrolled: bool
    installed: dict[str, dict[str, Any]]
    doc: dict[str, Any] = field(repr=False)

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> AgentStatus:
        return cls(agent_version=doc.get("agent_version"), root=doc.get("root"),
                   enrolled=bool(doc.get("enrolled")),
                   installed=dict(doc.get("installed") or {}), doc=doc)


@dataclass(frozen=True)
class EnrollResult:
    public_key: str
    fingerprint: str
    created: bool
    trusts_controller: bool
    agent_version: str | None
    root_version: int | None = None  #: the root of trust the device holds now

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> EnrollResult:
        return cls(public_key=doc["public_key"], fingerprint=doc["fingerprint"],
                   created=bool(doc.get("created")),
                   trusts_controller=bool(doc.get("trusts_controller")),
                   agent_version=doc.get("agent_version"),
                   root_version=doc.get("root_version"))


@dataclass(frozen=True)
class StageResult:
    """``stage``: the package verified and stored encrypted."""

    name: str | None
    version: int | None
    package_sha256: str | None
    doc: dict[str, Any] = field(repr=False)

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> StageResult:
        return cls(name=doc.get("name"), version=doc.get("version"),
                   package_sha256=doc.get("package_sha256"), doc=doc)


@dataclass(frozen=True)
class ActivateResult:
    """``activate``/``bench``: the health report (free-form, ``docs/health.md``)."""

    report: dict[str, Any]

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> ActivateResult:
        return cls(report=dict(doc.get("report") or doc))


@dataclass(frozen=True)
class RollbackResult:
    """``rollback``: the slot now active and the one before (``current``; older agents
    said ``active``)."""

    name: str | None
    current: int | None
    previous: int | None
    changed: bool

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> RollbackResult:
        return cls(name=doc.get("name"), current=doc.get("current", doc.get("active")),
                   previous=doc.get("previous"), changed=bool(doc.get("changed", True)))


@dataclass(frozen=True)
class Upload:
    """A package pushed into the agent's ``incoming/`` and checked by digest."""

    remote: str
    transfer: TransferResult


class AgentClient:
    """One device's agent behind one transport."""

    def __init__(self, transport: Transport, device: Device | None = None) -> None:
        self.transport = transport
        self.root = (device.agent_root if device and device.agent_root
                     else transport.agent_root())
        self.cmd = list(device.agent_cmd) if device and device.agent_cmd else \
            transport.agent_cmd()
        self.name = device.name if device else transport.uri
        #: the controller's root chain (v1 first), carried with enroll, stage and
        #: rollback so trust changes reach the device before what they sign
        #: (set by fleet.connect.open_device; None: nothing to carry)
        self.trust: list[dict[str, Any]] | None = None

    def _trust_args(self) -> dict[str, Any]:
        from datetime import UTC, datetime

        args: dict[str, Any] = {
            "controller_time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
        if self.trust:
            args["trust"] = self.trust
        return args

    # -- typed verbs --------------------------------------------------------------------
    def status(self, *, timeout: float = 60.0) -> AgentStatus:
        return AgentStatus.from_doc(self.call("status", timeout=timeout))

    def enroll(self, controller_pub: str | None, *, replace_trust: bool = False,
               timeout: float = 120.0) -> EnrollResult:
        args: dict[str, Any] = {"controller_pub": controller_pub, **self._trust_args()}
        if replace_trust:
            args["replace_trust"] = True
        return EnrollResult.from_doc(self.call("enroll", args, timeout=timeout))

    def rekey(self, *, timeout: float = 120.0) -> EnrollResult:
        """The device makes a new key; the old one opens only what is already stored."""
        return EnrollResult.from_doc(self.call("rekey", {}, timeout=timeout))

    def probe(self, *, timeout: float = 120.0) -> dict[str, Any]:
        return dict(self.call("probe", timeout=timeout).get("probe") or {})

    def stage(self, path: str, *, envelope: bytes | None = None,
              timeout: float = 120.0) -> StageResult:
        """Verify and store the pushed package at ``path`` (a device path); ``envelope``
        is the device's key envelope (format-2 packages, 181 bytes, sent base64)."""
        args: dict[str, Any] = {"path": path, **self._trust_args()}
        if envelope is not None:
            args["envelope"] = base64.b64encode(envelope).decode("ascii")
        return StageResult.from_doc(self.call("stage", args, timeout=timeout))

    def activate(self, name: str, version: int, *, warmup: int | None = None,
                 iterations: int | None = None, timeout: float = 600.0) -> ActivateResult:
        args: dict[str, Any] = {"name": name, "version": version}
        if warmup is not None:
            args["warmup"] = warmup
        if iterations is not None:
            args["iterations"] = iterations
        return ActivateResult.from_doc(self.call("activate", args, timeout=timeout))

    def rollback(self, name: str, order: dict[str, Any] | None = None, *,
                 timeout: float = 120.0) -> RollbackResult:
        """Switch ``name`` to its previous slot, or where a signed ``order`` says."""
        return RollbackResult.from_doc(self.call(
            "rollback", {"name": name, "order": order, **self._trust_args()}, timeout=timeout))

    def bench(self, name: str | None = None, *, warmup: int | None = None,
              iterations: int | None = None, timeout: float = 600.0) -> dict[str, Any]:
        args: dict[str, Any] = {} if name is None else {"name": name}
        if warmup is not None:
            args["warmup"] = warmup
        if iterations is not None:
            args["iterations"] = iterations
        return self.call("bench", args, timeout=timeout)

    def audit(self, name: str | None = None, *, timeout: float = 120.0) -> dict[str, Any]:
        """Findings per active model (free-form, ``docs/audit-rules.md``)."""
        return self.call("audit", {} if name is None else {"name": name}, timeout=timeout)

    def lora(self, sub: str, args: dict[str, Any], *, timeout: float = 120.0
             ) -> dict[str, Any]:
        """``lora add|swap|remove|list|serve|generate`` (answers: ``docs/lora.md``)."""
        if sub not in ("add", "swap", "remove", "list", "serve", "generate"):
            raise errors.UsageError(f"unknown lora verb {sub!r}", verb=f"lora {sub}")
        return self.call(f"lora {sub}", args, timeout=timeout)

    # -- moving packages ----------------------------------------------------------------
    def incoming_path(self, package_sha256: str) -> str:
        return f"{self.root.rstrip('/')}/incoming/{package_sha256}.fpkg"

    def upload(self, local: Path, package_sha256: str, *,
               progress: ProgressCallback | None = None) -> Upload:
        """Push ``local`` into the agent's ``incoming/`` (resumable); a digest that differs
        after the push is :class:`RemoteFileError` (not retried: the bytes are wrong)."""
        remote = self.incoming_path(package_sha256)
        tr = self.transport.push(local, remote, resume=True, progress=progress)
        if tr.sha256 != package_sha256:
            raise errors.RemoteFileError(f"{self.name}: pushed file digest differs",
                                         device=self.name, remote=remote)
        return Upload(remote, tr)

    # -- the wire -----------------------------------------------------------------------
    def argv(self, verb: str, args: dict[str, Any]) -> list[str]:
        return [*self.cmd, "--root", self.root, *verb.split(), "--args-b64", encode_args(args)]

    def call(self, verb: str, args: dict[str, Any] | None = None, *, timeout: float = 120.0
             ) -> dict[str, Any]:
        """Run one verb; the ``fleet.agent/1`` answer, or its error raised as its class."""
        result = self.transport.run(self.argv(verb, args or {}), timeout=timeout)
        text = result.stdout.decode("utf-8", "replace").strip()
        doc: Any = None
        for line in reversed(text.splitlines()):
            line = line.strip()
            if line.startswith("{"):
                try:
                    doc = json.loads(line)
                    break
                except json.JSONDecodeError:
                    continue
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
            tail = result.stderr.decode("utf-8", "replace").strip()[-400:]
            raise errors.AgentError(
                f"{self.name}: agent gave no {SCHEMA} answer to {verb!r} "
                f"(exit {result.exit_code}): {tail or text[-400:]}", device=self.name,
                verb=verb, exit_code=result.exit_code)
        if not doc.get("ok"):
            e = doc.get("error") or {}
            err = errors.error_from_code(str(e.get("code", "agent")),
                                         f"{self.name}: {e.get('message', 'agent error')}",
                                         dict(e.get("details") or {}))
            err.details.setdefault("device", self.name)
            raise err
        return doc
