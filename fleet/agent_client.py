"""Talk to a device's agent through its transport: one verb, one JSON document back."""

from __future__ import annotations

import json
from typing import Any

from fleet.core import errors
from fleet.core.protocol import SCHEMA, encode_args
from fleet.registry.models import Device
from fleet.transports.base import Transport

__all__ = ["AgentClient"]

class AgentClient:
    def __init__(self, transport: Transport, device: Device | None = None) -> None:
        self.transport = transport
        self.root = (device.agent_root if device and device.agent_root
                     else transport.agent_root())
        self.cmd = list(device.agent_cmd) if device and device.agent_cmd else \
            transport.agent_cmd()
        self.name = device.name if device else transport.uri

    def argv(self, verb: str, args: dict[str, Any]) -> list[str]:
        return [*self.cmd, "--root", self.root, *verb.split(), "--args-b64", encode_args(args)]

    def call(self, verb: str, args: dict[str, Any] | None = None, *, timeout: float = 120.0
             ) -> dict[str, Any]:
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
