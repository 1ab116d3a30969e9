"""``fleet deploy`` and ``fleet rollback``: package, push in parallel, activate, report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from fleet.cli._ctx import state
from fleet.cli._exit import PARTIAL_FAILURE
from fleet.cli._output import emit, err, table
from fleet.cli._progress import fanout_progress
from fleet.cli.app import app
from fleet.cli.cmd_device import enroll_device
from fleet.connect import open_device
from fleet.core import errors
from fleet.home import FleetHome
from fleet.registry import Device, Registry
from fleet.rollout.deploy import DeviceResult, run_deployment
from fleet.rollout.execute import FanOut, TaskContext
from fleet.rollout.packaging import prepare_job

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def targets(reg: Registry, group: list[str], device: list[str]) -> list[Device]:
    if not group and not device:
        raise errors.UsageError("name the targets: --group G and/or --device D")
    devs = reg.resolve_targets(groups=group, devices=device)
    if not devs:
        raise errors.UsageError(f"no devices in {', '.join(group + device)}")
    return devs


def enroll_missing(home: FleetHome, reg: Registry, devs: list[Device], workers: int
                   ) -> tuple[list[Device], list[DeviceResult]]:
    """Enroll devices that have no key yet (in parallel); return (ready, failed)."""
    todo = {d.name: d for d in devs if not d.public_key}
    failed: list[DeviceResult] = []
    if todo:
        err.print(f"enrolling {len(todo)} device(s): {', '.join(todo)}", highlight=False)

        def task(dev: Device, ctx: TaskContext) -> None:
            enroll_device(reg, dev.name)

        for name, out in FanOut(workers=workers, deadline_s=120).run(todo, task).items():
            if not out.ok and out.error is not None:
                failed.append(DeviceResult(name, "failed", error=out.error.to_dict(),
                                           reason=f"enroll: {out.error.message}"))
    bad = {f.device for f in failed}
    ready = [reg.get_device(d.name) for d in devs if d.name not in bad]
    return ready, failed


def _findings(r: DeviceResult) -> str:
    if r.status == "failed":
        return r.reason
    found = (r.report or {}).get("findings") or []
    return ", ".join(sorted({f["id"] for f in found})) or "none"


def result_rows(results: list[DeviceResult]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        rep = r.report or {}
        pick = rep.get("pick") or {}
        med, cpu = rep.get("median_ms"), rep.get("cpu_median_ms")
        rows.append({"device": r.device, "status": r.status, "backend": pick.get("label"),
                     "effective_backend": pick.get("effective_backend"), "median_ms": med,
                     "cpu_median_ms": cpu, "vs_cpu": round(cpu / med, 3) if med and cpu
                     else None, "bytes_sent": r.bytes_sent, "findings": _findings(r),
                     "error": r.error, "reason": r.reason})
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


@app.command("deploy")
def deploy(
    model: Annotated[Path, typer.Argument(help=".mnn, .onnx, .tflite or a built .fpkg")],
    group: Annotated[list[str], typer.Option("--group", "-g")] = [],  # noqa: B006
    device: Annotated[list[str], typer.Option("--device", "-d")] = [],  # noqa: B006
    name: Annotated[str | None, typer.Option(help="Model name (default: file stem).")] = None,
    version: Annotated[int | None, typer.Option(help="Version (default: next).")] = None,
    variant: Annotated[str | None, typer.Option(help="fp16 | wq8 | wq4 (ONNX/TFLite)")] = None,
    golden: Annotated[Path | None, typer.Option(help="Golden reference .npz")] = None,
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
    """Package MODEL for the targets, push it to each in parallel, stage, activate, report."""
    home = state().home
    reg = Registry.open(home)
    devs = targets(reg, group, device)
    ready, failed = enroll_missing(home, reg, devs, workers)
    results: list[DeviceResult] = list(failed)
    deployment_id = None
    halted: int | None = None
    if ready:
        job = prepare_job(home, reg, model, ready, name=name, version=version,
                          variant=variant, golden=golden,
                          progress=lambda m: err.print(m, highlight=False),
                          bench={"iterations": iterations, "warmup": warmup},
                          activate=activate)
        err.print(f"deploying {job.name}@{job.version} ({_bytes(job.size)}) to "
                  f"{len(ready)} device(s)", highlight=False)
        with fanout_progress() as prog:
            kw: dict[str, Any] = {"workers": workers, "deadline_s": deadline,
                                  "retries": retries, "on_bytes": prog.on_bytes,
                                  "on_state": prog.on_state, "on_done": prog.on_done}
            if waves:
                from fleet.rollout.waves import run_waves
                outcome = run_waves(home, reg, job, ready, spec=waves, max_failed=max_failed,
                                    target=",".join(group + device),
                                    say=lambda m: err.print(m, highlight=False), **kw)
                res, deployment_id = outcome.results, outcome.deployments[-1]
                halted = outcome.halted_at
            else:
                deployment_id, res = run_deployment(home, reg, job, ready,
                                                    target=",".join(group + device), **kw)
        results.extend(res)
    order = {d.name: i for i, d in enumerate(devs)}
    results.sort(key=lambda r: order.get(r.device, 0))
    rows = result_rows(results)
    data = {"deployment": deployment_id, "results": rows, "halted_at_wave": halted,
            "failed": sum(1 for r in rows if r["status"] not in ("ok", "staged", "skipped"))}
    emit(data, as_json=as_json, render=lambda c: render_results(
        c, f"deploy {model.name} (deployment {deployment_id})", rows))
    if data["failed"]:
        raise typer.Exit(PARTIAL_FAILURE)


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
    """Switch NAME back on the targets: to the previous slot, or to --to VERSION."""
    home = state().home
    reg = Registry.open(home)
    devs = targets(reg, group, device)
    order = None
    if to is not None:
        from fleet.artifacts import load_signing_key
        from fleet.core.package.orders import sign_rollback_order
        order = sign_rollback_order(load_signing_key(home), name=name, version=to,
                                    devices=[d.fingerprint for d in devs if d.fingerprint])

    def task(dev: Device, ctx: TaskContext) -> dict[str, Any]:
        transport, agent = open_device(home, dev)
        ctx.add_closer(transport.close)
        with transport:
            return agent.call("rollback", {"name": name, "order": order},
                              timeout=ctx.deadline.remaining(30))

    outs = FanOut(deadline_s=120).run({d.name: d for d in devs}, task)
    rows = [{"device": n, "ok": o.ok, "active": (o.result or {}).get("current"),
             "previous": (o.result or {}).get("previous"),
             "error": o.error.message if o.error else None} for n, o in outs.items()]
    emit(rows, as_json=as_json, render=lambda c: c.print(table(
        f"rollback {name}", ["device", "ok", "active", "previous", "error"],
        [(r["device"], r["ok"], r["active"], r["previous"], r["error"] or "") for r in rows])))
    if any(not r["ok"] for r in rows):
        raise typer.Exit(PARTIAL_FAILURE)
