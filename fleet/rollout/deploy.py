"""Deploy one package to many devices: status -> push (resumable) -> stage -> activate.

Each device's step is persisted at every state change, so an interrupted deployment can be
read back (and resumed) from the registry. Re-deploying a version a device already runs
sends nothing.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet.connect import open_device
from fleet.core import errors
from fleet.home import FleetHome
from fleet.registry import Device, Registry
from fleet.registry import history as hist
from fleet.rollout.execute import FanOut, Outcome, TaskContext
from fleet.rollout.plan import decide

__all__ = ["DeployJob", "DeviceResult", "run_deployment"]


@dataclass(frozen=True)
class DeployJob:
    name: str
    version: int
    kind: str
    package: Path
    package_sha256: str
    digest: str  # plaintext payload sha256
    size: int
    artifact_id: uuid.UUID | None = None
    bench: dict[str, Any] = field(default_factory=dict)
    activate: bool = True  #: False: push and stage (verified, kept encrypted) only


@dataclass
class DeviceResult:
    device: str
    status: str  # ok | staged | skipped | failed
    bytes_sent: int = 0
    report: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    reason: str = ""


def _deploy_one(home: FleetHome, reg: Registry, job: DeployJob, dev: Device,
                step_id: uuid.UUID, ctx: TaskContext) -> DeviceResult:
    hist.set_step(reg, step_id, "connecting", attempt=True, attempt_no=ctx.attempt + 1)
    transport, agent = open_device(home, dev)
    ctx.add_closer(transport.close)
    with transport:
        ctx.state("checking")
        status = agent.call("status", timeout=min(60.0, ctx.deadline.remaining()))
        reg.touch_device(dev.name, agent_version=status.get("agent_version"))
        action = decide((status.get("installed") or {}).get(job.name), name=job.name,
                        version=job.version, digest=job.digest)
        if action.kind == "skip":
            hist.set_step(reg, step_id, "skipped", reason=action.reason)
            return DeviceResult(dev.name, "skipped", reason=action.reason)
        if action.kind == "refuse":
            raise errors.RollbackError(f"{dev.name}: {action.reason}", device=dev.name)
        ctx.check()
        remote = f"{agent.root.rstrip('/')}/incoming/{job.package_sha256}.fpkg"
        hist.set_step(reg, step_id, "pushing", remote=remote)
        ctx.state("pushing")
        tr = transport.push(job.package, remote, resume=True, progress=ctx.bytes)
        hist.set_step(reg, step_id, "pushed", bytes_sent=tr.bytes_sent,
                      resumed_from=tr.resumed_from, sha256=tr.sha256)
        if tr.sha256 != job.package_sha256:
            raise errors.RemoteFileError(f"{dev.name}: pushed file digest differs",
                                         device=dev.name)
        ctx.check()
        ctx.state("staging")
        staged = agent.call("stage", {"path": remote}, timeout=ctx.deadline.remaining(30))
        hist.set_step(reg, step_id, "staged", version=staged.get("version"))
        if not job.activate:
            return DeviceResult(dev.name, "staged", bytes_sent=tr.bytes_sent,
                                reason="staged only (--no-activate)")
        ctx.check()
        ctx.state("activating")
        report = agent.call("activate", {"name": job.name, "version": job.version,
                                         **job.bench}, timeout=ctx.deadline.remaining(60))
        hist.set_step(reg, step_id, "activated")
        body = dict(report.get("report") or report)
        hist.add_report(reg, dev, "activate", body, deployment_id=_dep_id(reg, step_id))
        if body.get("probe"):
            hist.add_snapshot(reg, dev, body["probe"])
        hist.set_step(reg, step_id, "ok", bytes_sent=tr.bytes_sent)
        reg.touch_device(dev.name, status="ok")
        return DeviceResult(dev.name, "ok", bytes_sent=tr.bytes_sent, report=body)


def _dep_id(reg: Registry, step_id: uuid.UUID) -> uuid.UUID:
    from fleet.registry.models import DeploymentStep
    with reg.session() as s:
        st = s.get(DeploymentStep, step_id)
        assert st is not None
        return st.deployment_id


def run_deployment(home: FleetHome, reg: Registry, job: DeployJob, devices: list[Device], *,
                   target: str, workers: int = 8, deadline_s: float = 900.0,
                   retries: int = 2, on_bytes: Any = None, on_state: Any = None,
                   on_done: Any = None) -> tuple[uuid.UUID, list[DeviceResult]]:
    dep, steps = hist.create_deployment(reg, name=job.name, version=job.version, target=target,
                                        devices=devices, artifact_id=job.artifact_id,
                                        options={"workers": workers, "deadline_s": deadline_s})
    by_name = {d.name: d for d in devices}

    def task(dev: Device, ctx: TaskContext) -> DeviceResult:
        return _deploy_one(home, reg, job, dev, steps[dev.name].id, ctx)

    fan = FanOut(workers=workers, deadline_s=deadline_s, retries=retries, on_bytes=on_bytes,
                 on_state=on_state, on_done=on_done)
    outcomes: dict[str, Outcome[DeviceResult]] = fan.run(by_name, task)
    results = []
    for name in by_name:
        out = outcomes[name]
        if out.ok and out.result is not None:
            results.append(out.result)
            continue
        err = out.error or errors.FleetError("unknown failure")
        hist.set_step(reg, steps[name].id, "failed", error_code=err.code,
                      error_message=err.message, attempts=out.attempts)
        with contextlib.suppress(errors.FleetError):
            reg.touch_device(name, status="failed" if not isinstance(
                err, errors.TransportError) else "unreachable")
        results.append(DeviceResult(name, "failed", error=err.to_dict(), reason=err.message))
    hist.finish_deployment(reg, dep.id)
    return dep.id, results
