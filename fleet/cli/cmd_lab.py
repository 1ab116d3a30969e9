"""``fleet lab up|down|status|fault``: the virtual device lab on this machine."""

from __future__ import annotations

from pathlib import Path
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
                           "emulated Android and iOS devices.\n\n"
                           "Examples:\n\n\b\n"
                           "  fleet lab up --iot 2 --android 1\n"
                           "  fleet lab down", no_args_is_help=True)
app.add_typer(lab_app, name="lab")
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


@lab_app.command("up")
def up(
    iot: Annotated[int, typer.Option("--iot", help="IoT boards (root: netns + sshd).")] = 0,
    android: Annotated[int, typer.Option("--android", help="Emulated Android phones.")] = 0,
    ios: Annotated[int, typer.Option("--ios", help="Emulated iPhones.")] = 0,
    store_mb: Annotated[int, typer.Option(
        "--store-mb", help="Size of each IoT board's agent store (tmpfs), MiB.")] = 192,
    arch: Annotated[str, typer.Option(
        "--arch", help="IoT boards' architecture: the host's (x86_64) or arm64 (an arm64 "
                       "Debian userland in qemu-user; emulated CPU, timings meaningless). "
                       "A later `lab up` adds boards, so one call per CPU model.")] = "host",
    cpu: Annotated[str | None, typer.Option(
        "--cpu", help="With --arch arm64: qemu's CPU model for these boards (max, "
                      "cortex-a53, cortex-a76, ...; properties allowed: max,pauth=off). "
                      "Default max.")] = None,
    cache: Annotated[Path | None, typer.Option(
        "--cache", help="With --arch arm64: where the arm64 root is built and kept "
                        "(default $FLEET_LAB_CACHE or /var/cache/fleet-lab).")] = None,
    enroll: Annotated[bool, typer.Option(
        "--enroll/--no-enroll", help="Enroll the new devices (their agents make keys).")] = True,
    farm: Annotated[int, typer.Option(
        "--farm", help="Put the devices behind N farm hosts (network namespaces, each with "
                       "a supervised `fleet worker`, its own adb server and usbmuxd "
                       "socket), with Redis and PostgreSQL started and written into "
                       "config.toml.")] = 0,
    farm_deadline: Annotated[float, typer.Option(
        "--farm-deadline", help="With --farm: the longest per-device deadline of a farm "
                                "task, s (a dead worker's task is redelivered after it).")
                             ] = 120.0,
    as_json: JsonOpt = False,
) -> None:
    """Start lab devices, register them (groups lab-iot, lab-android, lab-ios), enroll.

    Examples:

    \b
      fleet lab up --iot 2 --android 3 --ios 2
      fleet lab up --farm 2 --iot 2 --android 2 --ios 1
      fleet lab up --iot 1 --arch arm64 --cpu max
      fleet lab up --iot 1 --arch arm64 --cpu cortex-a53
    """
    if iot == android == ios == 0:
        raise errors.UsageError("nothing to start: give --iot N, --android N and/or --ios N")
    home = state().home
    if farm:
        from fleet.lab import farm as lab_farm

        err.print("starting the farm's Redis and PostgreSQL...")
        lab_farm.start_services(home, deadline_s=farm_deadline)
        home = FleetHome(home.path)  # the registry config.toml names from now on
    made: list[dict[str, Any]] = []
    for kind, count in (("iot", iot), ("android", android), ("ios", ios)):
        if count <= 0:
            continue
        module = kind_module(kind)
        err.print(f"starting {count} {kind} lab device(s)...")
        kwargs: dict[str, Any] = {}
        if kind == "iot":
            kwargs = {"store_mb": store_mb, "arch": arch, "cpu": cpu, "cache": cache,
                      "log": lambda m: err.print(m, highlight=False, markup=False)}
        devices = module.up(home, count, **kwargs)
        register_devices(home, devices)
        made.extend(d.to_dict() for d in devices)
    # An Arm board has no agent until `fleet device bootstrap` installs one from here.
    bare = [d["name"] for d in made if d.get("extra", {}).get("arch") == "arm64"]
    if enroll:
        outcome = _enroll_all(home, [d["name"] for d in made if d["name"] not in bare])
        for d in made:
            d["enrolled"] = outcome.get(d["name"], "needs bootstrap")
    if bare:
        err.print(f"arm64 board(s) {', '.join(bare)} have no agent yet: "
                  f"fleet device bootstrap NAME, then fleet device enroll NAME",
                  highlight=False)
    if farm:
        err.print(f"putting the devices behind {farm} farm host(s)...")
        via = {n: h["name"] for h in lab_farm.up(home, farm) for n in h["devices"]}
        for d in made:
            d["via"] = via.get(d["name"])

    def render(c: Console) -> None:
        c.print(table("lab devices", ["name", "platform", "group", "enrolled", "via", "uri"],
                      [(d["name"], d["platform"], d["group"], d.get("enrolled", "-"),
                        d.get("via") or "-", d["uri"]) for d in made]))

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
    """Remove everything the lab made, by name (namespaces, veths, sshd, mounts, entries).

    Examples:

    \b
      fleet lab down
    """
    from fleet.lab import farm as lab_farm

    home = state().home
    removed: dict[str, list[str]] = {"farm": lab_farm.down(home)}
    for kind in installed_kinds():
        removed[kind] = list(kind_module(kind).down(home))
        unregister_devices(home, removed[kind])
    removed["services"] = lab_farm.stop_services(home)
    emit(removed, as_json=as_json,
         render=lambda c: c.print("\n".join(f"{k}: removed {', '.join(v) or 'nothing'}"
                                            for k, v in removed.items())))


