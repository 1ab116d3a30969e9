"""What every lab kind (iot, android, ios) hands back, and the bookkeeping they share.

A lab kind is a module with ``up(home, count, *, start_index=0) -> list[LabDevice]``,
``down(home) -> list[str]`` and ``status(home) -> list[dict]``. Each keeps a JSON state
file under ``home.lab_dir`` listing exactly what it made, so ``down`` removes by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fleet.core import errors
from fleet.home import FleetHome

__all__ = [
    "LabDevice",
    "lab_tag",
    "load_state",
    "register_devices",
    "save_state",
    "shared_agent_cmd",
    "unregister_devices",
]


@dataclass
class LabDevice:
    name: str
    uri: str
    platform: str  #: "linux" | "android" | "ios"
    group: str  #: registry group the lab puts it in ("lab-iot", ...)
    agent_root: str
    agent_cmd: list[str]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lab_tag(home: FleetHome) -> str:
    """A short tag unique to one controller home, so two homes' labs never share names."""
    return hashlib.sha256(str(home.path).encode()).hexdigest()[:6]


def shared_agent_cmd() -> list[str]:
    """The controller's own ``fleet-agent``: lab devices share this machine's filesystem,
    so they run one installation (the project's virtualenv) instead of one each."""
    return [str(Path(sys.prefix) / "bin" / "fleet-agent")]


def _state_path(home: FleetHome, kind: str) -> Path:
    return home.lab_dir / f"{kind}.json"


def load_state(home: FleetHome, kind: str) -> dict[str, Any]:
    path = _state_path(home, kind)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise errors.LabError(f"lab state {path} is unreadable: {exc}", path=str(path)) from exc
    return data if isinstance(data, dict) else {}


def save_state(home: FleetHome, kind: str, data: dict[str, Any]) -> None:
    path = _state_path(home, kind)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not data:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def register_devices(home: FleetHome, devices: Sequence[LabDevice]) -> None:
    """Put lab devices into the registry. Idempotent: a row with the same name and URI is
    kept (with its enrollment), a stale row of the same name is replaced."""
    from fleet.registry import Registry

    reg = Registry.open(home)
    try:
        for dev in devices:
            reg.ensure_group(dev.group)
            try:
                row = reg.get_device(dev.name)
            except errors.NotFoundError:
                row = None
            if row is not None and row.uri == dev.uri:
                reg.add_to_group(dev.group, [dev.name])
                continue
            if row is not None:
                reg.remove_device(dev.name)
            reg.add_device(dev.name, dev.uri, groups=(dev.group,), platform=dev.platform,
                           agent_root=dev.agent_root, agent_cmd=list(dev.agent_cmd),
                           tags={"lab": dev.group})
    finally:
        reg.close()


def unregister_devices(home: FleetHome, names: Sequence[str]) -> list[str]:
    """Remove lab devices from the registry; returns those that were there."""
    from fleet.registry import Registry

    try:
        reg = Registry.open(home)
    except errors.RegistryError:
        return []
    removed = []
    try:
        for name in names:
            try:
                reg.remove_device(name)
                removed.append(name)
            except errors.NotFoundError:
                pass
    finally:
        reg.close()
    return removed
