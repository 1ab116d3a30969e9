"""The controller home's settings file, ``$FLEET_HOME/config.toml``: set once, used by
every ``fleet`` command run against that home.

.. code-block:: toml

    [registry]
    url = "postgresql+psycopg://fleet:PASSWORD@db.example:5432/fleet"

    [broker]
    url = "redis://farm.example:6379/0"

    [artifacts]
    location = "/srv/fleet/artifacts"
    # on a farm host that cannot share that directory: fetch over HTTP(S) with Range
    # url = "https://controller.example:8443/artifacts/"

=======================  ==================  ===========================================
key                      overridden by       meaning (default)
=======================  ==================  ===========================================
``registry.url``         ``--db``,           the registry's SQLAlchemy URL (SQLite
                         ``FLEET_DB``        ``$FLEET_HOME/registry.db``)
``broker.url``           ``FLEET_BROKER``    Redis URL of the farm hosts' broker (none:
                                             every device is driven from this process)
``artifacts.location``   ``FLEET_ARTIFACTS`` where controller and farm workers share
                                             packages (``$FLEET_HOME/artifacts``)
``artifacts.url``        ``FLEET_ARTIFACTS_  a farm worker fetches packages from this
                         URL``               HTTP(S) base URL (Range, resumed, sha256
                                             checked) instead (none: the location)
``artifacts.ca_file``    ``FLEET_ARTIFACTS_  CA bundle (PEM) for an ``https://`` URL
                         CA``                (none: the system's)
=======================  ==================  ===========================================

A flag beats the environment, which beats the file, which beats the default. Other
modules keep their own keys in their own tables (``broker.deadline_s``,
``worker.heartbeat_s``: :mod:`fleet.worker.settings`) and read them with
:meth:`Config.get`. A malformed file, or a key of the wrong type, is a
:class:`~fleet.core.errors.UsageError` (exit 2) naming the file. The file may hold a
password, so :func:`update` writes it 0600 (temp file, fsync, rename).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet.core import errors

__all__ = ["CONFIG_FILE", "Config", "load", "update"]

CONFIG_FILE = "config.toml"

#: keys whose value must be a string (checked on load)
_STRINGS = ("registry.url", "broker.url", "artifacts.location", "artifacts.url",
            "artifacts.ca_file")


@dataclass(frozen=True)
class Config:
    """One home's ``config.toml`` (empty when there is none)."""

    path: Path
    doc: Mapping[str, Any] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        """The value at dotted ``key`` (``"registry.url"``), or ``default``."""
        node: Any = self.doc
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def registry_url(self) -> str | None:
        return self.get("registry.url") or None

    @property
    def broker_url(self) -> str | None:
        return self.get("broker.url") or None

    @property
    def artifacts_location(self) -> str | None:
        return self.get("artifacts.location") or None

    @property
    def artifacts_url(self) -> str | None:
        return self.get("artifacts.url") or None


def load(home: Path) -> Config:
    """``home/config.toml``, or an empty Config when there is none. Raises UsageError for
    a file that is not TOML or holds a non-string where a URL or a path belongs."""
    path = home / CONFIG_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Config(path)
    except OSError as exc:
        raise errors.UsageError(f"cannot read {path}: {exc.strerror or exc}",
                                path=str(path)) from exc
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise errors.UsageError(f"{path} is not valid TOML: {exc}", path=str(path)) from exc
    cfg = Config(path, doc)
    for key in _STRINGS:
        value = cfg.get(key)
        if value is not None and not isinstance(value, str):
            raise errors.UsageError(f"{path}: {key} must be a string, not {value!r}",
                                    path=str(path), key=key)
    return cfg


def update(home: Path, values: Mapping[str, Any]) -> Config:
    """Set dotted keys in ``home/config.toml`` (None removes one), keeping the rest;
    written 0600 through a temp file and a rename. Returns the new Config."""
    import tomli_w

    doc: dict[str, Any] = _plain(load(home).doc)
    for key, value in values.items():
        *parents, last = key.split(".")
        node = doc
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise errors.UsageError(f"{key}: {part} is not a table in {CONFIG_FILE}",
                                        key=key)
            node = child
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = home / CONFIG_FILE
    tmp = path.with_name(f".{CONFIG_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            tomli_w.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return load(home)


def _plain(doc: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _plain(v) if isinstance(v, Mapping) else v for k, v in doc.items()}
