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
from fleet.cli._regressions import deploy_regressions, render_regressions
from fleet.cli._targets import DeviceOpt, GroupOpt, SelectorOpt, Targets
from fleet.cli.app import app
from fleet.core import errors
from fleet.enrollment import enroll_many
from fleet.home import FleetHome
from fleet.registry import Device, Registry, facts
from fleet.registry import history as hist
from fleet.registry.models import DeploymentKind, StepState
from fleet.rollout.deploy import DeployJob, DeployResult, holding, run_deployment
from fleet.rollout.fanout import DeviceOutcome, FleetResult, Remote, call_each
from fleet.rollout.interrupt import CtrlC
from fleet.rollout.lease import abandon, holder, reap_stale
from fleet.rollout.plan import WAVES_HELP, parse_waves
from fleet.rollout.rollback import rollback_task
from fleet.rollout.waves import run_waves
from fleet.worker.dispatch import dispatcher_for

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
DryRunOpt = Annotated[bool, typer.Option(
    "--dry-run", help="Check everything (options, model, conversion, golden data, targets, "
                      "waves) and print the plan per device; write nothing, contact no "
                      "device. Exit 17 when the plan refuses a device.")]
#: ``--variant`` values (fleet.artifacts.convert.VARIANTS, checked before any work)
VARIANTS = ("fp32", "fp16", "wq8", "wq4")


def check_variant(variant: str | None) -> None:
    """UsageError (exit 2) for an unknown ``--variant``, before anything is converted."""
    if variant is not None and variant not in VARIANTS:
        raise errors.UsageError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}",
                                variant=variant)


def render_plan(c: Console, doc: dict[str, Any]) -> None:
    """A dry run's plan (:meth:`fleet.rollout.plan.Plan.to_dict`) for people."""
    from fleet.cli._output import human_bytes

    pkg = doc.get("package") or {}
    size = pkg.get("size")
    about = f", {'~' if pkg.get('size_estimated') else ''}{human_bytes(size)} per device" \
        if size else ""
    c.print(table(f"dry run: {doc['command']} {doc['model']}{about} (nothing written, no "
                  "device contacted)",
                  ["device", "wave", "action", "version", "send", "why", "notes"],
                  [(d["device"], d["wave"] or "-", d["action"],
                    d["version"] if d["version"] is not None else "previous",
                    human_bytes(d["bytes"]) if d["bytes"] else "-", d["reason"],
                    "; ".join(d["notes"]) or "-") for d in doc["devices"]]))
    t = doc["totals"]
    waves = doc.get("waves")
    c.print(f"{t['devices']} device(s): {t['send']} send, {t['skip']} skip, {t['refuse']} "
            f"refuse; {human_bytes(t['bytes'])} to send"
            + (f"; {len(waves)} wave(s)" if waves else ""), markup=False, highlight=False)


def emit_plan(doc: dict[str, Any], *, as_json: bool) -> None:
    """Print a dry run's plan; PlanError (exit 17) when it refuses a device."""
    emit(doc, as_json=as_json, render=lambda c: render_plan(c, doc))
    refused = [d for d in doc["devices"] if d["action"] == "refuse"]
    if refused:
        raise errors.PlanError(
            f"dry run: {len(refused)} device(s) would be refused: "
            + "; ".join(f"{d['device']}: {d['reason']}" for d in refused[:5])
            + (" ..." if len(refused) > 5 else ""), devices=[d["device"] for d in refused])


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


def _findings(o: DeviceOutcome[DeployResult]) -> list[str]:
    """The rule ids the device's report found (sorted, no repeats)."""
    report = (o.result.report if o.result else None) or {}
    return sorted({f["id"] for f in report.get("findings") or [] if f.get("id")})


