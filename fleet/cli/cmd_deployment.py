"""``fleet deployment list|show|resume|cancel``: the history and lifecycle of rollouts.

Every command first marks ``interrupted`` the running deployments whose lease is stale
(:func:`fleet.rollout.lease.reap_stale`). IDs take an unambiguous prefix.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import typer
from rich.console import Console

from fleet.cli._ctx import state
from fleet.cli._output import emit, err, human_bytes, table
from fleet.cli._progress import fanout_progress
from fleet.cli._targets import DeviceOpt, GroupOpt, SelectorOpt, Targets, parse_target_text
from fleet.cli.app import app
from fleet.cli.cmd_deploy import ctrl_c, finish_command
from fleet.registry import Registry
from fleet.registry import history as hist
from fleet.registry.models import Deployment, DeploymentState, StepState
from fleet.registry.types import utcnow
from fleet.rollout.lease import reap_stale
from fleet.rollout.resume import cancel_deployment, resume_deployment

deployment_app = typer.Typer(help="Deployments: list, show, resume, cancel.\n\n"
                                  "Examples:\n\n\b\n"
                                  "  fleet deployment list\n"
                                  "  fleet deployment resume 3f2a",
                             no_args_is_help=True)
app.add_typer(deployment_app, name="deployment")
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
IdArg = Annotated[str, typer.Argument(help="Deployment id or an unambiguous prefix.")]


def _open() -> Registry:
    reg = Registry.open(state().home)
    for dep_id, why in reap_stale(reg):
        err.print(f"deployment {dep_id} marked interrupted: {why}", highlight=False)
    return reg


def _secs(a: datetime | None, b: datetime | None) -> float | None:
    return round((b - a).total_seconds(), 3) if a and b else None


def _dep_doc(dep: Deployment, counts: dict[StepState, int] | None = None) -> dict[str, Any]:
    lease = None
    if dep.status is DeploymentState.RUNNING:
        lease = {"host": dep.lease_host, "pid": dep.lease_pid,
                 "heartbeat_age_s": _secs(dep.heartbeat_at, utcnow())}
    model = f"{dep.name}@{dep.version}" if dep.version is not None else f"{dep.name}@previous"
    doc: dict[str, Any] = {
        "id": dep.id, "kind": dep.kind.value, "name": dep.name, "version": dep.version,
        "model": model, "target": dep.target, "targets": parse_target_text(dep.target),
        "status": dep.status.value,
        "reason": dep.status_reason, "created_at": dep.created_at,
        "finished_at": dep.finished_at, "halted_at_wave": dep.halted_at_wave,
        "waves": dep.options.get("waves"), "reverts": dep.reverts_id, "lease": lease}
    if counts is not None:
        doc["steps"] = {k.value: v for k, v in sorted(counts.items())}
    return doc


@deployment_app.command("list")
def list_(limit: Annotated[int, typer.Option(help="Newest N.")] = 50,
          as_json: JsonOpt = False) -> None:
    """Deployments and rollbacks, newest first, with their state and step counts.

    Examples:

    \b
      fleet deployment list --limit 10
    """
    reg = _open()
    docs = [_dep_doc(d, c) for d, c in hist.list_deployments(reg, limit=limit)]

    def render(c: Console) -> None:
        c.print(table("deployments", ["id", "kind", "model", "target", "state", "steps",
                                      "created"],
                      [(str(d["id"])[:8], d["kind"], d["model"], d["target"], d["status"],
                        " ".join(f"{k}={v}" for k, v in d["steps"].items()),
                        d["created_at"].strftime("%Y-%m-%d %H:%M:%S")) for d in docs]))

    emit(docs, as_json=as_json, render=render)


def _show_doc(reg: Registry, dep: Deployment) -> dict[str, Any]:
    reports = {r.device_id: r for r in hist.deployment_reports(reg, dep.id)}
    pull_mode = (dep.options or {}).get("mode") == "pull"
    steps = []
    for st, dev in hist.steps_of(reg, dep.id):
        rep = reports.get(dev.id)
        events = [{"state": e.state.value, "at": e.at, **({"detail": e.detail}
                                                            if e.detail else {})}
                  for e in hist.step_events(reg, st.id)]
        steps.append({
            "device": dev.name, "wave": st.wave, "state": st.state.value,
            # pull mode: how the step reads (waiting for check-in, downloading, ...)
            "progress": _pull_view(st.state) if pull_mode else None,
            "attempts": st.attempts, "error_code": st.error_code,
            "error": st.error_message, "bytes_sent": st.bytes_sent,
            "started_at": st.started_at, "finished_at": st.finished_at,
            "duration_s": _secs(st.started_at, st.finished_at),
            "previous": (rep.body or {}).get("previous") if rep else None,
            "backend": rep.recommended_backend if rep else None,
            "report_recovered": bool((rep.body or {}).get("recovered")) if rep else False,
            "rolled_back": st.state in (StepState.ROLLED_BACK, StepState.ROLLBACK_FAILED),
            "events": events})
    rollbacks = [_dep_doc(r) for r in hist.reverting(reg, dep.id)]
    return {"deployment": _dep_doc(dep), "steps": steps, "rollbacks": rollbacks}


def _pull_view(step: StepState) -> str:
    from fleet.rollout.pull import step_view

    return step_view(step)


@deployment_app.command("show")
def show(deployment: IdArg, as_json: JsonOpt = False) -> None:
    """One deployment: per device its wave, step, attempts, error, bytes, timings, the
    version it replaced (what a rollback goes back to), events; rollbacks done.

    Examples:

    \b
      fleet deployment show 3f2a -o yaml
    """
    reg = _open()
    doc = _show_doc(reg, hist.find_deployment(reg, deployment))

    def render(c: Console) -> None:
        d = doc["deployment"]
        c.print(f"deployment {d['id']}  {d['kind']} {d['model']} -> {d['target']}  "
                f"[bold]{d['status']}[/]" + (f"  ({d['reason']})" if d["reason"] else ""))
        c.print(table(None, ["device", "wave", "step", "attempts", "sent", "seconds",
                             "previous", "error"],
                      [(s["device"], s["wave"] or "-", s["progress"] or s["state"],
                        s["attempts"],
                        human_bytes(s["bytes_sent"]), s["duration_s"] if s["duration_s"] is not None
                        else "-", s["previous"] if s["previous"] is not None else "-",
                        f"{s['error_code']}: {s['error']}" if s["error_code"] else "")
                       for s in doc["steps"]]))
        for r in doc["rollbacks"]:
            when = r["created_at"].strftime("%Y-%m-%d %H:%M:%S")
            c.print(f"rolled back by {r['id']} ({r['status']}, {when})", highlight=False)

    emit(doc, as_json=as_json, render=render)


@deployment_app.command("resume")
def resume(deployment: IdArg,
           group: GroupOpt = [],  # noqa: B006 (typer reads the default)
           device: DeviceOpt = [],  # noqa: B006
           selector: SelectorOpt = [],  # noqa: B006
           workers: Annotated[int | None, typer.Option(min=1, help="Devices in parallel "
                                                       "(default: as recorded).")] = None,
           as_json: JsonOpt = False) -> None:
    """Carry an interrupted deployment on: ask each unfinished device's agent what really
    happened, record it, and finish the devices that still need work. With -g/-d/-l only
    the selected devices of the deployment carry on; it stays interrupted while others
    are unfinished.

    Examples:

    \b
      fleet deployment resume 3f2a
    """
    tg = Targets.parse(group, device, selector)
    reg = _open()
    only = {d.name for d in tg.resolve(reg)} if tg.named else None
    dep = hist.find_deployment(reg, deployment)
    ctl = ctrl_c(reg)
    ctl.created(dep.id)
    with ctl.installed(), fanout_progress() as prog:
        out = resume_deployment(state().home, reg, dep.id, cancel=ctl.cancel,
                                say=lambda m: err.print(m, highlight=False), workers=workers,
                                only=only,
                                on_bytes=prog.on_bytes, on_state=prog.on_state,
                                on_done=prog.on_done)
    finish_command(reg, "resume", f"{dep.name}@{dep.version}", dep.id, out.result,
                   [o.device for o in out.result], as_json=as_json, stopped=ctl.fired,
                   model=(dep.name, dep.version),
                   extra={"halted_at_wave": out.halted_at})


@deployment_app.command("cancel")
def cancel(deployment: IdArg, as_json: JsonOpt = False) -> None:
    """Cancel a running deployment (its controller on this host gets SIGTERM and stops
    gently) or an interrupted one; unfinished steps become cancelled.

    Examples:

    \b
      fleet deployment cancel 3f2a
    """
    reg = _open()
    dep, did = cancel_deployment(reg, hist.find_deployment(reg, deployment).id)
    emit({"deployment": _dep_doc(dep), "controller": did}, as_json=as_json,
         render=lambda c: c.print(f"deployment {dep.id} cancelled; {did}"))
