"""``fleet gc``: prune the controller's package cache by the devices' keep policy."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from fleet.artifacts.gc import DEFAULT_KEEP, apply_gc, plan_gc
from fleet.cli._ctx import state
from fleet.cli._output import emit, human_bytes, table
from fleet.cli.app import app
from fleet.registry import Registry


@app.command("gc")
def gc(
    keep: Annotated[int, typer.Option(
        help="Versions kept beyond the active and the previous one, per name.")] = DEFAULT_KEEP,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would go; delete "
                                                            "nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Delete built packages no device needs (keeps active, previous and KEEP more per
    name, the newest build, and what unfinished deployments use).

    Example: fleet gc --keep 2 --dry-run
    """
    home = state().home
    reg = Registry.open(home)
    plan = plan_gc(home, reg, keep=keep)
    freed = 0 if dry_run else apply_gc(plan)
    data = {**plan.to_dict(), "dry_run": dry_run, "bytes_freed": plan.bytes_freed
            if dry_run else freed}

    def render(c: Console) -> None:
        c.print(table("kept versions", ["name", "versions"],
                      [(n, ", ".join(map(str, v))) for n, v in sorted(plan.keep.items())]))
        verb = "would free" if dry_run else "freed"
        c.print(f"{len(plan.delete)} package(s), {len(plan.delete_prepared)} prepared "
                f"payload(s): {verb} {human_bytes(plan.bytes_freed)}")

    emit(data, as_json=as_json, render=render)
