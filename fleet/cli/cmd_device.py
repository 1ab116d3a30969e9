"""``fleet device add|list|show|rm``."""

from __future__ import annotations

import shlex
from typing import Annotated, Any

import typer
from rich.console import Console

from fleet.cli._ctx import state
from fleet.cli._output import confirm, emit, emit_ndjson, err, literal, table
from fleet.cli.app import app
from fleet.core import errors
from fleet.registry import Device, Registry
from fleet.transports.uri import parse_uri

device_app = typer.Typer(help="Devices: register, list, inspect, remove.",
                         no_args_is_help=True)
app.add_typer(device_app, name="device")
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def device_row(d: Device, groups: list[str] | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"name": d.name, "platform": d.platform, "uri": d.uri, "status": d.status,
           "last_error": d.last_error, "tags": d.tags, "last_seen": d.last_seen,
           "agent_version": d.agent_version, "agent_root": d.agent_root,
           "fingerprint": d.fingerprint, "id": d.id,
           "revoked": d.revoked_at is not None, "root_version": d.root_version}
    if groups is not None:
        row["groups"] = groups
    return row


def status_text(status: str, last_error: str | None) -> str:
    """``unreachable (connect)``: the status, and the error code of the contact that set it."""
    return f"{status} ({last_error})" if last_error and status != "ok" else status


def _parse_tags(tags: list[str]) -> dict[str, str]:
    out = {}
    for t in tags:
        if "=" not in t or not t.split("=", 1)[0]:
            raise errors.UsageError(f"tag {t!r} is not key=value")
        k, v = t.split("=", 1)
        out[k] = v
    return out


def enroll_device(reg: Registry, name: str, *, accept_host_key: str | None = None
                  ) -> dict[str, Any]:
    """Run the agent's ``enroll`` through the transport and store the public key."""
    from fleet.enrollment import enroll  # transports: imported only when used

    res = enroll(state().home, reg, reg.get_device(name), accept_host_key=accept_host_key)
    return {"public_key": res.public_key, "fingerprint": res.fingerprint,
            "agent_version": res.agent_version}


