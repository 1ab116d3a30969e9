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
    """Create the controller home and migrate the registry to the newest schema.

    Examples:

    \b
      fleet init
      FLEET_HOME=/srv/fleet fleet init --json
    """
    home = state().home
    reg = Registry.init(home)
    data = {"home": str(home.path), "db": reg.url}
    emit(data, as_json=as_json,
         render=lambda c: c.print(f"fleet initialised in {home.path} (registry {reg.url})"))


#: statuses that want the operator's eye (fleet.registry.status.DeviceState)
ATTENTION = (DeviceState.UNREACHABLE, DeviceState.DEGRADED, DeviceState.FAILED)
#: how many of them `fleet status` names (most recently seen first); the rest are counted
ATTENTION_SHOWN = 50


@app.command("status")
def status(as_json: JsonOpt = False) -> None:
    """Summarise the fleet: devices per group and per status, and the devices whose last
    contact failed (the 50 seen last; ``attention_total`` counts them all). Aggregate
    queries, whatever the fleet's size. Works on a read-only registry.

    Examples:

    \b
      fleet status
      fleet status -o yaml
    """
    from fleet.registry.listing import status_summary

    home = state().home
    reg = Registry.open(home)
    summary = status_summary(reg, [s.value for s in ATTENTION],
                             attention_limit=ATTENTION_SHOWN)
    groups, by_status, attention = summary.groups, summary.by_status, summary.attention
    more = summary.attention_total - len(attention)
    data = {"home": str(home.path), "devices": summary.devices, "by_status": by_status,
            "attention": attention, "attention_total": summary.attention_total,
            "groups": dict(groups),
            "signing_key": home.signing_key.exists(), "registry_read_only": reg.read_only}
    if reg.read_only:
        err.print("[yellow]the registry is on a read-only filesystem: showing what it "
                  "holds; commands that write will refuse[/]")

    def render(c: Console) -> None:
        c.print(f"home {home.path}: {summary.devices} devices, {len(groups)} groups")
        c.print(table("groups", ["group", "devices"], groups))
        c.print(table("status", ["status", "devices"], sorted(by_status.items())))
        if attention:
            c.print(table("needs attention", ["device", "status", "last error", "last seen"],
                          [(d["name"], d["status"], d["last_error"] or "-",
                            d["last_seen"].isoformat(timespec="seconds") if d["last_seen"]
                            else "never") for d in attention]))
        if more > 0:
            c.print(f"... and {more} more (`fleet device list -l status=unreachable` "
                    "and so on lists them)", highlight=False)

    emit(data, as_json=as_json, render=render)
