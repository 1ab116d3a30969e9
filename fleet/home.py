"""The controller's home (``$FLEET_HOME``, default ``~/.fleet``) and what lives in it.

Secrets (signing key, ssh key) live here as 0600 files, never in the registry. Where the
registry is: ``--db``/``FLEET_DB`` (``db_override``), else ``registry.url`` in the home's
``config.toml`` (:mod:`fleet.config`), else SQLite ``registry.db`` in the home."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleet.config import Config

__all__ = ["FleetHome"]


@dataclass(frozen=True)
class FleetHome:
    path: Path
    db_override: str | None = None

    @classmethod
    def from_env(cls, home: str | os.PathLike[str] | None = None, db: str | None = None
                 ) -> FleetHome:
        value = home or os.environ.get("FLEET_HOME") or Path.home() / ".fleet"
        return cls(Path(value).expanduser().resolve(), db or os.environ.get("FLEET_DB"))

    @cached_property
    def config(self) -> Config:
        """``config.toml`` (read once; UsageError when malformed)."""
        from fleet.config import load

        return load(self.path)

    @property
    def db_url(self) -> str:
        """The registry's URL: the override (flag, environment), the config file's
        ``registry.url``, or SQLite in the home."""
        return (self.db_override or self.config.registry_url
                or f"sqlite:///{self.path / 'registry.db'}")

    @property
    def keys_dir(self) -> Path:
        return self.path / "keys"

    @property
    def signing_key(self) -> Path:
        """Ed25519 private key that signs manifests and rollback orders (0600)."""
        return self.keys_dir / "signing_key.pem"

    @property
    def ssh_key(self) -> Path:
        """The fleet's ssh client key (0600); its .pub goes to boards."""
        return self.keys_dir / "fleet_ssh_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.path / "known_hosts"

    @property
    def artifacts_dir(self) -> Path:
        return self.path / "artifacts"

    @property
    def lab_dir(self) -> Path:
        return self.path / "lab"

    def ensure(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
