"""``fleet init`` and ``fleet status``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from fleet.cli._ctx import state
from fleet.cli._output import emit, table
from fleet.cli.app import app
from fleet.registry import Registry

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


@app.command("init")
def init(as_json: JsonOpt = False) -> None:
    """Create the controller home and migrate the registry to the newest schema."""
    home = state().home
    reg = Registry.init(home)
    data = {"home": str(home.path), "db": reg.url}
    emit(data, as_json=as_json,
         render=lambda c: c.print(f"fleet initialised in {home.path} (registry {reg.url})"))


@app.command("status")
def status(as_json: JsonOpt = False) -> None:
    """Summarise the fleet: devices per group and per status."""
    home = state().home
    reg = Registry.open(home)
    devices = reg.list_devices()
    groups = reg.list_groups()
    by_status: dict[str, int] = {}
    for d in devices:
        by_status[d.status] = by_status.get(d.status, 0) + 1
    data = {"home": str(home.path), "devices": len(devices), "by_status": by_status,
            "groups": {g.name: n for g, n in groups},
            "signing_key": home.signing_key.exists()}

    def render(c: Console) -> None:
        c.print(f"home {home.path}: {len(devices)} devices, {len(groups)} groups")
        c.print(table("groups", ["group", "devices"], [(g.name, n) for g, n in groups]))
        c.print(table("status", ["status", "devices"], sorted(by_status.items())))

    emit(data, as_json=as_json, render=render)
