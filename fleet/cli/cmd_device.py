"""``fleet device add|list|show|tag|probe|rm|enroll|revoke|rekey``."""

from __future__ import annotations

import shlex
import sys
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.console import Console

from fleet.cli._ctx import state
from fleet.cli._output import confirm, emit, err, literal, table
from fleet.cli._targets import DeviceOpt, GroupOpt, SelectorOpt, Targets
from fleet.cli.app import app
from fleet.core import errors
from fleet.registry import Device, Registry
from fleet.transports.uri import parse_uri

device_app = typer.Typer(help="Devices: register, list, inspect, tag, probe, remove.\n\n"
                              "Examples:\n\n\b\n"
                              "  fleet device add ssh://pi@10.0.0.7:22 --name pi4 -g boards\n"
                              "  fleet device list -o wide",
                         no_args_is_help=True)
app.add_typer(device_app, name="device")
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def device_row(d: Device, groups: list[str] | None = None) -> dict[str, Any]:
    """A device as JSON: ``tags`` and ``facts`` (what ``-l`` matches: hw.* of the last
    probe, model.NAME, disk.free_gb) are objects, ``groups`` a list."""
    row: dict[str, Any] = {"name": d.name, "platform": d.platform, "uri": d.uri,
                           "status": d.status, "last_error": d.last_error,
                           "tags": dict(d.tags or {}), "last_seen": d.last_seen,
                           "agent_version": d.agent_version, "agent_root": d.agent_root,
                           "fingerprint": d.fingerprint, "id": d.id,
                           "revoked": d.revoked_at is not None, "revoked_at": d.revoked_at,
                           "root_version": d.root_version, "via": d.via,
                           "facts": {k: v for k, v in sorted((d.facts or {}).items())
                                     if not k.startswith("_")}}
    if groups is not None:
        row["groups"] = groups
    return row


def tags_text(tags: dict[str, str] | None) -> str:
    """``k=v,k2=v2`` (sorted), or ``-``."""
    return ",".join(f"{k}={v}" for k, v in sorted((tags or {}).items())) or "-"


def _text(value: Any) -> str:
    """One value for people: ``-`` for None, yes/no, k=v lists, ISO times."""
    if value is None or value == "" or value == [] or value == {}:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_text(v)}" for k, v in sorted(value.items()))
    if isinstance(value, list | tuple):
        return ", ".join(_text(v) for v in value)
    return str(value)


def status_text(status: str, last_error: str | None) -> str:
    """``unreachable (connect)``: the status, and the error code of the contact that set it."""
    return f"{status} ({last_error})" if last_error and status != "ok" else status


def _parse_tags(tags: list[str]) -> dict[str, str]:
    """``key=value`` words; a key must be selectable (``fleet.registry.selectors``) and a
    value holds no ``,`` (selectors split on it)."""
    from fleet.registry.selectors import check_tag_key

    out = {}
    for t in tags:
        if "=" not in t or not t.split("=", 1)[0]:
            raise errors.UsageError(f"tag {t!r} is not key=value")
        k, v = t.split("=", 1)
        check_tag_key(k)
        if "," in v:
            raise errors.UsageError(f"tag {t!r}: a value cannot hold ',' (selectors split "
                                    "terms on it)")
        out[k] = v
    return out


def _same_agent(reg: Registry, fingerprint: str, other_than: str) -> Device | None:
    """The registered device (not ``other_than``) whose agent key is ``fingerprint``."""
    from sqlmodel import col, select

    with reg.reading() as s:
        return s.exec(select(Device).where(col(Device.fingerprint) == fingerprint)
                      .where(col(Device.name) != other_than)).first()


