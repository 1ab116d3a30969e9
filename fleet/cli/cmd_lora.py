"""``fleet lora package|push|swap|rollback|remove|list``: LoRA delta packs on serving devices.

A pack binds its base export (digests, quantization) and carries reference outputs; the
device's serve daemon checks both before the adapter serves (``docs/lora.md``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from fleet.cli._ctx import state
from fleet.cli._output import emit, err, table
from fleet.cli.app import app
from fleet.core import errors
from fleet.registry import Device, Registry

if TYPE_CHECKING:
    from fleet.rollout.fanout import FleetResult

lora_app = typer.Typer(help="LoRA adapters: package, push, hot-swap, roll back.",
                       no_args_is_help=True)
app.add_typer(lora_app, name="lora")
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
GroupOpt = Annotated[list[str], typer.Option("--group", "-g", help="Target group (repeat).")]
DeviceOpt = Annotated[list[str], typer.Option("--device", "-d", help="Target device (repeat).")]


def _targets(reg: Registry, group: list[str], device: list[str]) -> list[Device]:
    from fleet.cli.cmd_deploy import targets

    return targets(reg, group, device)


def _render_rows(title: str) -> Any:
    def render(c: Console, rows: list[dict[str, Any]]) -> None:
        c.print(table(title, ["device", "status", "adapter", "previous", "swap ms", "error"],
                      [(r["device"], r["status"], r.get("adapter"), r.get("previous"),
                        r.get("swap_ms"), (r.get("error") or {}).get("message"))
                       for r in rows]))
    return render


def _rows(result: FleetResult[dict[str, Any]]) -> list[dict[str, Any]]:
    """A lora fan-out's outcomes as table/JSON rows (``status``: ok or failed)."""
    return [{"device": o.device, "status": o.status.label, **(o.result or {}),
             "error": o.error.to_dict() if o.error else None} for o in result]


def _run(verb: str, args: dict[str, Any], group: list[str], device: list[str], *,
         pack: Path | None = None, as_json: bool, title: str) -> None:
    from fleet.rollout.lora_push import lora_fanout

    home = state().home
    reg = Registry.open(home)
    try:
        devs = _targets(reg, group, device)
        result = lora_fanout(home, reg, devs, verb, args, pack=pack,
                             on_state=lambda d, s: err.print(f"{d}: {s}", highlight=False,
                                                             markup=False))
    finally:
        reg.close()
    rows = _rows(result)
    render = _render_rows(title)
    emit(rows, as_json=as_json, render=lambda c: render(c, rows))
    result.raise_for_failures(title)


