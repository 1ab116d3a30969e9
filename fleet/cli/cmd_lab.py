"""``fleet lab up|down|status|fault``: the virtual device lab on this machine."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from fleet.cli._ctx import state
from fleet.cli._output import emit, err, table
from fleet.cli.app import app
from fleet.core import errors
from fleet.home import FleetHome
from fleet.lab import installed_kinds, kind_module
from fleet.lab.base import register_devices, unregister_devices
from fleet.registry import Registry

lab_app = typer.Typer(help="The virtual device lab: IoT boards (sshd in network namespaces), "
                           "emulated Android and iOS devices.", no_args_is_help=True)
app.add_typer(lab_app, name="lab")
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


@lab_app.command("up")
def up(
    iot: Annotated[int, typer.Option("--iot", help="IoT boards (root: netns + sshd).")] = 0,
    android: Annotated[int, typer.Option("--android", help="Emulated Android phones.")] = 0,
    ios: Annotated[int, typer.Option("--ios", help="Emulated iPhones.")] = 0,
    store_mb: Annotated[int, typer.Option(
        "--store-mb", help="Size of each IoT board's agent store (tmpfs), MiB.")] = 192,
    enroll: Annotated[bool, typer.Option(
        "--enroll/--no-enroll", help="Enroll the new devices (their agents make keys).")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Start lab devices, register them (groups lab-iot, lab-android, lab-ios), enroll."""
    if iot == android == ios == 0:
        raise errors.UsageError("nothing to start: give --iot N, --android N and/or --ios N")
    home = state().home
    made: list[dict[str, Any]] = []
    for kind, count in (("iot", iot), ("android", android), ("ios", ios)):
        if count <= 0:
            continue
        module = kind_module(kind)
        err.print(f"starting {count} {kind} lab device(s)...")
        kwargs = {"store_mb": store_mb} if kind == "iot" else {}
        devices = module.up(home, count, **kwargs)
        register_devices(home, devices)
        made.extend(d.to_dict() for d in devices)
    if enroll:
        outcome = _enroll_all(home, [d["name"] for d in made])
        for d in made:
            d["enrolled"] = outcome[d["name"]]

    def render(c: Console) -> None:
        c.print(table("lab devices", ["name", "platform", "group", "enrolled", "uri"],
                      [(d["name"], d["platform"], d["group"], d.get("enrolled", "-"),
                        d["uri"]) for d in made]))

    emit(made, as_json=as_json, render=render)


def _enroll_all(home: FleetHome, names: list[str]) -> dict[str, str]:
    """Enroll devices that are not enrolled yet, 8 at a time; one failure hides nothing."""
    from fleet.enrollment import enroll_many

    reg = Registry.open(home)
    try:
        devs = [reg.get_device(n) for n in names]
        done = {d.name: d.fingerprint or "yes" for d in devs if d.public_key}
        result = enroll_many(home, reg, [d for d in devs if not d.public_key])
        for out in result:
            if out.result is not None:
                done[out.device] = out.result.fingerprint
            else:
                msg = out.error.message if out.error else out.status.value
                err.print(f"[yellow]{out.device}: enrollment failed:[/] {escape(msg)}",
                          highlight=False)
                done[out.device] = f"failed: {out.error.code if out.error else out.status.value}"
        return {n: done[n] for n in names}
    finally:
        reg.close()


@lab_app.command("down")
def down(as_json: JsonOpt = False) -> None:
    """Remove everything the lab made, by name (namespaces, veths, sshd, mounts, entries)."""
    home = state().home
    removed: dict[str, list[str]] = {}
    for kind in installed_kinds():
        removed[kind] = list(kind_module(kind).down(home))
        unregister_devices(home, removed[kind])
    emit(removed, as_json=as_json,
         render=lambda c: c.print("\n".join(f"{k}: removed {', '.join(v) or 'nothing'}"
                                            for k, v in removed.items())))


@lab_app.command("status")
def status(as_json: JsonOpt = False) -> None:
    home = state().home
    rows: list[dict[str, Any]] = []
    for kind in installed_kinds():
        for row in kind_module(kind).status(home):
            row.setdefault("kind", kind)
            rows.append(row)

    def render(c: Console) -> None:
        if not rows:
            c.print("the lab is empty (fleet lab up --iot N)")
            return
        c.print(table("lab", ["name", "kind", "address", "link", "sshd", "store free",
                              "faults"],
                      [(r["name"], r["kind"], r.get("address", r.get("uri", "")),
                        r.get("link", ""), r.get("sshd", r.get("state", "")),
                        _mib(r.get("store", {}).get("free")) if isinstance(r.get("store"), dict)
                        else "", ",".join(f"{k}={v}" for k, v in r.get("faults", {}).items()))
                       for r in rows]))

    emit(rows, as_json=as_json, render=render)


def _mib(n: int | None) -> str:
    return "" if n is None else f"{n / (1 << 20):.1f} MiB"


@lab_app.command("fault")
def fault(
    device: str,
    bandwidth: Annotated[str | None, typer.Option(help="Rate limit, e.g. 2mbit.")] = None,
    loss: Annotated[int | None, typer.Option(help="Drop this percentage of packets.")] = None,
    down_: Annotated[bool, typer.Option("--down", help="Take the board's link down.")] = False,
    up_: Annotated[bool, typer.Option("--up", help="Bring the link back up.")] = False,
    clear: Annotated[bool, typer.Option("--clear", help="Remove every fault.")] = False,
    stop_sshd: Annotated[bool, typer.Option("--stop-sshd", help="Kill the board's sshd.")
                         ] = False,
    start_sshd: Annotated[bool, typer.Option("--start-sshd", help="Restart its sshd.")
                          ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Real link faults on an IoT lab board (tc tbf, nftables random drop, link down)."""
    from fleet.lab.faults import apply_fault

    if not any((bandwidth, loss is not None, down_, up_, clear, stop_sshd, start_sshd)):
        raise errors.UsageError("no fault given (--bandwidth, --loss, --down, --up, --clear, "
                                "--stop-sshd, --start-sshd)")
    result = apply_fault(state().home, device, bandwidth=bandwidth, loss=loss, down=down_,
                         up=up_, clear=clear, stop_sshd=stop_sshd, start_sshd=start_sshd)
    emit(result, as_json=as_json,
         render=lambda c: c.print(f"{device}: link {result['link']}, faults "
                                  f"{result['faults'] or 'none'}"))