def _move(reg: Registry, old: Device, new_name: str, groups: list[str],
          tags: dict[str, str]) -> Device:
    """``--replace``: the old record (its id, history, reports, groups, revocation) takes
    the new name and the new record's URI, agent settings and key; the new record goes."""
    from sqlmodel import col, select

    with reg.session() as s:  # one transaction: the new row goes, the old one moves
        new = s.exec(select(Device).where(col(Device.name) == new_name)).one()
        kept = s.exec(select(Device).where(col(Device.id) == old.id)).one()
        moved = {"uri": new.uri, "platform": new.platform, "agent_root": new.agent_root,
                 "agent_cmd": new.agent_cmd, "public_key": new.public_key,
                 "fingerprint": new.fingerprint, "agent_version": new.agent_version,
                 "status": new.status, "last_seen": new.last_seen,
                 "last_error": new.last_error,
                 "root_version": new.root_version or kept.root_version,
                 "tags": {**(kept.tags or {}), **tags}}
        s.delete(new)
        s.flush()
        kept.name = new_name
        for k, v in moved.items():
            setattr(kept, k, v)
        s.add(kept)
    for g in groups:
        reg.add_to_group(g, [new_name])
    return reg.get_device(new_name)


def enroll_device(reg: Registry, name: str, *, accept_host_key: str | None = None
                  ) -> dict[str, Any]:
    """Run the agent's ``enroll`` through the transport and store the public key (a
    device behind a farm host: through its worker, fleet.worker)."""
    from fleet.enrollment import enroll, enroll_many  # transports: imported when used

    dev = reg.get_device(name)
    if dev.via:
        if accept_host_key:
            raise errors.UsageError(f"{name} is reached through farm host {dev.via}: pin "
                                    "its host key in that host's known_hosts instead")
        out = enroll_many(state().home, reg, [dev], workers=1)[name]
        if out.result is None:
            raise out.error or errors.FleetError(f"{name}: enrollment {out.status.value}")
        res = out.result
    else:
        res = enroll(state().home, reg, dev, accept_host_key=accept_host_key)
    return {"public_key": res.public_key, "fingerprint": res.fingerprint,
            "agent_version": res.agent_version}