@lora_app.command("package")
def package(
    lora: Annotated[Path, typer.Argument(help="The split LoRA export (lora.mnn).")],
    base: Annotated[str, typer.Option("--base", help="Base package NAME@VERSION.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Pack file to write.")],
    reference: Annotated[Path | None, typer.Option(
        "--reference", help="Reference outputs JSON (prompts, expected greedy tokens).")
                         ] = None,
    name: Annotated[str | None, typer.Option(help="Adapter name (default: file stem).")
                    ] = None,
    version: Annotated[int | None, typer.Option(help="Version (default: registry's + 1).")
                       ] = None,
    targets: Annotated[list[str] | None, typer.Option(
        "--for", help="Group or device (default: the base package's recipients).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Bind LORA to its base export, sign and encrypt it for the devices."""
    from fleet.rollout.lora_push import build_lora_pack

    home = state().home
    reg = Registry.open(home)
    try:
        data = build_lora_pack(home, reg, lora, base=base, reference=reference, out=out,
                               name=name, version=version, targets=targets or None)
    finally:
        reg.close()
    if not data["reference"]:
        err.print("[yellow]warning:[/] no --reference: every device will refuse this pack")
    emit(data, as_json=as_json, render=lambda c: c.print(
        f"{out}: LoRA {data['name']} v{data['version']} bound to {data['base']['name']} "
        f"v{data['base']['version']} for {len(data['recipients'])} devices"))


@lora_app.command("push")
def push(
    pack: Annotated[Path, typer.Argument(help="A pack from `fleet lora package`.")],
    group: GroupOpt = [],  # noqa: B006 (typer reads the default)
    device: DeviceOpt = [],  # noqa: B006
    swap: Annotated[bool, typer.Option("--swap", help="Serve it right after staging.")
                    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Copy PACK to the devices and stage it (verified, kept encrypted)."""
    if not pack.is_file():
        raise errors.NotFoundError(f"no pack at {pack}", path=str(pack))
    _run("lora add", {"swap": swap}, group, device, pack=pack, as_json=as_json,
         title="lora push")


@lora_app.command("swap")
def swap(
    name: Annotated[str, typer.Argument(help="Adapter NAME or NAME@VERSION; 'base' for none.")],
    group: GroupOpt = [],  # noqa: B006
    device: DeviceOpt = [],  # noqa: B006
    as_json: JsonOpt = False,
) -> None:
    """Hot-swap the adapter the devices serve (checked on each device first)."""
    from fleet.rollout.lora_push import parse_ref

    args: dict[str, Any]
    if name == "base":
        args = {"name": None}
    else:
        n, v = parse_ref(name)
        args = {"name": n, "version": v}
    _run("lora swap", args, group, device, as_json=as_json, title="lora swap")


@lora_app.command("serve")
def serve(
    base: Annotated[str, typer.Argument(help="The deployed base model's name.")],
    group: GroupOpt = [],  # noqa: B006
    device: DeviceOpt = [],  # noqa: B006
    threads: Annotated[int | None, typer.Option(help="Threads for the daemon.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Make sure each device runs its serving daemon for BASE (started if not running)."""
    args: dict[str, Any] = {"model": base}
    if threads:
        args["thread_num"] = threads
    _run("lora serve", args, group, device, as_json=as_json, title="lora serve")


@lora_app.command("check")
def check(
    reference: Annotated[Path, typer.Argument(help="Reference JSON: prompts and the greedy "
                                                   "tokens expected for them.")],
    group: GroupOpt = [],  # noqa: B006
    device: DeviceOpt = [],  # noqa: B006
    as_json: JsonOpt = False,
) -> None:
    """Run a reference's prompts on the devices' daemons; say which outputs match it."""
    import json

    from fleet.rollout.lora_push import lora_fanout

    ref = json.loads(reference.read_text())
    home = state().home
    reg = Registry.open(home)
    try:
        result = lora_fanout(home, reg, _targets(reg, group, device), "lora generate",
                             {"prompts": ref["prompts"],
                              "max_new_tokens": ref["max_new_tokens"]})
    finally:
        reg.close()
    rows = _rows(result)
    for r in rows:
        outs = r.get("outputs") or []
        r["matches"] = sum(1 for got, want in zip(outs, ref["expected"], strict=False)
                           if got == want)
        r["prompts"] = len(ref["expected"])
    emit(rows, as_json=as_json, render=lambda c: c.print(table(
        f"outputs vs {reference.name}", ["device", "adapter", "matching prompts", "error"],
        [(r["device"], r.get("adapter") or "-", f"{r['matches']}/{r['prompts']}",
          (r.get("error") or {}).get("message", "")) for r in rows])))
    result.raise_for_failures("lora check")
    if any(r["matches"] != r["prompts"] for r in rows):
        raise typer.Exit(20)  # outputs differ from the reference


@lora_app.command("rollback")
def rollback(group: GroupOpt = [], device: DeviceOpt = [],  # noqa: B006
             as_json: JsonOpt = False) -> None:
    """Serve again the adapter each device served before its last swap."""
    _run("lora swap", {"rollback": True}, group, device, as_json=as_json,
         title="lora rollback")


@lora_app.command("remove")
def remove(name: str, group: GroupOpt = [], device: DeviceOpt = [],  # noqa: B006
           as_json: JsonOpt = False) -> None:
    """Stop serving adapter NAME (the base serves alone)."""
    _run("lora remove", {"name": name}, group, device, as_json=as_json, title="lora remove")


@lora_app.command("list")
def list_(
    group: GroupOpt = [],  # noqa: B006
    device: DeviceOpt = [],  # noqa: B006
    live: Annotated[bool, typer.Option("--live", help="Ask the devices, not the registry.")
                    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Which adapter each device serves (registry), or what is staged there (--live)."""
    from fleet.rollout.lora_push import lora_state

    if live:
        _run("lora list", {}, group, device, as_json=as_json, title="lora list")
        return
    home = state().home
    reg = Registry.open(home)
    try:
        devs = (_targets(reg, group, device) if group or device else reg.list_devices())
        rows: list[dict[str, Any]] = [{"device": d.name, "bases": lora_state(reg, d)}
                                      for d in devs]
    finally:
        reg.close()
    flat = [(r["device"], base, s["adapter"] or "(base only)", s["previous"], s["updated_at"])
            for r in rows for base, s in dict(r["bases"]).items()]
    emit(rows, as_json=as_json, render=lambda c: c.print(
        table("LoRA adapters served", ["device", "base", "adapter", "previous", "updated"],
              flat)))
