"""``fleet worker --host NAME`` and ``fleet worker list``: farm hosts (fleet.worker)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console

from fleet.cli._ctx import state
from fleet.cli._output import emit, err, literal, table
from fleet.cli.app import app
from fleet.core import errors
from fleet.registry import Registry

worker_app = typer.Typer(invoke_without_command=True)
app.add_typer(worker_app, name="worker")
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


@worker_app.callback()
def worker(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(
        "--host", help="The farm host this worker serves (the `--via` of its devices).")
                    ] = None,
    concurrency: Annotated[int, typer.Option(
        "--concurrency", "-c", help="Device tasks at once.")] = 4,
    name: Annotated[str | None, typer.Option(
        "--name", help="Celery node name (default HOST@this-machine).")] = None,
    loglevel: Annotated[str, typer.Option("--loglevel", help="Celery's log level.")
                        ] = "WARNING",
) -> None:
    """Run a Celery worker for farm host HOST's queue (fleet.host.HOST) until stopped.

    It runs the device tasks that `fleet deploy`, `rollback`, `audit` and `lora` send for
    devices added with `--via HOST`, writes their steps to the shared registry and beats
    in the registry's workers table. Needs a broker (FLEET_BROKER or broker.url in
    config.toml) and the registry the controller uses. SIGTERM: finish running tasks,
    then stop.

    Example: fleet worker --host lab-rack-1 --concurrency 8
    """
    if ctx.invoked_subcommand is not None:
        return
    if host is None:
        raise errors.UsageError("name the farm host: fleet worker --host NAME (or `fleet "
                                "worker list`)")
    from fleet.worker.runner import node_name, run_worker

    err.print(f"worker {literal(name or node_name(host))}: serving fleet.host.{literal(host)} "
              f"with {concurrency} thread(s)", highlight=False)
    code = run_worker(state().home, host, concurrency=concurrency, name=name,
                      loglevel=loglevel)
    raise typer.Exit(code)


def _age(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}m"


@worker_app.command("list")
def list_(
    all_: Annotated[bool, typer.Option("--all", help="Also stopped and silent workers.")
                    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Workers with their heartbeat's age and the devices of their farm host; hosts that
    devices name (`--via`) but no live worker serves are listed apart.

    Example: fleet worker list --json
    """
    from fleet.worker import roster
    from fleet.worker.settings import settings_for

    home = state().home
    settings = settings_for(home)
    reg = Registry.open(home)
    views = roster.workers(reg, stale_s=settings.stale_s)
    by_host = roster.devices_by_host(reg)
    rows: list[dict[str, Any]] = [
        {"name": v.name, "host": v.host, "queue": v.queue, "machine": v.hostname,
         "pid": v.pid, "concurrency": v.concurrency, "live": v.live,
         "heartbeat_age_s": round(v.age_s, 1), "started_at": v.started_at,
         "stopped_at": v.stopped_at, "devices": by_host.get(v.host, [])}
        for v in views if all_ or v.live]
    served = {v.host for v in views if v.live}
    unserved = {h: names for h, names in sorted(by_host.items()) if h not in served}
    doc = {"workers": rows, "unserved": unserved, "broker": settings.enabled}

    def render(c: Console) -> None:
        c.print(table("workers", ["name", "host", "live", "heartbeat", "machine", "pid",
                                  "threads", "devices"],
                      [(r["name"], r["host"], "yes" if r["live"] else "no",
                        _age(r["heartbeat_age_s"]) + " ago", r["machine"], r["pid"],
                        r["concurrency"], f"{len(r['devices'])}: "
                        f"{', '.join(r['devices'][:6])}{' ...' if len(r['devices']) > 6 else ''}")
                       for r in rows]))
        for h, names in unserved.items():
            c.print(f"farm host {literal(h)}: no live worker ({len(names)} device(s): "
                    f"{literal(', '.join(names[:6]))})", highlight=False)
        if not settings.enabled:
            c.print("no broker configured (FLEET_BROKER or broker.url): every device runs "
                    "in the controller's process")

    emit(doc, as_json=as_json, render=render)