@lab_app.command("status")
def status(as_json: JsonOpt = False) -> None:
    """Every lab device with its arch and CPU model, address, link state, sshd, free store
    space and active faults.

    Examples:

    \b
      fleet lab status
      fleet lab status --json
    """
    from fleet.lab import farm as lab_farm

    home = state().home
    rows: list[dict[str, Any]] = []
    for kind in installed_kinds():
        for row in kind_module(kind).status(home):
            row.setdefault("kind", kind)
            rows.append(row)
    rows.extend(lab_farm.status(home))  # farm hosts: supervisor and worker

    def render(c: Console) -> None:
        if not rows:
            c.print("the lab is empty (fleet lab up --iot N)")
            return
        c.print(table("lab", ["name", "kind", "arch", "cpu", "address", "link", "sshd",
                              "store free", "faults"],
                      [(r["name"], r["kind"], r.get("arch", ""), r.get("cpu_model", ""),
                        r.get("address", r.get("uri", "")),
                        r.get("link", ""), r.get("sshd", r.get("state", "")),
                        _mib(r.get("store", {}).get("free")) if isinstance(r.get("store"), dict)
                        else "", ",".join(f"{k}={v}" for k, v in r.get("faults", {}).items()))
                       for r in rows]))

    emit(rows, as_json=as_json, render=render)


def _mib(n: int | None) -> str:
    from fleet.cli._output import human_bytes

    return "" if n is None else human_bytes(n)


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
    """Real link faults on an IoT lab board (tc tbf, nftables random drop, link down).

    Examples:

    \b
      fleet lab fault iot1 --bandwidth 2mbit --loss 10
      fleet lab fault iot1 --clear
    """
    from fleet.lab import farm as lab_farm
    from fleet.lab.faults import apply_fault

    if device in lab_farm.hosts(state().home):  # a farm host: its worker down or up
        if down_ == up_ or any((bandwidth, loss is not None, clear, stop_sshd, start_sshd)):
            raise errors.UsageError(f"farm host {device}: --down (stop its worker and keep "
                                    "it stopped) or --up (let its supervisor start it)")
        (lab_farm.hold if down_ else lab_farm.release)(state().home, device)
        emit({"host": device, "worker": "stopped" if down_ else "started"}, as_json=as_json,
             render=lambda c: c.print(f"farm host {device}: worker "
                                      f"{'stopped' if down_ else 'started'}"))
        return
    if not any((bandwidth, loss is not None, down_, up_, clear, stop_sshd, start_sshd)):
        raise errors.UsageError("no fault given (--bandwidth, --loss, --down, --up, --clear, "
                                "--stop-sshd, --start-sshd)")
    result = apply_fault(state().home, device, bandwidth=bandwidth, loss=loss, down=down_,
                         up=up_, clear=clear, stop_sshd=stop_sshd, start_sshd=start_sshd)
    emit(result, as_json=as_json,
         render=lambda c: c.print(f"{device}: link {result['link']}, faults "
                                  f"{result['faults'] or 'none'}"))
