"""``fleet group create|add|rm|list|show|delete``."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console

from fleet.cli._ctx import state
from fleet.cli._output import confirm, emit, table
from fleet.cli.app import app
from fleet.cli.cmd_device import status_text
from fleet.registry import Registry

group_app = typer.Typer(help="Groups of devices.\n\n"
                             "Examples:\n\n\b\n"
                             "  fleet group create phones\n"
                             "  fleet group add phones pixel7 s21", no_args_is_help=True)
app.add_typer(group_app, name="group")
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


@group_app.command("create")
def create(name: str, description: str = "", as_json: JsonOpt = False) -> None:
    """Create an empty group; devices join it with `fleet group add` or `fleet device add -g`.

    Examples:

    \b
      fleet group create phones --description "test phones"
    """
    g = Registry.open(state().home).create_group(name, description)
    emit({"name": g.name, "id": g.id}, as_json=as_json,
         render=lambda c: c.print(f"group {g.name} created"))


@group_app.command("add")
def add(group: str, devices: list[str], as_json: JsonOpt = False) -> None:
    """Add registered devices to GROUP (members already in it stay as they are).

    Examples:

    \b
      fleet group add phones pixel7 s21
    """
    added = Registry.open(state().home).add_to_group(group, devices)
    emit({"group": group, "added": added}, as_json=as_json,
         render=lambda c: c.print(f"{group}: added {', '.join(added) or 'nothing new'}"))


@group_app.command("rm")
def rm(group: str, devices: list[str], as_json: JsonOpt = False) -> None:
    """Take devices out of GROUP; they stay registered.

    Examples:

    \b
      fleet group rm phones s21
    """
    removed = Registry.open(state().home).remove_from_group(group, devices)
    emit({"group": group, "removed": removed}, as_json=as_json,
         render=lambda c: c.print(f"{group}: removed {', '.join(removed) or 'nothing'}"))


@group_app.command("delete")
def delete(group: str,
           yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
           as_json: JsonOpt = False) -> None:
    """Delete a group (its devices stay registered). A group that still has devices asks
    first on a terminal; elsewhere it needs --yes.

    Examples:

    \b
      fleet group delete old-phones --yes
    """
    reg = Registry.open(state().home)
    reg.get_group(group)  # unknown: NotFoundError before asking anything
    members = next(n for g, n in reg.list_groups() if g.name == group)
    if members:
        confirm(f"delete group {group} with {members} device(s) (they stay registered)", yes)
    reg.delete_group(group)
    emit({"deleted": group, "devices": members}, as_json=as_json,
         render=lambda c: c.print(f"group {group} deleted", markup=False))


@group_app.command("list")
def list_(as_json: JsonOpt = False) -> None:
    """Every group with its number of devices and its description.

    Examples:

    \b
      fleet group list
      fleet group list -o tsv
    """
    rows = Registry.open(state().home).list_groups()
    data = [{"name": g.name, "devices": n, "description": g.description} for g, n in rows]
    emit(data, as_json=as_json, render=lambda c: c.print(
        table(None, ["group", "devices", "description"],
              [(d["name"], d["devices"], d["description"]) for d in data])))


@group_app.command("show")
def show(group: str, as_json: JsonOpt = False) -> None:
    """A group: its size, its devices per status, and its devices with their platform,
    status and URI (on a terminal the first 50; ``-o json`` and the other formats list
    them all, as `fleet device list -g GROUP` does).

    Examples:

    \b
      fleet group show phones
      fleet group show phones -o wide
    """
    import json

    from fleet.cli._output import OutputFormat, output_format
    from fleet.registry.listing import device_lines, group_summary, in_group

    reg = Registry.open(state().home)
    summary = group_summary(reg, group, limit=SHOWN)
    data: dict[str, Any] = {"name": summary.name, "description": summary.description,
                            "count": summary.devices, "by_status": summary.by_status}
    if as_json or output_format() is not OutputFormat.TEXT:  # every device, streamed
        data["devices"] = [json.loads(line) for line in
                           device_lines(reg, where=[in_group(summary.id)])]

    def render(c: Console) -> None:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(summary.by_status.items()))
        c.print(f"group {summary.name}: {summary.devices} devices"
                + (f" ({counts})" if counts else ""), markup=False, highlight=False)
        c.print(table(None, ["device", "platform", "status", "uri"],
                      [(d["name"], d["platform"], status_text(d["status"], d["last_error"]),
                        d["uri"]) for d in summary.first]))
        if summary.devices > len(summary.first):
            c.print(f"... and {summary.devices - len(summary.first)} more: "
                    f"fleet device list -g {summary.name}", markup=False, highlight=False)

    emit(data, as_json=as_json, render=render)


#: devices `fleet group show` draws on a terminal (all of them in -o json, yaml, ...)
SHOWN = 50
