"""What a farm worker runs: one device's part of a fan-out, rebuilt from its task.

Each kind maps to the very function the controller runs in-process (nothing is forked):

==================  ==========================================================  =========
kind                task (controller module)                                   result
==================  ==========================================================  =========
deploy              :meth:`fleet.rollout.deploy.Run.device_task`                DeployResult
rollback            :func:`fleet.rollout.rollback.rollback_task`                RollbackResult
rollback.previous   :func:`fleet.rollout.waves.previous_slot_task`              RollbackResult
audit               :func:`fleet.audit.collect.audit_task`                      dict
lora                :func:`fleet.rollout.lora_push.lora_task`                   dict
enroll              :func:`fleet.enrollment.enroll`                             EnrollResult
==================  ==========================================================  =========

:func:`run_payload` runs one: the device from the registry, the task from its kind, and
:func:`fleet.rollout.fanout.call_each` for that one device (its deadline watchdog,
retries of retryable errors and cancel event, as in the controller), under the
:class:`~fleet.worker.watch.CancelWatch`. A deployment's task (deploy, rollback) runs
only while its deployment is ``running`` under the controller that sent it (the lease
holder), and never touches a step that is already finished (its recorded outcome is the
answer): a task delivered again after its worker died re-enters the reconcile table,
whose decision comes from the agent's ``status`` (skip what is active, resume a partial
push, record an activation that finished unwatched), so it is idempotent.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from sqlmodel import col, select

from fleet.audit.collect import audit_task
from fleet.connect import device_session
from fleet.core import errors
from fleet.enrollment import enroll
from fleet.home import FleetHome
from fleet.registry import Device, Registry
from fleet.registry import history as hist
from fleet.registry.models import Deployment, DeploymentState, DeploymentStep, StepState
from fleet.rollout.deploy import DeployJob, DeployResult, Opener, Run, recorded
from fleet.rollout.fanout import DeviceOutcome, DeviceStatus, TaskContext, call_each, status_for
from fleet.rollout.lora_push import lora_task
from fleet.rollout.rollback import rollback_task
from fleet.rollout.waves import previous_slot_task
from fleet.worker import artifacts
from fleet.worker.app import TASK_NAME
from fleet.worker.progress import BytesReporter
from fleet.worker.settings import FarmSettings
from fleet.worker.watch import CancelWatch, Check
from fleet.worker.wire import outcome_doc

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["HANDLERS", "Handler", "Job", "WorkerContext", "register", "run_payload"]

Task = Callable[[Device, TaskContext], Any]


@dataclass
class Job:
    """What a handler gets to build one device's task."""

    home: FleetHome
    reg: Registry
    settings: FarmSettings
    args: dict[str, Any]
    device: Device
    cancel: threading.Event
    opener: Opener | None = None
    #: checks the watch runs every few seconds while the task runs (False: stop it)
    checks: list[Check] = field(default_factory=list)


@dataclass(frozen=True)
class Handler:
    """``build`` gives the device's task, or its outcome when the registry already has
    it (a task delivered again after it ended); ``encode`` its result as JSON."""

    build: Callable[[Job], Task | DeviceOutcome[Any]]
    encode: Callable[[Any], Any]


def _as_is(value: Any) -> Any:
    return value


def _held(job: Job, dep: Deployment | None = None) -> Deployment:
    """The deployment this task belongs to (``dep``: as just read), checked to be running
    under the lease holder that sent it (now, and again by the watch while it runs)."""
    dep_id = uuid.UUID(str(job.args["deployment"]))
    who = tuple(job.args["holder"])

    def holds(dep: Deployment) -> bool:
        return dep.status is DeploymentState.RUNNING and (dep.lease_host,
                                                          dep.lease_pid) == who

    dep = dep if dep is not None else hist.get_deployment(job.reg, dep_id)
    if not holds(dep):
        raise errors.RolloutCancelledError(
            f"{job.device.name}: deployment {dep_id} is no longer running under the "
            "controller that sent this task; nothing done", device=job.device.name)
    job.checks.append(lambda: holds(hist.get_deployment(job.reg, dep_id)))
    return dep


def _step(job: Job) -> DeploymentStep:
    step_id = uuid.UUID(str(job.args["step"]))
    with job.reg.reading() as s:
        st = s.get(DeploymentStep, step_id)
    if st is None:
        raise errors.NotFoundError(f"no deployment step {step_id}", step=str(step_id))
    return st


def _step_and_deployment(job: Job) -> tuple[DeploymentStep, Deployment]:
    """The task's step and its deployment in one query; NotFoundError when the step is
    gone or is not the task's deployment's."""
    step_id = uuid.UUID(str(job.args["step"]))
    dep_id = uuid.UUID(str(job.args["deployment"]))
    with job.reg.reading() as s:
        row = s.exec(select(DeploymentStep, Deployment)
                     .join(Deployment, col(Deployment.id) == col(DeploymentStep.deployment_id))
                     .where(DeploymentStep.id == step_id)
                     .where(DeploymentStep.deployment_id == dep_id)).first()
    if row is None:
        raise errors.NotFoundError(f"no step {step_id} in deployment {dep_id}",
                                   step=str(step_id), deployment=str(dep_id))
    return row[0], row[1]


