"""``fleet audit`` and ``fleet reports``."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console

from fleet.audit.candidates import CandidateTable, candidate_table
from fleet.audit.collect import Audit, collect_audit
from fleet.audit.latest import MEASURING_KINDS, REPORT_KINDS, latest_measurement
from fleet.audit.regression import DEFAULT_THRESHOLD
from fleet.cli._ctx import state
from fleet.cli._output import emit, table
from fleet.cli._targets import DeviceOpt, GroupOpt, SelectorOpt, Targets
from fleet.cli.app import app
from fleet.core import errors
from fleet.registry import Device, Registry
from fleet.registry import history as hist
from fleet.registry.types import utcnow

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def ago(seconds: float | None) -> str:
    """``seconds`` as a short age: ``40 s``, ``12 min``, ``5 h``, ``3 d``."""
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{max(seconds, 0):.0f} s"


def _devices(names: list[str], most: int = 12) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" (+{len(names) - most} more)" if len(names) > most else "")


def render_audit(c: Console, found: Audit) -> None:
    """The device table, then one row per finding code with its devices, then how old
    stored data is and the rows' notes."""
    now = utcnow()
    stored = not found.live
    cols = ["device", "model", "adapter", "configured", "effective", "recommended",
            "median ms", "vs cpu", *(["reported"] if stored else []), "findings"]
    c.print(table("audit: configured vs effective vs recommended backend", cols, [
        (r.device, r.entity or "-", r.adapter or "-", r.configured or "-", r.effective or "-",
         r.recommended or "-", _ms(r.median_ms),
         f"{r.cpu_median_ms / r.median_ms:.2f}x" if r.median_ms and r.cpu_median_ms else "-",
         *([f"{ago((now - r.reported_at).total_seconds())} ago" if r.reported_at else "-"]
           if stored else []),
         r.error or (str(len(r.findings)) if r.findings else "none"))
        for r in found.rows]))
    groups = found.findings
    if groups:
        c.print(table("findings (one row per rule)",
                      ["rule", "severity", "devices", "message", "fix"],
                      [(g.code, g.severity, f"{len(g.devices)}: {_devices(g.devices)}",
                        g.message, g.fix) for g in groups]))
    if stored:
        age = found.ages(now)
        if age["newest_at"] is not None:
            c.print(f"stored data: newest reported {ago(age['newest_age_s'])} ago "
                    f"({age['newest_device']}), oldest {ago(age['oldest_age_s'])} ago "
                    f"({age['oldest_device']}); `fleet audit` without --offline asks the "
                    "devices now", highlight=False, markup=False)
    for r in found.rows:
        if r.note:
            c.print(f"{r.device} {r.entity}: {r.note}", highlight=False, markup=False)


@app.command("audit")
def audit(
    group: GroupOpt = [],  # noqa: B006 (typer reads the default; targets: fleet.cli._targets)
    device: DeviceOpt = [],  # noqa: B006
    selector: SelectorOpt = [],  # noqa: B006
    offline: Annotated[bool, typer.Option(
        help="Use what the registry last heard (reports, rollbacks); says how old.")] = False,
    regression_threshold: Annotated[float, typer.Option(
        "--regression-threshold", metavar="PERCENT",
        help="FA-regression: flag a version whose median on a device is more than this "
             "many percent slower than the previous version's there.")
    ] = DEFAULT_THRESHOLD * 100,
    as_json: JsonOpt = False,
) -> None:
    """Per device: configured vs effective vs recommended backend, findings grouped by
    rule (agent rules and FA-regression), last benchmark.

    Examples:

    \b
      fleet audit -g phones
      fleet audit --offline -o wide
    """
    if regression_threshold < 0:
        raise errors.UsageError(
            f"--regression-threshold must be >= 0 (percent), not {regression_threshold}")
    tg = Targets.parse(group, device, selector)  # none named: every device
    home = state().home
    reg = Registry.open(home)
    devices = tg.resolve(reg, required=tg.named)
    found = collect_audit(home, reg, devices, live=not offline,
                          regression_threshold=regression_threshold / 100)
    emit(found.to_dict(), as_json=as_json, render=lambda c: render_audit(c, found))
    found.result.raise_for_failures("audit")


def _check_kind(kind: str | None) -> None:
    if kind is not None and kind not in REPORT_KINDS:
        raise errors.UsageError(f"unknown report kind {kind!r}: use one of "
                                f"{', '.join(REPORT_KINDS)}", kind=kind)


