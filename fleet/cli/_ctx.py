"""Per-invocation state shared by every command: the home and the registry."""

from __future__ import annotations

from dataclasses import dataclass

import click

from fleet.home import FleetHome

__all__ = ["CliState", "state"]


@dataclass
class CliState:
    home: FleetHome


def state() -> CliState:
    ctx = click.get_current_context()
    root = ctx.find_root()
    if not isinstance(root.obj, CliState):
        root.obj = CliState(home=FleetHome.from_env())
    return root.obj