def _deploy(job: Job) -> Task | DeviceOutcome[Any]:
    st, dep = _step_and_deployment(job)
    _held(job, dep)
    doc = dict(dep.options.get("job") or {})
    staged_only = not bool(doc.get("activate", True))
    if st.state.terminal or (staged_only and st.state is StepState.STAGED):
        # delivered again after it ended (its first worker died before the ack): what
        # the registry recorded is the outcome; nothing is done twice
        return recorded(job.device.name, st)
    doc["package"] = str(artifacts.fetch(job.settings, str(job.args["package"]),
                                         doc.get("package_sha256")))
    run = Run(job.home, job.reg, dep.id, DeployJob.from_options(doc),
              {job.device.name: job.device}, job.cancel, job.opener)
    return lambda dev, ctx: run.device_task(dev, ctx, st.id, st.state)


def _rollback(job: Job) -> Task | DeviceOutcome[Any]:
    _held(job)
    st = _step(job)
    if st.state.terminal:
        err = (errors.error_from_code(st.error_code, st.error_message or st.error_code)
               if st.error_code else None)
        return DeviceOutcome(job.device.name, DeviceStatus.OK if st.state is StepState.OK
                             else DeviceStatus.FAILED, error=err,
                             reason=f"{st.state.value} (recorded)", attempts=st.attempts)
    step_id = st.id
    to = job.args.get("to")
    return rollback_task(job.home, job.reg, str(job.args["name"]), job.args.get("order"),
                         int(to) if to is not None else None, {job.device.name: step_id},
                         opener=job.opener)


def _session(job: Job) -> Opener:
    if job.opener is not None:
        return job.opener
    return lambda dev, ctx: device_session(job.home, dev, ctx)


def _previous_slot(job: Job) -> Task:
    return previous_slot_task(str(job.args["name"]), _session(job))


def _audit(job: Job) -> Task:
    return audit_task(job.home, job.opener)


def _lora(job: Job) -> Task:
    key = job.args.get("pack")
    pack = (artifacts.fetch(job.settings, str(key), job.args.get("pack_sha256")) if key
            else None)
    return lora_task(job.home, job.reg, str(job.args["verb"]), dict(job.args["args"] or {}),
                     pack=pack, pack_sha256=job.args.get("pack_sha256"), opener=job.opener)


def _enroll(job: Job) -> Task:
    if job.opener is not None:
        raise errors.UsageError("enroll runs on real transports only")
    return lambda dev, ctx: enroll(job.home, job.reg, dev, ctx)


#: task kind -> how a worker builds it and how its result travels back
HANDLERS: dict[str, Handler] = {
    "deploy": Handler(_deploy, DeployResult.to_doc),
    "rollback": Handler(_rollback, asdict),
    "rollback.previous": Handler(_previous_slot, asdict),
    "audit": Handler(_audit, _as_is),
    "lora": Handler(_lora, _as_is),
    "enroll": Handler(_enroll, asdict),
}


@dataclass
class WorkerContext:
    """One worker process: its home, registry, settings, node name and watch;
    ``handlers`` may add kinds (a benchmark's fake transport does)."""

    home: FleetHome
    reg: Registry
    settings: FarmSettings
    node: str
    watch: CancelWatch
    handlers: dict[str, Handler] = field(default_factory=lambda: dict(HANDLERS))
    opener: Opener | None = None
    #: forwards pushes' progress to the controller (None: not reported)
    progress: BytesReporter | None = None


def run_payload(wc: WorkerContext, payload: dict[str, Any]) -> dict[str, Any]:
    """Run one farm task (``fleet.worker.dispatch.task_payload``); its outcome document
    (:mod:`fleet.worker.wire`). Never raises a FleetError: a failure is an outcome."""
    name = str(payload["device"])
    cancel = threading.Event()
    handler = wc.handlers.get(str(payload.get("kind")))

    def failed(err: errors.FleetError) -> dict[str, Any]:
        out: DeviceOutcome[Any] = DeviceOutcome(name, status_for(err), error=err,
                                                reason=err.message, attempts=0)
        return outcome_doc(out, _as_is, worker=wc.node)

    if handler is None:
        return failed(errors.UsageError(f"{name}: this worker does not know task kind "
                                        f"{payload.get('kind')!r} (upgrade it)"))
    checks: list[Check] = []
    with wc.watch.watching(str(payload.get("cancel") or ""), cancel, checks):
        if cancel.is_set():
            return failed(errors.RolloutCancelledError(
                f"{name}: cancelled before it started", device=name))
        try:
            dev = wc.reg.get_device(name)
            job = Job(wc.home, wc.reg, wc.settings, dict(payload.get("args") or {}), dev,
                      cancel, wc.opener)
            built = handler.build(job)
        except errors.FleetError as exc:
            return failed(exc)
        if isinstance(built, DeviceOutcome):
            return outcome_doc(built, handler.encode, worker=wc.node)
        checks.extend(job.checks)
        token = str(payload.get("cancel") or "")
        result = call_each({name: dev}, built, workers=1,
                           deadline_s=float(payload["deadline_s"]),
                           retries=int(payload.get("retries", 0)),
                           grace_s=float(payload.get("grace_s", 5.0)), cancel=cancel,
                           on_bytes=wc.progress.for_fanout(token) if wc.progress else None)
    out = result[name]
    if out.status is DeviceStatus.CANCELLED and out.error is None:
        out.error = errors.RolloutCancelledError(f"{name}: cancelled", device=name)
    return outcome_doc(out, handler.encode, worker=wc.node)


def register(app: Celery, wc: WorkerContext) -> None:
    """Register the one Celery task on ``app``, bound to this worker process."""
    @app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
    def device_task(self: Any, payload: dict[str, Any]) -> dict[str, Any]:
        return run_payload(wc, payload)
