"""``fleet deploy`` and ``fleet rollback``: package, push in parallel, activate, report."""

from __future__ import annotations

import os
import sys
import threading
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from fleet.agent_client import RollbackResult
from fleet.cli._ctx import state
from fleet.cli._output import emit, err, table
from fleet.cli._progress import fanout_progress
from fleet.cli.app import app
from fleet.connect import device_session
from fleet.core import errors
from fleet.enrollment import enroll_many
from fleet.home import FleetHome
from fleet.registry import Device, Registry
from fleet.registry import history as hist
from fleet.registry.models import DeploymentKind, StepState
from fleet.rollout.deploy import DeployJob, DeployResult, holding, run_deployment
from fleet.rollout.fanout import DeviceOutcome, FleetResult, TaskContext, call_each
from fleet.rollout.interrupt import CtrlC
from fleet.rollout.lease import abandon, holder, reap_stale
from fleet.rollout.waves import run_waves

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def targets(reg: Registry, group: list[str], device: list[str]) -> list[Device]:
    if not group and not device:
        raise errors.UsageError("name the targets: --group G and/or --device D")
    devs = reg.resolve_targets(groups=group, devices=device)
    if not devs:
        raise errors.UsageError(f"no devices in {', '.join(group + device)}")
    return devs


def enroll_missing(home: FleetHome, reg: Registry, devs: list[Device], workers: int
                   ) -> tuple[list[Device], FleetResult[DeployResult]]:
    """Enroll devices that have no key yet (in parallel); return (ready, failed outcomes)."""
    todo = [d for d in devs if not d.public_key]
    failed: FleetResult[DeployResult] = FleetResult()
    if todo:
        err.print(f"enrolling {len(todo)} device(s): {', '.join(d.name for d in todo)}",
                  highlight=False)

        for out in enroll_many(home, reg, todo, workers=workers).failed:
            if out.error is not None:
                out.reason = f"enroll: {out.error.message}"
            failed.add(DeviceOutcome(out.device, out.status, error=out.error,
                                     reason=out.reason, attempts=out.attempts))
    ready = [reg.get_device(d.name) for d in devs if d.name not in failed.outcomes]
    return ready, failed


def _findings(o: DeviceOutcome[DeployResult]) -> str:
    report = o.result.report if o.result else None
    if not o.ok and report is None:
        return o.reason
    found = (report or {}).get("findings") or []
    return ", ".join(sorted({f["id"] for f in found})) or "none"


def result_rows(result: FleetResult[DeployResult]) -> list[dict[str, Any]]:
    """One row per device: ``status`` is the stable word (``failed`` for every failure),
    ``outcome`` the exact :class:`DeviceStatus`."""
    rows = []
    for o in result:
        rep = (o.result.report if o.result else None) or {}
        pick = rep.get("pick") or {}
        med, cpu = rep.get("median_ms"), rep.get("cpu_median_ms")
        rows.append({"device": o.device, "status": o.status.label, "outcome": o.status.value,
                     "backend": pick.get("label"),
                     "effective_backend": pick.get("effective_backend"), "median_ms": med,
                     "cpu_median_ms": cpu, "vs_cpu": round(cpu / med, 3) if med and cpu
                     else None, "bytes_sent": o.result.bytes_sent if o.result else 0,
                     "findings": _findings(o), "attempts": o.attempts,
                     "error": o.error.to_dict() if o.error else None, "reason": o.reason})
    return rows


def render_results(c: Console, title: str, rows: list[dict[str, Any]]) -> None:
    c.print(table(title, ["device", "status", "backend picked", "median ms", "vs cpu",
                          "sent", "findings / error"],
                  [(r["device"], r["status"], r["backend"] or "-",
                    f"{r['median_ms']:.3f}" if r["median_ms"] else "-",
                    f"{r['vs_cpu']:.2f}x" if r["vs_cpu"] else "-",
                    _bytes(r["bytes_sent"]), r["findings"]) for r in rows]))


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n = n / 1024  # type: ignore[assignment]
    return str(n)


def package_job(home: FleetHome, reg: Registry, model: Path, devices: list[Device], *,
                name: str | None, version: int | None, variant: str | None,
                golden: Path | None, entry: str | None, bench: dict[str, Any],
                activate: bool, input_shape: list[str] | None = None,
                inputs: Path | None = None) -> DeployJob:
    """MODEL as a package for ``devices``: a ready ``.fpkg`` as it is, anything else
    through the one packaging path (prepare, then build or reuse)."""
    import tempfile

    from fleet.artifacts.inputs import parse_input_shapes
    from fleet.artifacts.prepare import PrepareOptions, prepare
    from fleet.artifacts.publish import build, prepared_cache_dir, use_package

    def say(m: str) -> None:
        err.print(m, highlight=False, markup=False)  # may carry file or device text

    if model.suffix.lower() == ".fpkg" and not model.is_dir():
        built = use_package(home, reg, model, devices)
    else:
        with tempfile.TemporaryDirectory(prefix="fleet-deploy-") as tmp:
            payload = prepare(model, PrepareOptions(
                work_dir=Path(tmp), name=name, variant=variant, golden=golden, entry=entry,
                input_shapes=parse_input_shapes(input_shape or []) or None, inputs=inputs,
                cache_dir=prepared_cache_dir(home), say=say))
            built = build(home, reg, payload, devices, version=version, say=say)
    return DeployJob(built.name, built.version, built.kind, built.path, built.package_sha256,
                     built.digest, built.size, built.artifact_id, bench, activate)


