"""Per-invocation state shared by every command: the controller home."""

from __future__ import annotations

from dataclasses import dataclass

from fleet.home import FleetHome

__all__ = ["CliState", "set_state", "state"]


@dataclass
class CliState:
    home: FleetHome


_current: CliState | None = None


def set_state(value: CliState) -> None:
    global _current
    _current = value


def state() -> CliState:
    if _current is None:
        set_state(CliState(home=FleetHome.from_env()))
    assert _current is not None
    return _current