@device_app.command("add")
def add(
    uri: str,
    name: Annotated[str, typer.Option("--name", "-n", help="Device name.")],
    group: Annotated[list[str], typer.Option("--group", "-g", help="Existing group.")] = [],  # noqa: B006
    tag: Annotated[list[str], typer.Option("--tag", "-t", help="key=value")] = [],  # noqa: B006
    agent_root: Annotated[str | None, typer.Option(help="Agent's device root.")] = None,
    agent_cmd: Annotated[str | None, typer.Option(help="Command that starts the agent.")] = None,
    accept_host_key: Annotated[str | None, typer.Option(
        help="ssh: accept this host key fingerprint (SHA256:...) on first contact.")] = None,
    enroll: Annotated[bool, typer.Option("--enroll/--no-enroll",
                                         help="Enroll the device now (makes its key).")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Register a device and enroll it (its agent makes a P-256 key; we keep the public part)."""
    parse_uri(uri)  # refuse malformed or unknown URIs before anything else
    tags = _parse_tags(tag)
    reg = Registry.open(state().home)
    for g in group:
        reg.get_group(g)  # unknown group: NotFoundError, nothing written
    cmd = shlex.split(agent_cmd) if agent_cmd else None
    dev = reg.add_device(name, uri, groups=group, tags=tags, agent_root=agent_root,
                         agent_cmd=cmd)
    if enroll:
        try:
            enroll_device(reg, name, accept_host_key=accept_host_key)
        except BaseException:
            reg.remove_device(name)  # leave the registry as it was
            raise
        dev = reg.get_device(name)
    emit(device_row(dev, reg.groups_of(name)), as_json=as_json,
         render=lambda c: c.print(f"device {dev.name} added ({dev.platform}, {dev.status}"
                                  f"{', ' + dev.fingerprint if dev.fingerprint else ''})",
                                  markup=False))


@device_app.command("enroll")
def enroll_cmd(name: str, accept_host_key: Annotated[str | None, typer.Option()] = None,
               as_json: JsonOpt = False) -> None:
    """(Re-)enroll a registered device."""
    reg = Registry.open(state().home)
    doc = enroll_device(reg, name, accept_host_key=accept_host_key)
    emit({"name": name, "fingerprint": doc["fingerprint"]}, as_json=as_json,
         render=lambda c: c.print(f"{name} enrolled: {doc['fingerprint']}", markup=False))


@device_app.command("list")
def list_(
    group: Annotated[str | None, typer.Option("--group", "-g")] = None,
    as_json: JsonOpt = False,
    ndjson: Annotated[bool, typer.Option("--ndjson", help="One JSON object per line.")] = False,
) -> None:
    """Every device (or a group's) with its status from the last contact (two queries)."""
    reg = Registry.open(state().home)
    devs = reg.list_devices(group)
    groups = reg.groups_by_device()
    rows = [device_row(d, groups.get(d.name, [])) for d in devs]
    if ndjson:
        emit_ndjson(rows)
        return

    def render(c: Console) -> None:
        c.print(table(None, ["name", "platform", "status", "groups", "uri", "last seen"],
                      [(r["name"], r["platform"], "revoked" if r["revoked"]
                        else status_text(r["status"], r["last_error"]),
                        ",".join(r["groups"]), r["uri"],
                        r["last_seen"].isoformat(timespec="seconds") if r["last_seen"]
                        else "-") for r in rows]))

    emit(rows, as_json=as_json, render=render)


@device_app.command("show")
def show(name: str, as_json: JsonOpt = False) -> None:
    reg = Registry.open(state().home)
    d = reg.get_device(name)
    row = device_row(d, reg.groups_of(name))
    row["public_key"] = d.public_key
    row["agent_cmd"] = d.agent_cmd

    def render(c: Console) -> None:
        for k, v in row.items():
            if k != "public_key":
                c.print(f"[bold]{literal(k)}[/]: {literal(v)}", highlight=False)

    emit(row, as_json=as_json, render=render)


@device_app.command("rm")
def rm(name: str, as_json: JsonOpt = False) -> None:
    Registry.open(state().home).remove_device(name)
    emit({"removed": name}, as_json=as_json, render=lambda c: c.print(f"device {name} removed"))
    err.print(f"[dim]the device keeps its store; nothing was sent to {name}[/]")


@device_app.command("revoke")
def revoke(name: str, yes: Annotated[bool, typer.Option("--yes", "-y")] = False,
           as_json: JsonOpt = False) -> None:
    """Revoke a device (lost, stolen, retired): no package is made for its key again.
    Nothing is sent to it; `fleet device list` shows it revoked."""
    from fleet.registry.types import utcnow

    reg = Registry.open(state().home)
    dev = reg.get_device(name)
    confirm(f"revoke device {name} ({dev.fingerprint})", yes)
    reg.update_device(name, revoked_at=utcnow())
    emit({"name": name, "revoked": True, "fingerprint": dev.fingerprint}, as_json=as_json,
         render=lambda c: c.print(f"device {literal(name)} revoked", highlight=False))


@device_app.command("rekey")
def rekey(name: str, yes: Annotated[bool, typer.Option("--yes", "-y")] = False,
          as_json: JsonOpt = False) -> None:
    """The device's agent makes a new key; the registry records it and the old one is
    refused (no package is made for it, the device no longer answers to it). Clears a
    revocation: the new key is trusted."""
    from fleet.connect import device_session

    home = state().home
    reg = Registry.open(home)
    dev = reg.get_device(name)
    confirm(f"replace the key of {name} ({dev.fingerprint})", yes)
    with device_session(home, dev) as agent:
        res = agent.rekey()
    reg.update_device(name, public_key=res.public_key, fingerprint=res.fingerprint,
                      revoked_at=None, root_version=res.root_version)
    emit({"name": name, "fingerprint": res.fingerprint, "previous": dev.fingerprint},
         as_json=as_json, render=lambda c: c.print(
             f"{literal(name)}: new key {res.fingerprint} (was {dev.fingerprint})",
             highlight=False))