@device_app.command("add")
def add(
    uri: str,
    name: Annotated[str | None, typer.Option(
        "--name", "-n", help="Device name (pull://NAME: NAME by default).")] = None,
    group: Annotated[list[str], typer.Option("--group", "-g", help="Existing group.")] = [],  # noqa: B006
    tag: Annotated[list[str], typer.Option("--tag", "-t", help="key=value")] = [],  # noqa: B006
    agent_root: Annotated[str | None, typer.Option(help="Agent's device root.")] = None,
    agent_cmd: Annotated[str | None, typer.Option(help="Command that starts the agent.")] = None,
    accept_host_key: Annotated[str | None, typer.Option(
        help="ssh: accept this host key fingerprint (SHA256:...) on first contact.")] = None,
    enroll: Annotated[bool, typer.Option("--enroll/--no-enroll",
                                         help="Enroll the device now (makes its key).")] = True,
    replace: Annotated[bool, typer.Option(
        "--replace", help="The agent is already registered under another name (same key): "
                          "move that record (history, reports, groups) to NAME and URI; "
                          "the old name goes.")] = False,
    via: Annotated[str | None, typer.Option(
        "--via", help="The farm host that reaches the device (its `fleet worker --host "
                      "NAME`); default: this controller.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a device and enroll it (its agent makes a P-256 key; we keep the public part).

    An agent whose key is already registered under another name is the same physical
    device: refused (exit 6) unless --replace moves the old record to NAME.

    Examples:

    \b
      fleet device add 'local://pixel7?root=/tmp/pixel7' --name pixel7 -g phones -t site=lab1
      fleet device add ssh://pi@10.0.0.7:22 --name pi4 --accept-host-key SHA256:...
      fleet device add adb://R58M12345 --name s21 -g phones
      fleet device add pull://board7 -g field     # prints its one-time enrollment token
    """
    parsed = parse_uri(uri)  # refuse malformed or unknown URIs before anything else
    if parsed.scheme == "pull":
        _add_pull(uri, name or parsed.host, group, _parse_tags(tag), as_json)
        return
    if name is None:
        raise errors.UsageError("--name is required (except for pull://NAME)")
    if via is not None:
        from fleet.worker.settings import check_host_name

        check_host_name(via)
    tags = _parse_tags(tag)
    reg = Registry.open(state().home)
    for g in group:
        reg.get_group(g)  # unknown group: NotFoundError, nothing written
    cmd = shlex.split(agent_cmd) if agent_cmd else None
    dev = reg.add_device(name, uri, groups=group, tags=tags, agent_root=agent_root,
                         agent_cmd=cmd)
    if via is not None:
        dev = reg.update_device(name, via=via)
    replaced = None
    if enroll:
        try:
            enroll_device(reg, name, accept_host_key=accept_host_key)
            dev = reg.get_device(name)
            old = _same_agent(reg, dev.fingerprint, name) if dev.fingerprint else None
            if old is not None and not replace:
                raise errors.DuplicateError(
                    f"{uri} is the agent already registered as {old.name!r} (same key "
                    f"{dev.fingerprint}); pass --replace to move {old.name!r} to the name "
                    f"{name!r} and this URI", name=name, existing=old.name,
                    fingerprint=dev.fingerprint)
        except BaseException:
            reg.remove_device(name)  # leave the registry as it was
            raise
        if old is not None:
            dev = _move(reg, old, name, group, tags)
            replaced = old.name
    row = device_row(dev, reg.groups_of(name)) | {"replaced": replaced}
    emit(row, as_json=as_json,
         render=lambda c: c.print(f"device {dev.name} added ({dev.platform}, {dev.status}"
                                  f"{', ' + dev.fingerprint if dev.fingerprint else ''})"
                                  + (f"; it was registered as {replaced}, now moved here"
                                     if replaced else ""), markup=False))


def _add_pull(uri: str, name: str, groups: list[str], tags: dict[str, str],
              as_json: bool) -> None:
    """A ``pull://`` device: registered with a one-time enrollment token (printed once;
    only its hash is kept) that its agent redeems at ``fleet server``."""
    from fleet.server.tokens import issue_token

    reg = Registry.open(state().home)
    for g in groups:
        reg.get_group(g)  # unknown group: NotFoundError, nothing written
    dev = reg.add_device(name, uri, groups=groups, tags=tags)
    token, expires = issue_token(reg, dev)
    row = device_row(dev, reg.groups_of(name)) | {"token": token,
                                                   "token_expires": expires}
    emit(row, as_json=as_json, render=lambda c: c.print(
        f"device {name} added (pull); enrollment token, valid until "
        f"{expires.isoformat(timespec='seconds')}, shown once:\n{token}\n"
        f"on the device: fleet-agent pull --server URL --ca ca.pem --token {token}",
        markup=False, highlight=False))


@device_app.command("enroll")
def enroll_cmd(name: str, accept_host_key: Annotated[str | None, typer.Option()] = None,
               as_json: JsonOpt = False) -> None:
    """(Re-)enroll a registered device.

    Examples:

    \b
      fleet device enroll pi4 --accept-host-key SHA256:...
      fleet device enroll board7      # a pull device: a new one-time enrollment token
    """
    reg = Registry.open(state().home)
    dev = reg.get_device(name)
    if dev.uri.startswith("pull://"):
        from fleet.server.tokens import issue_token

        token, expires = issue_token(reg, dev)
        emit({"name": name, "token": token, "token_expires": expires}, as_json=as_json,
             render=lambda c: c.print(f"{name}: new enrollment token, valid until "
                                      f"{expires.isoformat(timespec='seconds')}:\n{token}",
                                      markup=False, highlight=False))
        return
    doc = enroll_device(reg, name, accept_host_key=accept_host_key)
    emit({"name": name, "fingerprint": doc["fingerprint"]}, as_json=as_json,
         render=lambda c: c.print(f"{name} enrolled: {doc['fingerprint']}", markup=False))


@device_app.command("list")
def list_(
    group: GroupOpt = [],  # noqa: B006 (typer reads the default)
    device: DeviceOpt = [],  # noqa: B006
    selector: SelectorOpt = [],  # noqa: B006
    as_json: JsonOpt = False,
    ndjson: Annotated[bool, typer.Option("--ndjson", help="One JSON object per line.")] = False,
) -> None:
    """Every device, or those the targets select, with its status from the last contact
    and its tags (a fixed number of queries, whatever the fleet size).

    Examples:

    \b
      fleet device list -g phones
      fleet device list -l hw.arch=x86_64,site=lab1 -o wide
      fleet device list -o tsv | cut -f1,4
    """
    targets = Targets.parse(group, device, selector)
    reg = Registry.open(state().home)
    if ndjson:  # streamed as the rows come: the database writes each JSON object
        from fleet.registry.listing import device_lines
        from fleet.registry.selectors import criteria, parse_selectors

        where = criteria(reg, groups=targets.groups, devices=targets.devices,
                         terms=parse_selectors(targets.selectors))
        write = sys.stdout.write
        for line in device_lines(reg, where=where):
            write(line + "\n")
        sys.stdout.flush()
        return
    devs = targets.resolve(reg, required=False)
    groups = reg.groups_by_device()
    rows = [device_row(d, groups.get(d.name, [])) for d in devs]

    def render(c: Console) -> None:
        c.print(table(None, ["name", "platform", "status", "groups", "tags", "uri", "via",
                             "last seen"],
                      [(r["name"], r["platform"], "revoked" if r["revoked"]
                        else status_text(r["status"], r["last_error"]),
                        ",".join(r["groups"]) or "-", tags_text(r["tags"]), r["uri"],
                        r["via"] or "-", _text(r["last_seen"])) for r in rows]))

    emit(rows, as_json=as_json, render=render)


@device_app.command("show")
def show(name: str, as_json: JsonOpt = False) -> None:
    """One device: its record, tags, groups, and the facts selectors match (hardware from
    its last probe, models active as last reported).

    Examples:

    \b
      fleet device show pixel7
      fleet device show pixel7 -o yaml
    """
    reg = Registry.open(state().home)
    d = reg.get_device(name)
    row = device_row(d, reg.groups_of(name))
    detail = d.facts or {}
    row |= {"public_key": d.public_key, "agent_cmd": d.agent_cmd, "via": getattr(d, "via", None),
            "created_at": d.created_at, "installed": detail.get("_installed") or {},
            "probed_at": detail.get("_probed_at"), "status_at": detail.get("_status_at"),
            "disk_free_bytes": detail.get("_disk_free")}

    def render(c: Console) -> None:
        shown = [("name", row["name"]), ("platform", row["platform"]), ("uri", row["uri"]),
                 ("status", status_text(row["status"], row["last_error"])),
                 ("last seen", row["last_seen"]), ("groups", row["groups"]),
                 ("tags", tags_text(row["tags"])), ("revoked", row["revoked_at"] or False),
                 ("fingerprint", row["fingerprint"]), ("root version", row["root_version"]),
                 ("agent version", row["agent_version"]), ("agent root", row["agent_root"]),
                 ("agent command", shlex.join(row["agent_cmd"]) if row["agent_cmd"] else None),
                 ("via", row["via"]), ("id", row["id"]), ("added", row["created_at"])]
        width = max(len(k) for k, _ in shown)
        for k, v in shown:
            c.print(f"{k:<{width}}  {_text(v)}", markup=False, highlight=False)
        models = [(n, _text(m.get("active")), _text(m.get("previous")),
                   _text(m.get("versions"))) for n, m in sorted(row["installed"].items())]
        if models:
            c.print(table(f"models (as last reported, {_text(row['status_at'])})",
                          ["model", "active", "previous", "in store"], models))
        facts = row["facts"]
        if facts:
            c.print(table(f"facts for selectors (probed {_text(row['probed_at'])})",
                          ["key", "value"], [(k, _text(v)) for k, v in facts.items()]))
        else:
            c.print("facts: - (never probed: `fleet device probe` or a deploy records them)",
                    markup=False, highlight=False)

    emit(row, as_json=as_json, render=render)


@device_app.command("tag")
def tag_cmd(
    name: str,
    changes: Annotated[list[str], typer.Argument(
        help="KEY=VALUE sets a tag, KEY- removes it (several at once).")],
    as_json: JsonOpt = False,
) -> None:
    """Set and remove a device's tags (what `-l KEY=VALUE` selects): `fleet device tag pi4
    site=lab rack=3 old-`.

    Examples:

    \b
      fleet device tag pi4 site=lab1 rack=3
      fleet device tag pi4 rack-
    """
    sets = _parse_tags([c for c in changes if not c.endswith("-") or "=" in c])
    drops = [c[:-1] for c in changes if c.endswith("-") and "=" not in c]
    for k in drops:
        if not k:
            raise errors.UsageError("'-' alone: write KEY- to remove tag KEY")
    reg = Registry.open(state().home)
    dev = reg.get_device(name)
    tags = {k: v for k, v in (dev.tags or {}).items() if k not in drops} | sets
    reg.update_device(name, tags=tags)
    gone = [k for k in drops if k in (dev.tags or {})]
    emit({"name": name, "tags": tags, "set": sets, "removed": gone}, as_json=as_json,
         render=lambda c: c.print(f"{name}: {tags_text(tags)}", markup=False,
                                  highlight=False))


@device_app.command("probe")
def probe_cmd(
    group: GroupOpt = [],  # noqa: B006
    device: DeviceOpt = [],  # noqa: B006
    selector: SelectorOpt = [],  # noqa: B006
    workers: Annotated[int, typer.Option(min=1, help="Devices in parallel.")] = 8,
    as_json: JsonOpt = False,
) -> None:
    """Run the capability probe on the targets and record it: their hw.* facts (what
    `-l hw.arch=arm64` matches) come from the latest probe.

    Examples:

    \b
      fleet device probe -g boards
      fleet device probe -d pi4 --json
    """
    from fleet.connect import device_session
    from fleet.registry import history as hist
    from fleet.registry.facts import hw_facts
    from fleet.rollout.fanout import TaskContext, call_each

    targets = Targets.parse(group, device, selector)
    home = state().home
    reg = Registry.open(home)
    devs = targets.resolve(reg)

    def task(dev: Device, ctx: TaskContext) -> dict[str, Any]:
        with device_session(home, dev, ctx) as agent:
            doc = agent.probe(timeout=ctx.deadline.remaining(60))
        hist.add_snapshot(reg, dev, doc)
        reg.touch_device(dev.name)
        return hw_facts(doc)

    result = call_each(devs, task, workers=workers, deadline_s=180.0, retries=1)
    for o in result.failed:
        reg.record_contact(o.device, o.error or errors.FleetError(o.status.value))
    rows: list[dict[str, Any]] = [{"device": o.device, "status": o.status.label,
                                   "facts": o.result or {},
             "error": o.error.to_dict() if o.error else None} for o in result]
    emit(rows, as_json=as_json, render=lambda c: c.print(table(
        "probe", ["device", "status", "arch", "cores", "ram GiB", "fp16", "dotprod", "gpu",
                  "error"],
        [(r["device"], r["status"], _text(r["facts"].get("hw.arch")),
          _text(r["facts"].get("hw.cores")), _text(r["facts"].get("hw.ram_gb")),
          _text(r["facts"].get("hw.fp16")), _text(r["facts"].get("hw.dotprod")),
          ",".join(api for api in ("opencl", "vulkan", "cuda", "metal")
                   if r["facts"].get(f"hw.gpu.{api}")) or "-",
          (r["error"] or {}).get("message", "")) for r in rows])))
    result.raise_for_failures("probe")


@device_app.command("rm")
def rm(name: str,
       yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
       as_json: JsonOpt = False) -> None:
    """Remove a device from the registry with its history (reports, deployment steps).
    Asks first on a terminal; elsewhere needs --yes. Nothing is sent to the device.

    Examples:

    \b
      fleet device rm pixel7 --yes
    """
    reg = Registry.open(state().home)
    dev = reg.get_device(name)
    confirm(f"remove device {name} ({dev.uri}) and its history from the registry", yes)
    reg.remove_device(name)
    emit({"removed": name}, as_json=as_json, render=lambda c: c.print(f"device {name} removed",
                                                                      markup=False))
    err.print(f"the device keeps its store; nothing was sent to {name}", markup=False,
              style="dim")


@device_app.command("revoke")
def revoke(name: str, yes: Annotated[bool, typer.Option("--yes", "-y")] = False,
           as_json: JsonOpt = False) -> None:
    """Revoke a device (lost, stolen, retired): no package is made for its key again.
    Nothing is sent to it; `fleet device list` shows it revoked.

    Examples:

    \b
      fleet device revoke pixel7 --yes
    """
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
    revocation: the new key is trusted.

    Examples:

    \b
      fleet device rekey pi4 --yes
    """
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