@app.command("reports")
def reports(
    device: Annotated[str | None, typer.Argument(
        help="The device (or name several with -g/-d/-l).")] = None,
    group: GroupOpt = [],  # noqa: B006 (targets: fleet.cli._targets)
    devices: DeviceOpt = [],  # noqa: B006
    selector: SelectorOpt = [],  # noqa: B006
    kind: Annotated[str | None, typer.Option(
        metavar="KIND", help=f"Only this kind: {', '.join(REPORT_KINDS)}.")] = None,
    limit: int = 10,
    candidates: Annotated[bool, typer.Option(
        "--candidates", help="The candidate table (backend x precision x memory x threads, "
                             "median, p90, accuracy, verdict, pick) of the latest "
                             "activate/bench report.")] = False,
    model: Annotated[str | None, typer.Option(
        help="With --candidates: this model's latest report (default: any model).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """The device's stored reports, newest first; --candidates: what the last health
    benchmark measured and why it picked what it picked.

    Examples:

    \b
      fleet reports pixel7 --kind activate --limit 3
      fleet reports pixel7 --candidates
    """
    _check_kind(kind)
    tg = Targets.parse(group, [*([device] if device else []), *devices], selector)
    reg = Registry.open(state().home)
    devs = tg.resolve(reg)
    if candidates:
        if len(devs) != 1:
            raise errors.UsageError(f"--candidates shows one device's table; the targets "
                                    f"select {len(devs)}: name one device")
        show_candidates(reg, devs[0], kind=kind, model=model, as_json=as_json)
        return
    reps = [(dev.name, r) for dev in devs  # newest first, per device
            for r in hist.reports_for(reg, dev, kind=kind, limit=limit)]
    data: list[dict[str, Any]] = [
        {"device": dev_name, "id": r.id, "kind": r.kind, "created_at": r.created_at,
         "model": f"{r.model_name}@{r.model_version}" if r.model_name else None,
         "name": r.model_name, "version": r.model_version,
         "configured": r.configured_backend, "effective": r.effective_backend,
         "recommended": r.recommended_backend, "median_ms": r.median_ms, "body": r.body}
        for dev_name, r in reps]
    emit(data, as_json=as_json, render=lambda c: c.print(table(
        f"reports of {', '.join(d.name for d in devs)}",
        ["device", "when", "kind", "model", "effective", "recommended", "median ms"],
        [(d["device"], d["created_at"].isoformat(timespec="seconds"), d["kind"],
          d["model"] or "-", d["effective"] or "-", d["recommended"] or "-",
          _ms(d["median_ms"])) for d in data])))


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def render_candidates(c: Console, t: CandidateTable) -> None:
    c.print(table(
        f"candidates on {t.device}: {t.entity} ({t.kind} report, "
        f"{t.reported_at.isoformat(timespec='seconds')})",
        ["backend", "precision", "memory", "threads", "median ms", "p90 ms", "cosine",
         "max abs err", "verdict", "picked"],
        [(r.backend, r.precision, r.memory, "-" if r.threads is None else r.threads,
          _num(r.median_ms, ".3f"), _num(r.p90_ms, ".3f"), _num(r.cosine, ".6f"),
          _num(r.max_abs_err, ".2e"), r.verdict, "PICKED" if r.picked else "")
         for r in t.rows]))
    c.print(f"picked: {t.picked or 'nothing (no candidate passed)'}", highlight=False,
            markup=False)
    for why in t.pick_reasons:
        c.print(f"  - {why}", highlight=False, markup=False)


def show_candidates(reg: Registry, dev: Device, *, kind: str | None, model: str | None,
                    as_json: bool) -> None:
    """The candidate table of ``dev``'s latest activate/bench report (of ``model``)."""
    if kind is not None and kind not in MEASURING_KINDS:
        raise errors.UsageError(f"--candidates reads {' or '.join(MEASURING_KINDS)} reports, "
                                f"not {kind!r}", kind=kind)
    rep = latest_measurement(reg, dev.id, model=model,
                             kinds=(kind,) if kind else MEASURING_KINDS)
    if rep is None:
        what = f" of {model}" if model else ""
        raise errors.NotFoundError(f"{dev.name}: no activate or bench report{what} stored",
                                   device=dev.name)
    t = candidate_table(dev.name, rep)
    emit(t.to_dict(), as_json=as_json, render=lambda c: render_candidates(c, t))
