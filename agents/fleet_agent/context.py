"""The agent's device root and the paths inside it (ARCHITECTURE.md "Device store")."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["AgentContext"]


@dataclass(frozen=True)
class AgentContext:
    root: Path

    @classmethod
    def from_env(cls, root: str | None) -> AgentContext:
        value = root or os.environ.get("FLEET_AGENT_ROOT")
        if not value:
            value = str(Path.home() / ".fleet-agent")
        return cls(Path(value).expanduser())

    @property
    def identity_dir(self) -> Path:
        return self.root / "identity"

    @property
    def device_key(self) -> Path:
        return self.identity_dir / "device_key.pem"

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def slots(self) -> Path:
        return self.root / "slots"

    @property
    def incoming(self) -> Path:
        return self.root / "incoming"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def trust_file(self) -> Path:
        """The controller's Ed25519 public key, pinned at enrollment."""
        return self.identity_dir / "controller.pub"

    def ensure(self) -> None:
        for d in (self.root, self.store, self.slots, self.incoming, self.cache, self.reports):
            d.mkdir(parents=True, exist_ok=True)
        self.identity_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