@app.command("deploy")
def deploy(
    model: Annotated[Path, typer.Argument(
        help=".mnn, .onnx, .tflite, a model folder or a built .fpkg")],
    group: Annotated[list[str], typer.Option("--group", "-g")] = [],  # noqa: B006
    device: Annotated[list[str], typer.Option("--device", "-d")] = [],  # noqa: B006
    name: Annotated[str | None, typer.Option(help="Model name (default: file stem).")] = None,
    version: Annotated[int | None, typer.Option(help="Version (default: next).")] = None,
    variant: Annotated[str | None, typer.Option(help="fp16 | wq8 | wq4 (ONNX/TFLite)")] = None,
    golden: Annotated[Path | None, typer.Option(help="Golden reference .npz")] = None,
    entry: Annotated[str | None, typer.Option(help="Main file of a model folder.")] = None,
    input_shape: Annotated[list[str] | None, typer.Option(
        "--input-shape", help="NAME=D0,D1,.. for an input with dynamic dims (repeat).")
                           ] = None,
    inputs: Annotated[Path | None, typer.Option(
        help="Sample inputs (.npz) for the conversion check and the golden data.")] = None,
    workers: Annotated[int, typer.Option(help="Devices in parallel.")] = 8,
    deadline: Annotated[float, typer.Option(help="Seconds per device.")] = 900.0,
    retries: Annotated[int, typer.Option(help="Retries of transient errors.")] = 2,
    iterations: Annotated[int, typer.Option(help="Benchmark iterations.")] = 10,
    warmup: Annotated[int, typer.Option(help="Benchmark warm-up runs.")] = 3,
    activate: Annotated[bool, typer.Option(
        "--activate/--no-activate",
        help="--no-activate: push and stage only (verified, kept encrypted).")] = True,
    waves: Annotated[str | None, typer.Option(
        help="Roll out in waves, e.g. 1,25%,100% (cumulative sizes); a health gate after "
             "each, automatic rollback when it fails.")] = None,
    max_failed: Annotated[int, typer.Option(
        help="Failed devices a wave may have before the rollout halts and rolls back.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Package MODEL for the targets, push it to each in parallel, stage, activate, report.

    Ctrl-C stops starting devices and lets those in flight reach a safe point, prints the
    partial table and exits 130 with the deployment interrupted (`fleet deployment
    resume ID` carries it on); a second Ctrl-C within 2 s stops at once."""
    home = state().home
    reg = Registry.open(home)
    reap_stale(reg)
    devs = targets(reg, group, device)
    ctl = ctrl_c(reg)
    results: FleetResult[DeployResult] = FleetResult()
    deployment_id = None
    halted: int | None = None
    with ctl.installed():
        try:
            ready, failed = enroll_missing(home, reg, devs, workers)
            results.extend(failed)
            if ready:
                job = package_job(home, reg, model, ready, name=name, version=version,
                                  variant=variant, golden=golden, entry=entry,
                                  bench={"iterations": iterations, "warmup": warmup},
                                  activate=activate, input_shape=input_shape, inputs=inputs)
                err.print(f"deploying {job.name}@{job.version} ({_bytes(job.size)}) to "
                          f"{len(ready)} device(s)", highlight=False)
                with fanout_progress() as prog:
                    kw: dict[str, Any] = {"workers": workers, "deadline_s": deadline,
                                          "retries": retries, "on_bytes": prog.on_bytes,
                                          "on_state": prog.on_state, "on_done": prog.on_done,
                                          "cancel": ctl.cancel, "on_created": ctl.created}
                    if waves:
                        outcome = run_waves(home, reg, job, ready, spec=waves,
                                            max_failed=max_failed,
                                            target=",".join(group + device),
                                            say=lambda m: err.print(m, highlight=False), **kw)
                        res, deployment_id = outcome.result, outcome.deployments[-1]
                        halted = outcome.halted_at
                    else:
                        deployment_id, res = run_deployment(home, reg, job, ready,
                                                            target=",".join(group + device),
                                                            **kw)
                results.extend(res)
        except KeyboardInterrupt:
            err.print("interrupted", highlight=False)
            raise typer.Exit(130) from None
    finish_command(reg, "deploy", model.name, deployment_id, results, [d.name for d in devs],
                   as_json=as_json, stopped=ctl.fired, extra={"halted_at_wave": halted})


def ctrl_c(reg: Registry) -> CtrlC:
    """The deploy/resume Ctrl-C handling, wired to the deployment once it exists."""
    who = holder()

    def first() -> None:
        err.print("stopping: no new device starts; devices in flight stop at a safe point. "
                  "Ctrl-C again within 2 s stops at once.", highlight=False)

    def hard() -> None:
        dep_id = ctl.deployment
        if dep_id is not None:  # bounded: a registry that hangs must not keep us here
            t = threading.Thread(target=abandon, args=(reg, dep_id, who,
                                                        "interrupted: Ctrl-C twice"),
                                 daemon=True)
            t.start()
            t.join(2.0)
            sys.stderr.write(f"stopped at once; deployment {dep_id} is interrupted: "
                             f"`fleet deployment resume {dep_id}` carries it on\n")
        sys.stderr.flush()
        os._exit(130)

    ctl = CtrlC(on_first=first, on_hard=hard)
    return ctl


def finish_command(reg: Registry, what: str, title: str, deployment_id: uuid.UUID | None,
                   results: FleetResult[DeployResult], order: list[str], *, as_json: bool,
                   stopped: bool, extra: dict[str, Any] | None = None) -> None:
    """Print the (partial) table with the deployment's state; exit 130 after a Ctrl-C,
    else the fan-out's exit rule."""
    results = results.sorted_by(order)
    rows = result_rows(results)
    dep_state = (hist.get_deployment(reg, deployment_id).status.value
                 if deployment_id else None)
    data = {"deployment": deployment_id, "state": dep_state, "results": rows,
            "failed": len(results.failed), **(extra or {})}
    emit(data, as_json=as_json, render=lambda c: render_results(
        c, f"{what} {title} (deployment {deployment_id}: {dep_state})", rows))
    if stopped:
        if deployment_id and dep_state == "interrupted":
            err.print(f"interrupted: `fleet deployment resume {deployment_id}` carries it on",
                      highlight=False)
        raise typer.Exit(130)
    results.raise_for_failures(what)


@app.command("rollback")
def rollback(
    name: str,
    group: Annotated[list[str], typer.Option("--group", "-g")] = [],  # noqa: B006
    device: Annotated[list[str], typer.Option("--device", "-d")] = [],  # noqa: B006
    to: Annotated[int | None, typer.Option(
        help="Go to this version with a signed rollback order (else: the previous slot).")]
    = None,
    as_json: JsonOpt = False,
) -> None:
    """Switch NAME back on the targets: to the previous slot, or to --to VERSION.

    Recorded as a deployment of kind rollback (`fleet deployment list/show`), linked to
    the deploy of NAME it reverts."""
    home = state().home
    reg = Registry.open(home)
    reap_stale(reg)
    devs = targets(reg, group, device)
    order = None
    if to is not None:
        from fleet.artifacts.trust import sign_order  # registry counter + expiry
        order = sign_order(home, reg, name=name, version=to,
                           devices=[d.fingerprint for d in devs if d.fingerprint])
    who = holder()
    reverts = hist.last_deployment_of(reg, name, devs)
    dep, steps = hist.create_deployment(
        reg, name=name, version=to, target=",".join(group + device), devices=devs,
        artifact_id=None, kind=DeploymentKind.ROLLBACK, lease=who,
        reverts_id=reverts.id if reverts else None, options={"to": to})

    def task(dev: Device, ctx: TaskContext) -> RollbackResult:
        hist.record_attempt(reg, steps[dev.name].id, ctx.attempt + 1)
        with device_session(home, dev, ctx) as agent:
            hist.set_step(reg, steps[dev.name].id, StepState.ROLLING_BACK, to=to)
            back = agent.rollback(name, order, timeout=ctx.deadline.remaining(30))
        hist.set_step(reg, steps[dev.name].id, StepState.OK, current=back.current,
                      previous=back.previous, changed=back.changed)
        return back

    with holding(reg, dep.id, who, cancel=threading.Event()):
        result = call_each(devs, task, deadline_s=120)
        for o in result.failed:
            e = o.error or errors.FleetError("unknown failure")
            hist.set_step(reg, steps[o.device].id, StepState.FAILED, error_code=e.code,
                          error_message=e.message)
        dep_state = hist.finish_deployment(reg, dep.id, lease=who)
    rows = [{"device": o.device, "ok": o.ok, "status": o.status.label,
             "active": o.result.current if o.result else None,
             "previous": o.result.previous if o.result else None,
             "error": o.error.message if o.error else None, "deployment": dep.id,
             "reverts": reverts.id if reverts else None} for o in result]
    emit(rows, as_json=as_json, render=lambda c: c.print(table(
        f"rollback {name} (deployment {dep.id}: {dep_state.value})",
        ["device", "ok", "active", "previous", "error"],
        [(r["device"], r["ok"], r["active"], r["previous"], r["error"] or "") for r in rows])))
    result.raise_for_failures("rollback")
