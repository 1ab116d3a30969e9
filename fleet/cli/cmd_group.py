"""``fleet group create|add|rm|list|show|delete``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from fleet.cli._ctx import state
from fleet.cli._output import emit, table
from fleet.cli.app import app
from fleet.cli.cmd_device import device_row
from fleet.registry import Registry

group_app = typer.Typer(help="Groups of devices.", no_args_is_help=True)
app.add_typer(group_app, name="group")
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


@group_app.command("create")
def create(name: str, description: str = "", as_json: JsonOpt = False) -> None:
    g = Registry.open(state().home).create_group(name, description)
    emit({"name": g.name, "id": g.id}, as_json=as_json,
         render=lambda c: c.print(f"group {g.name} created"))


@group_app.command("add")
def add(group: str, devices: list[str], as_json: JsonOpt = False) -> None:
    added = Registry.open(state().home).add_to_group(group, devices)
    emit({"group": group, "added": added}, as_json=as_json,
         render=lambda c: c.print(f"{group}: added {', '.join(added) or 'nothing new'}"))


@group_app.command("rm")
def rm(group: str, devices: list[str], as_json: JsonOpt = False) -> None:
    removed = Registry.open(state().home).remove_from_group(group, devices)
    emit({"group": group, "removed": removed}, as_json=as_json,
         render=lambda c: c.print(f"{group}: removed {', '.join(removed) or 'nothing'}"))


@group_app.command("delete")
def delete(group: str, as_json: JsonOpt = False) -> None:
    Registry.open(state().home).delete_group(group)
    emit({"deleted": group}, as_json=as_json, render=lambda c: c.print(f"group {group} deleted"))


@group_app.command("list")
def list_(as_json: JsonOpt = False) -> None:
    rows = Registry.open(state().home).list_groups()
    data = [{"name": g.name, "devices": n, "description": g.description} for g, n in rows]
    emit(data, as_json=as_json, render=lambda c: c.print(
        table(None, ["group", "devices", "description"],
              [(d["name"], d["devices"], d["description"]) for d in data])))


@group_app.command("show")
def show(group: str, as_json: JsonOpt = False) -> None:
    reg = Registry.open(state().home)
    g = reg.get_group(group)
    devs = reg.list_devices(group)
    data = {"name": g.name, "description": g.description, "devices": [device_row(d)
                                                                       for d in devs]}

    def render(c: Console) -> None:
        c.print(table(f"group {g.name}", ["device", "platform", "status", "uri"],
                      [(d.name, d.platform, d.status, d.uri) for d in devs]))

    emit(data, as_json=as_json, render=render)