def result_rows(result: FleetResult[DeployResult], model: tuple[str, int | None] | None = None
                ) -> list[dict[str, Any]]:
    """One row per device: ``status`` is the stable word (``failed`` for every failure),
    ``outcome`` the exact :class:`DeviceStatus`; ``model``/``version`` what was deployed,
    ``findings`` a list of rule ids, ``error`` an object."""
    rows = []
    for o in result:
        rep = (o.result.report if o.result else None) or {}
        pick = rep.get("pick") or {}
        med, cpu = rep.get("median_ms"), rep.get("cpu_median_ms")
        rows.append({"device": o.device, "model": model[0] if model else None,
                     "version": model[1] if model else None,
                     "status": o.status.label, "outcome": o.status.value,
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
                    _bytes(r["bytes_sent"]),
                    (r["reason"] if r["status"] != "ok" and not r["findings"] else
                     ", ".join(r["findings"]) or "none")) for r in rows]))


def _bytes(n: int) -> str:
    from fleet.cli._output import human_bytes  # the one way sizes are written

    return human_bytes(n)


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
    group: GroupOpt = [],  # noqa: B006 (typer reads the default)
    device: DeviceOpt = [],  # noqa: B006
    selector: SelectorOpt = [],  # noqa: B006
    name: Annotated[str | None, typer.Option(help="Model name (default: file stem).")] = None,
    version: Annotated[int | None, typer.Option(min=1, help="Version (default: next).")
                       ] = None,
    variant: Annotated[str | None, typer.Option(help="fp16 | wq8 | wq4 (ONNX/TFLite)")] = None,
    golden: Annotated[Path | None, typer.Option(help="Golden reference .npz")] = None,
    entry: Annotated[str | None, typer.Option(help="Main file of a model folder.")] = None,
    input_shape: Annotated[list[str] | None, typer.Option(
        "--input-shape", help="NAME=D0,D1,.. for an input with dynamic dims (repeat).")
                           ] = None,
    inputs: Annotated[Path | None, typer.Option(
        help="Sample inputs (.npz) for the conversion check and the golden data.")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Devices in parallel.")] = 8,
    deadline: Annotated[float, typer.Option(min=1.0, help="Seconds per device.")] = 900.0,
    retries: Annotated[int, typer.Option(min=0, help="Retries of transient errors.")] = 2,
    iterations: Annotated[int, typer.Option(min=1, help="Benchmark iterations.")] = 10,
    warmup: Annotated[int, typer.Option(min=0, help="Benchmark warm-up runs.")] = 3,
    activate: Annotated[bool, typer.Option(
        "--activate/--no-activate",
        help="--no-activate: push and stage only (verified, kept encrypted).")] = True,
    waves: Annotated[str | None, typer.Option(
        help="Roll out in waves with a health gate after each and automatic rollback when "
             f"it fails: {WAVES_HELP}.")] = None,
    max_failed: Annotated[int, typer.Option(
        min=0, help="Failed devices a wave may have before the rollout halts and rolls back.")
                          ] = 0,
    dry_run: DryRunOpt = False,
    wait: Annotated[bool, typer.Option(
        "--wait", help="Pull devices: follow the rollout until every device reported "
                       "(or --deadline seconds passed); without it deploy returns once "
                       "the desired state is written.")] = False,
    window: Annotated[str | None, typer.Option(
        help="Pull devices: install only inside this device-local window, HH:MM-HH:MM "
             "(e.g. 02:00-04:00; downloads may happen before).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Package MODEL for the targets, push it to each in parallel, stage, activate, report.

    Ctrl-C stops starting devices and lets those in flight reach a safe point, prints the
    partial table and exits 130 with the deployment interrupted (`fleet deployment
    resume ID` carries it on); a second Ctrl-C within 2 s stops at once. Every option is
    checked before any work (exit 2); --dry-run stops after the checks with the plan.

    Examples:

    \b
      fleet deploy models/tiny/tiny.mnn -g phones
      fleet deploy model.onnx -g phones --dry-run
      fleet deploy model.onnx -l hw.arch=arm64 --variant wq8 --waves 1,25%,100%
      fleet deploy tiny.fpkg -d pixel7 --json | jq '.results[].status'
    """
    tg = Targets.parse(group, device, selector)
    check_variant(variant)
    if waves:
        parse_waves(waves)
    if window is not None:
        from fleet.core.pull import parse_window

        parse_window(window)
    home = state().home
    reg = Registry.open(home)
    devs = tg.resolve(reg)
    if window is not None and not all(d.uri.startswith("pull://") for d in devs):
        raise errors.UsageError("--window is for pull devices (pull://) only")
    if dry_run:
        from fleet.rollout.dryrun import DeployRequest, preview_deploy

        plan = preview_deploy(home, reg, DeployRequest(
            model, name=name, version=version, variant=variant, golden=golden, entry=entry,
            input_shape=tuple(input_shape or ()), inputs=inputs, activate=activate,
            waves=waves), devs, say=lambda m: err.print(m, highlight=False, markup=False))
        emit_plan(plan.to_dict() | {"targets": tg.to_dict()}, as_json=as_json)
        return
    if any(d.uri.startswith("pull://") for d in devs):  # pull mode: desired state
        from fleet.cli._pull_deploy import deploy_pull

        deploy_pull(home, reg, model, devs, tg, lambda ready: package_job(
            home, reg, model, ready, name=name, version=version, variant=variant,
            golden=golden, entry=entry, bench={"iterations": iterations, "warmup": warmup},
            activate=activate, input_shape=input_shape, inputs=inputs),
            waves=waves, max_failed=max_failed, wait=wait, deadline=deadline,
            as_json=as_json, window=window)
        return
    reap_stale(reg)
    ctl = ctrl_c(reg)
    job: DeployJob | None = None
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
                with fanout_progress(len(ready)) as prog:
                    kw: dict[str, Any] = {"workers": workers, "deadline_s": deadline,
                                          "retries": retries, "on_bytes": prog.on_bytes,
                                          "on_state": prog.on_state, "on_done": prog.on_done,
                                          "cancel": ctl.cancel, "on_created": ctl.created}
                    if waves:
                        outcome = run_waves(home, reg, job, ready, spec=waves,
                                            max_failed=max_failed, target=tg.describe(),
                                            say=lambda m: err.print(m, highlight=False), **kw)
                        res, deployment_id = outcome.result, outcome.deployments[-1]
                        halted = outcome.halted_at
                    else:
                        deployment_id, res = run_deployment(home, reg, job, ready,
                                                            target=tg.describe(), **kw)
                results.extend(res)
        except KeyboardInterrupt:
            err.print("interrupted", highlight=False)
            raise typer.Exit(130) from None
    finish_command(reg, "deploy", model.name, deployment_id, results, [d.name for d in devs],
                   as_json=as_json, stopped=ctl.fired,
                   model=(job.name, job.version) if job else None,
                   extra={"halted_at_wave": halted, "targets": tg.to_dict()})


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
                   stopped: bool, model: tuple[str, int | None] | None = None,
                   extra: dict[str, Any] | None = None) -> None:
    """Print the (partial) table with the deployment's state; exit 130 after a Ctrl-C,
    else the fan-out's exit rule. ``model``: (name, version) deployed, None when nothing
    was packaged (no device was ready)."""
    results = results.sorted_by(order)
    rows = result_rows(results, model)
    dep_state = (hist.get_deployment(reg, deployment_id).status.value
                 if deployment_id else None)
    ref = f"{model[0]}@{model[1]}" if model else None
    # -- FA-regression (helper 15C: fleet.cli._regressions) --
    regs = deploy_regressions(reg, [o.device for o in results if o.ok], model)
    data = {"deployment": deployment_id, "state": dep_state, "model": ref,
            "name": model[0] if model else None, "version": model[1] if model else None,
            "results": rows, "failed": len(results.failed), "regressions": regs,
            **(extra or {})}

    def render(c: Console) -> None:
        render_results(c, f"{what} {ref or title} (deployment {deployment_id}: {dep_state})",
                       rows)
        render_regressions(c, regs)

    emit(data, as_json=as_json, render=render)
    if stopped:
        if deployment_id and dep_state == "interrupted":
            err.print(f"interrupted: `fleet deployment resume {deployment_id}` carries it on",
                      highlight=False)
        raise typer.Exit(130)
    results.raise_for_failures(what)


@app.command("rollback")
def rollback(
    name: str,
    group: GroupOpt = [],  # noqa: B006
    device: DeviceOpt = [],  # noqa: B006
    selector: SelectorOpt = [],  # noqa: B006
    to: Annotated[int | None, typer.Option(
        min=1, help="Go to this version with a signed rollback order (else: the previous "
                    "slot).")] = None,
    dry_run: DryRunOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Switch NAME back on the targets: to the previous slot, or to --to VERSION.

    Recorded as a deployment of kind rollback (`fleet deployment list/show`), linked to
    the deploy of NAME it reverts. --dry-run: the plan from what each device last
    reported (its active and previous versions), nothing signed or sent.

    Examples:

    \b
      fleet rollback tiny -g phones
      fleet rollback tiny -d pixel7 --to 1
    """
    tg = Targets.parse(group, device, selector)
    home = state().home
    reg = Registry.open(home)
    devs = tg.resolve(reg)
    if dry_run:
        from fleet.rollout.dryrun import preview_rollback

        emit_plan(preview_rollback(home, reg, name, devs, to=to).to_dict()
                  | {"targets": tg.to_dict()}, as_json=as_json)
        return
    if any(d.uri.startswith("pull://") for d in devs):  # pull mode: desired state
        from fleet.cli._pull_deploy import rollback_pull

        rollback_pull(home, reg, name, devs, tg, to=to, as_json=as_json)
        return
    reap_stale(reg)
    order = None
    if to is not None:
        from fleet.artifacts.trust import sign_order  # registry counter + expiry
        order = sign_order(home, reg, name=name, version=to,
                           devices=[d.fingerprint for d in devs if d.fingerprint])
    who = holder()
    reverts = hist.last_deployment_of(reg, name, devs)
    dep, steps = hist.create_deployment(
        reg, name=name, version=to, target=tg.describe(), devices=devs,
        artifact_id=None, kind=DeploymentKind.ROLLBACK, lease=who,
        reverts_id=reverts.id if reverts else None, options={"to": to})

    ids = {n: st.id for n, st in steps.items()}
    task = rollback_task(home, reg, name, order, to, ids)
    # devices behind a farm host run this step on its worker (fleet.worker)
    remote = Remote("rollback", {"name": name, "order": order, "to": to,
                                 "deployment": str(dep.id), "holder": list(who)},
                    each={n: {"step": str(i)} for n, i in ids.items()},
                    decode=RollbackResult.from_doc)
    with holding(reg, dep.id, who, cancel=threading.Event()):
        result = call_each(devs, task, deadline_s=120, remote=remote,
                           dispatcher=dispatcher_for(home, reg))
        for o in result.failed:
            e = o.error or errors.FleetError("unknown failure")
            hist.set_step(reg, steps[o.device].id, StepState.FAILED, error_code=e.code,
                          error_message=e.message)
        dep_state = hist.finish_deployment(reg, dep.id, lease=who)
    by_name = {d.name: d for d in devs}
    for o in result:
        if o.ok and o.result is not None:  # selectors' model.NAME follows the switch
            facts.record_rollback(reg, by_name[o.device].id, name, o.result.current,
                                  o.result.previous)
    rows: list[dict[str, Any]] = [{"device": o.device, "model": name,
             "version": o.result.current if o.result else None, "ok": o.ok,
             "status": o.status.label,
             "active": o.result.current if o.result else None,
             "previous": o.result.previous if o.result else None,
             "error": o.error.to_dict() if o.error else None, "deployment": dep.id,
             "reverts": reverts.id if reverts else None} for o in result]
    emit(rows, as_json=as_json, render=lambda c: c.print(table(
        f"rollback {name} (deployment {dep.id}: {dep_state.value})",
        ["device", "status", "active", "previous", "error"],
        [(r["device"], r["status"], r["active"] if r["active"] is not None else "-",
          r["previous"] if r["previous"] is not None else "-",
          (r["error"] or {}).get("message", "")) for r in rows])))
    result.raise_for_failures("rollback")
