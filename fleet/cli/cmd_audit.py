"""``fleet audit`` and ``fleet reports``."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console

from fleet.audit.collect import AuditRow, collect_audit
from fleet.cli._ctx import state
from fleet.cli._output import emit, table
from fleet.cli.app import app
from fleet.registry import Registry
from fleet.registry import history as hist

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def render_audit(c: Console, rows: list[AuditRow]) -> None:
    c.print(table("audit: configured vs effective vs recommended backend",
                  ["device", "model", "adapter", "configured", "effective", "recommended",
                   "median ms", "vs cpu", "findings"],
                  [(r.device, f"{r.model}@{r.version}" if r.model else "-", r.adapter or "-",
                    r.configured or "-", r.effective or "-", r.recommended or "-",
                    _ms(r.median_ms),
                    f"{r.cpu_median_ms / r.median_ms:.2f}x" if r.median_ms and r.cpu_median_ms
                    else "-",
                    r.error or (", ".join(f["id"] for f in r.findings) or "none"))
                   for r in rows]))
    found = [(r.device, f) for r in rows for f in r.findings]
    if found:
        c.print(table("findings", ["device", "rule", "severity", "message", "fix"],
                      [(d, f["id"], f.get("severity", ""), f.get("message", ""),
                        f.get("fix", "")) for d, f in found]))


@app.command("audit")
def audit(
    group: Annotated[str | None, typer.Option("--group", "-g")] = None,
    device: Annotated[list[str], typer.Option("--device", "-d")] = [],  # noqa: B006
    offline: Annotated[bool, typer.Option(help="Use the last stored audit reports.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Per device: configured vs effective vs recommended backend, findings, last benchmark."""
    home = state().home
    reg = Registry.open(home)
    devices = reg.resolve_targets(groups=[group] if group else [], devices=device) \
        if (group or device) else reg.list_devices()
    found = collect_audit(home, reg, devices, live=not offline)
    rows = found.rows
    emit([r.to_dict() for r in rows], as_json=as_json, render=lambda c: render_audit(c, rows))
    found.result.raise_for_failures("audit")


@app.command("reports")
def reports(device: str, kind: Annotated[str | None, typer.Option()] = None,
            limit: int = 10, as_json: JsonOpt = False) -> None:
    """The device's stored reports, newest first."""
    reg = Registry.open(state().home)
    dev = reg.get_device(device)
    reps = hist.reports_for(reg, dev, kind=kind, limit=limit)
    data: list[dict[str, Any]] = [
        {"id": r.id, "kind": r.kind, "created_at": r.created_at, "model": r.model_name,
             "version": r.model_version, "configured": r.configured_backend,
             "effective": r.effective_backend, "recommended": r.recommended_backend,
             "median_ms": r.median_ms, "body": r.body} for r in reps]
    emit(data, as_json=as_json, render=lambda c: c.print(table(
        f"reports of {device}", ["when", "kind", "model", "effective", "recommended",
                                 "median ms"],
        [(d["created_at"].isoformat(timespec="seconds"), d["kind"],
          f"{d['model']}@{d['version']}" if d["model"] else "-", d["effective"] or "-",
          d["recommended"] or "-", _ms(d["median_ms"])) for d in data])))
