"""``fleet init`` and ``fleet status``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from fleet.cli._ctx import state
from fleet.cli._output import emit, err, table
from fleet.cli.app import app
from fleet.registry import Registry
from fleet.registry.status import DeviceState

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


@app.command("init")
def init(as_json: JsonOpt = False) -> None:
    """Create the controller home and migrate the registry to the newest schema."""
    home = state().home
    reg = Registry.init(home)
    data = {"home": str(home.path), "db": reg.url}
    emit(data, as_json=as_json,
         render=lambda c: c.print(f"fleet initialised in {home.path} (registry {reg.url})"))


#: statuses that want the operator's eye (fleet.registry.status.DeviceState)
ATTENTION = (DeviceState.UNREACHABLE, DeviceState.DEGRADED, DeviceState.FAILED)


@app.command("status")
def status(as_json: JsonOpt = False) -> None:
    """Summarise the fleet: devices per group and per status, and the devices whose last
    contact failed (two queries, whatever the fleet's size). Works on a read-only registry."""
    home = state().home
    reg = Registry.open(home)
    devices = reg.list_devices()
    groups = reg.list_groups()
    by_status: dict[str, int] = {}
    for d in devices:
        by_status[d.status] = by_status.get(d.status, 0) + 1
    attention = [d for d in devices if d.status in ATTENTION]
    data = {"home": str(home.path), "devices": len(devices), "by_status": by_status,
            "attention": [{"name": d.name, "status": d.status, "last_error": d.last_error,
                           "last_seen": d.last_seen} for d in attention],
            "groups": {g.name: n for g, n in groups},
            "signing_key": home.signing_key.exists(), "registry_read_only": reg.read_only}
    if reg.read_only:
        err.print("[yellow]the registry is on a read-only filesystem: showing what it "
                  "holds; commands that write will refuse[/]")

    def render(c: Console) -> None:
        c.print(f"home {home.path}: {len(devices)} devices, {len(groups)} groups")
        c.print(table("groups", ["group", "devices"], [(g.name, n) for g, n in groups]))
        c.print(table("status", ["status", "devices"], sorted(by_status.items())))
        if attention:
            c.print(table("needs attention", ["device", "status", "last error", "last seen"],
                          [(d.name, d.status, d.last_error or "-",
                            d.last_seen.isoformat(timespec="seconds") if d.last_seen
                            else "never") for d in attention]))

    emit(data, as_json=as_json, render=render)
