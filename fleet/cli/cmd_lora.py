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
from fleet.cli._targets import DeviceOpt, GroupOpt, SelectorOpt, Targets
from fleet.cli.app import app
from fleet.core import errors
from fleet.registry import Registry

if TYPE_CHECKING:
    from fleet.rollout.fanout import FleetResult

lora_app = typer.Typer(help="LoRA adapters: package, push, hot-swap, roll back.\n\n"
                            "Examples:\n\n\b\n"
                            "  fleet lora serve llm -g phones\n"
                            "  fleet lora push a.fpkg -g phones --swap",
                       no_args_is_help=True)
app.add_typer(lora_app, name="lora")
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


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


def _run(verb: str, args: dict[str, Any], targets: Targets, *,
         pack: Path | None = None, as_json: bool, title: str) -> None:
    from fleet.rollout.lora_push import lora_fanout

    home = state().home
    reg = Registry.open(home)
    try:
        devs = targets.resolve(reg)
        from fleet.cli._progress import fanout_progress  # the phase lines of every fan-out

        with fanout_progress(len(devs)) as prog:
            result = lora_fanout(home, reg, devs, verb, args, pack=pack,
                                 on_state=prog.on_state)
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
    group: GroupOpt = [],  # noqa: B006 (typer reads the default)
    device: DeviceOpt = [],  # noqa: B006
    selector: SelectorOpt = [],  # noqa: B006
    for_: Annotated[list[str], typer.Option(
        "--for", hidden=True, help="Deprecated: a group or device (use -g/-d).")] = [],  # noqa: B006
    as_json: JsonOpt = False,
) -> None:
    """Bind LORA to its base export, sign and encrypt it for the target devices (default:
    the base package's recipients).

    Examples:

    \b
      fleet lora package lora.mnn --base llm@1 --reference ref.json -o a.fpkg
    """
    from fleet.rollout.lora_push import build_lora_pack

    tg = Targets.parse(group, device, selector, either=for_)
    home = state().home
    reg = Registry.open(home)
    try:
        devices = tg.resolve(reg) if tg.named else None
        data = build_lora_pack(home, reg, lora, base=base, reference=reference, out=out,
                               name=name, version=version, devices=devices)
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
    selector: SelectorOpt = [],  # noqa: B006
    swap: Annotated[bool, typer.Option("--swap", help="Serve it right after staging.")
                    ] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Check the pack (signature, recipients, base) against what each "
                          "target last reported and print the plan; send nothing. Exit 17 "
                          "when the plan refuses a device.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Copy PACK to the devices and stage it (verified, kept encrypted). For pull
    devices (``pull://``) it goes into their desired state and the command returns.

    Examples:

    \b
      fleet lora push a.fpkg -g phones --swap
    """
    tg = Targets.parse(group, device, selector)
    if not pack.is_file():
        raise errors.NotFoundError(f"no pack at {pack}", path=str(pack))
    if dry_run:
        from fleet.cli.cmd_deploy import emit_plan
        from fleet.rollout.dryrun import preview_lora_push

        home = state().home
        reg = Registry.open(home)
        try:
            plan = preview_lora_push(home, pack, tg.resolve(reg))
        finally:
            reg.close()
        emit_plan(plan.to_dict() | {"targets": tg.to_dict()}, as_json=as_json)
        return
    if _pull_targets(pack, tg, swap=swap, as_json=as_json):
        return
    _run("lora add", {"swap": swap}, tg, pack=pack, as_json=as_json, title="lora push")


def _pull_targets(pack: Path, tg: Targets, *, swap: bool, as_json: bool) -> bool:
    """Pull devices among the targets: the pack goes into their desired state
    (:func:`fleet.cli._pull_deploy.lora_push_pull`); True when that was done."""
    from fleet.rollout.pull import is_pull

    home = state().home
    reg = Registry.open(home)
    try:
        devs = tg.resolve(reg)
        if not any(is_pull(d) for d in devs):
            return False
        from fleet.cli._pull_deploy import lora_push_pull

        lora_push_pull(home, reg, pack, devs, tg, swap=swap, as_json=as_json)
    finally:
        reg.close()
    return True


@lora_app.command("swap")
def swap(
    name: Annotated[str, typer.Argument(help="Adapter NAME or NAME@VERSION; 'base' for none.")],
    group: GroupOpt = [],  # noqa: B006
    device: DeviceOpt = [],  # noqa: B006
    selector: SelectorOpt = [],  # noqa: B006
    as_json: JsonOpt = False,
) -> None:
    """Hot-swap the adapter the devices serve (checked on each device first).

    Examples:

    \b
      fleet lora swap adapter_a -g phones
      fleet lora swap base -d pixel7
    """
    from fleet.rollout.lora_push import parse_ref

    tg = Targets.parse(group, device, selector)
    args: dict[str, Any]
    if name == "base":
        args = {"name": None}
    else:
        n, v = parse_ref(name)
        args = {"name": n, "version": v}
    _run("lora swap", args, tg, as_json=as_json, title="lora swap")


@lora_app.command("serve")
def serve(
    base: Annotated[str, typer.Argument(help="The deployed base model's name.")],
    group: GroupOpt = [],  # noqa: B006
    device: DeviceOpt = [],  # noqa: B006
    selector: SelectorOpt = [],  # noqa: B006
    threads: Annotated[int | None, typer.Option(min=1, help="Threads for the daemon.")
                       ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Make sure each device runs its serving daemon for BASE (started if not running).

    Examples:

    \b
      fleet lora serve llm -g phones --threads 4
    """
    tg = Targets.parse(group, device, selector)
    args: dict[str, Any] = {"model": base}
    if threads:
        args["thread_num"] = threads
    _run("lora serve", args, tg, as_json=as_json, title="lora serve")


@lora_app.command("check")
def check(
    reference: Annotated[Path, typer.Argument(help="Reference JSON: prompts and the greedy "
                                                   "tokens expected for them.")],
    group: GroupOpt = [],  # noqa: B006
    device: DeviceOpt = [],  # noqa: B006
    selector: SelectorOpt = [],  # noqa: B006
    as_json: JsonOpt = False,
) -> None:
    """Run a reference's prompts on the devices' daemons; say which outputs match it.

    Examples:

    \b
      fleet lora check adapter_a.ref.json -g phones
    """
    import json

    from fleet.rollout.lora_push import lora_fanout

    tg = Targets.parse(group, device, selector)
    ref = json.loads(reference.read_text())
    home = state().home
    reg = Registry.open(home)
    try:
        result = lora_fanout(home, reg, tg.resolve(reg), "lora generate",
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
             selector: SelectorOpt = [],  # noqa: B006
             as_json: JsonOpt = False) -> None:
    """Serve again the adapter each device served before its last swap.

    Examples:

    \b
      fleet lora rollback -g phones
    """
    _run("lora swap", {"rollback": True}, Targets.parse(group, device, selector),
         as_json=as_json, title="lora rollback")


@lora_app.command("remove")
def remove(name: str, group: GroupOpt = [], device: DeviceOpt = [],  # noqa: B006
           selector: SelectorOpt = [],  # noqa: B006
           as_json: JsonOpt = False) -> None:
    """Stop serving adapter NAME (the base serves alone).

    Examples:

    \b
      fleet lora remove adapter_a -d pixel7
    """
    _run("lora remove", {"name": name}, Targets.parse(group, device, selector),
         as_json=as_json, title="lora remove")


@lora_app.command("list")
def list_(
    group: GroupOpt = [],  # noqa: B006
    device: DeviceOpt = [],  # noqa: B006
    selector: SelectorOpt = [],  # noqa: B006
    live: Annotated[bool, typer.Option("--live", help="Ask the devices, not the registry.")
                    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Which adapter each device serves (registry), or what is staged there (--live).

    Examples:

    \b
      fleet lora list -g phones
      fleet lora list -d pixel7 --live
    """
    from fleet.rollout.lora_push import lora_state

    tg = Targets.parse(group, device, selector)
    if live:
        _run("lora list", {}, tg, as_json=as_json, title="lora list")
        return
    home = state().home
    reg = Registry.open(home)
    try:
        devs = tg.resolve(reg, required=False)
        rows: list[dict[str, Any]] = [{"device": d.name, "bases": lora_state(reg, d)}
                                      for d in devs]
    finally:
        reg.close()
    flat = [(r["device"], base, s["adapter"] or "(base only)", s["previous"], s["updated_at"])
            for r in rows for base, s in dict(r["bases"]).items()]
    emit(rows, as_json=as_json, render=lambda c: c.print(
        table("LoRA adapters served", ["device", "base", "adapter", "previous", "updated"],
              flat)))
