"""Deploy one package to many devices: status -> push (resumable) -> stage -> activate.

Each device's step is persisted at every state change, and what to do with a device is
the reconcile table's decision (:func:`fleet.rollout.reconcile.next_action`) from its
step and its agent's ``status``, so a fresh deploy and a resume run the same code.
Re-deploying a version a device already runs sends nothing.

Stopping: the fan-out's ``cancel`` event (the first Ctrl-C, a cancel, a lost lease) stops
new devices from starting; a device in flight stops at its next safe point (before a
push, inside a push: the partial upload stays and resumes later, before an activation)
with :class:`RolloutCancelledError`, its step left where it got to. An activation under
way runs to its end (the agent finishes it regardless) and is recorded.

Test hook: ``FLEET_TEST_KILL_AT=<point>`` makes the controller SIGKILL itself at
``packaged`` (deployment recorded, no device started), ``pushing`` (first bytes of the
first push written), ``staged`` (first stage recorded), ``activating`` (the first agent
activation has started: its process is running), or ``activated`` (the first activation
answered, nothing recorded yet). Inert unless set; ``tests/test_controller_crash.py``
uses it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fleet.agent_client import AgentClient
from fleet.artifacts.envelopes import envelope_for
from fleet.connect import device_session
from fleet.core import errors
from fleet.core.fsutil import room_needed
from fleet.home import FleetHome
from fleet.registry import Device, Registry
from fleet.registry import history as hist
from fleet.registry.models import DeploymentStep, StepState
from fleet.rollout.fanout import (
    DeviceOutcome,
    DeviceStatus,
    FleetResult,
    Remote,
    TaskContext,
    call_each,
)
from fleet.rollout.lease import Heartbeat, Holder, LeaseConfig, abandon, holder
from fleet.rollout.reconcile import Do, Goal, Observed, next_action, observe
from fleet.rollout.steplog import StepLog
from fleet.worker.dispatch import CeleryDispatcher, dispatcher_for

__all__ = ["KILL_ENV", "DeployJob", "DeployResult", "Opener", "Run", "holding", "kill_point",
           "recorded", "run_deployment"]

#: ``opener(device, ctx)`` -> a context manager yielding the device's agent client; the
#: default is :func:`fleet.connect.device_session` (tests pass in-memory fakes).
Opener = Callable[[Device, TaskContext], AbstractContextManager[AgentClient]]
KILL_ENV = "FLEET_TEST_KILL_AT"


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

    @property
    def goal(self) -> Goal:
        return Goal.ACTIVE if self.activate else Goal.STAGED

    def to_options(self) -> dict[str, Any]:
        """What a resume needs to rebuild this job (kept in ``Deployment.options``)."""
        doc = asdict(self)
        doc["package"] = str(self.package)
        doc["artifact_id"] = str(self.artifact_id) if self.artifact_id else None
        return doc

    @classmethod
    def from_options(cls, doc: dict[str, Any]) -> DeployJob:
        return cls(name=doc["name"], version=int(doc["version"]), kind=doc["kind"],
                   package=Path(doc["package"]), package_sha256=doc["package_sha256"],
                   digest=doc["digest"], size=int(doc["size"]),
                   artifact_id=uuid.UUID(doc["artifact_id"]) if doc.get("artifact_id")
                   else None, bench=dict(doc.get("bench") or {}),
                   activate=bool(doc.get("activate", True)))


@dataclass(frozen=True)
class DeployResult:
    """What one device's deployment produced (its status is the outcome's)."""

    bytes_sent: int = 0
    report: dict[str, Any] | None = None

    def to_doc(self) -> dict[str, Any]:
        """As a farm task returns it (fleet.worker.wire)."""
        return asdict(self)

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> DeployResult:
        return cls(bytes_sent=int(doc.get("bytes_sent") or 0), report=doc.get("report"))


# -- the test hook -------------------------------------------------------------------------
_fired: set[str] = set()


def kill_point(point: str) -> None:
    """SIGKILL this process the first time ``point`` is reached, if ``$FLEET_TEST_KILL_AT``
    names it (a test hook; see the module docstring)."""
    if os.environ.get(KILL_ENV) != point or point in _fired:
        return
    _fired.add(point)
    if point == "activating":  # wait until the agent's activate process really runs
        threading.Thread(target=_kill_when_child_runs, args=("activate",), daemon=True).start()
        return
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_when_child_runs(word: str) -> None:
    me = os.getpid()
    for _ in range(12000):  # up to about two minutes; the hook is for tests only
        for kids in Path(f"/proc/{me}/task").glob("*/children"):
            for pid in kids.read_text().split():
                with contextlib.suppress(OSError):
                    if word.encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                        os.kill(me, signal.SIGKILL)
        time.sleep(0.01)


# -- one device ----------------------------------------------------------------------------
def _stop_if(cancel: threading.Event, dev: str, before: str) -> None:
    if cancel.is_set():
        raise errors.RolloutCancelledError(
            f"{dev}: stopped before {before} (interrupted); `fleet deployment resume` "
            "continues it", device=dev)


def _read_report(agent: AgentClient, job: DeployJob, timeout: float) -> dict[str, Any]:
    """The finished activation's report, as the agent keeps it (``audit`` summarises the
    active version's stored health report); never fails the step."""
    base = {"name": job.name, "version": job.version, "digest": job.digest,
            "recovered": True}
    try:
        doc = agent.audit(job.name, timeout=timeout)
    except errors.FleetError as exc:
        return base | {"report_error": f"{exc.code}: {exc.message}"}
    for m in doc.get("models") or []:
        if m.get("name") == job.name and m.get("version") == job.version:
            return dict(m) | {"recovered": True, "source": "audit"}
    return base | {"report_error": "the agent has no report for the active version"}


@dataclass
class _Device:
    reg: Registry
    job: DeployJob
    dev: Device
    agent: AgentClient
    dep_id: uuid.UUID
    step_id: uuid.UUID
    ctx: TaskContext
    cancel: threading.Event
    log: StepLog  #: this step's writes, flushed at the safe points (fleet.rollout.steplog)

    def run(self, state: StepState) -> DeployResult:
        job, ctx, log = self.job, self.ctx, self.log
        ctx.state("connecting")  # the status round trip is the first contact
        status = self.agent.status(timeout=min(60.0, ctx.deadline.remaining()))
        log.contact(agent_version=status.agent_version)
        log.status_facts(status.doc)  # what --dry-run plans from
        seen = observe(status.installed.get(job.name), version=job.version, digest=job.digest)
        act = next_action(state, seen, goal=job.goal)
        if act.do is Do.REFUSE:
            raise errors.PlanError(f"{self.dev.name}: {act.reason}", device=self.dev.name,
                                   model=job.name)
        if act.do in (Do.SKIP, Do.NOTHING):
            log.move(StepState.SKIPPED, reason=act.reason)
            ctx.finish_as(DeviceStatus.SKIPPED, act.reason)
            return DeployResult()
        if act.do is Do.RECORD_STAGED:
            log.move(StepState.STAGED, done=True, observed=True)
            ctx.finish_as(DeviceStatus.STAGED, "staged (found on the device)")
            return DeployResult()
        if act.do is Do.RECORD_ACTIVE:
            body = _read_report(self.agent, job, ctx.deadline.remaining(30))
            log.activation(body, deployment_id=self.dep_id, bytes_sent=None, recovered=True)
            log.contact(status="ok")
            return DeployResult(report=body)
        if act.do is Do.ACTIVATE:
            if act.record is not None:
                log.move(act.record, observed=True, reason=act.reason)
            return self.activate(None)
        try:
            sent = self.push_and_stage(status.doc)
        except errors.ReplayError:
            # another run (a concurrent deploy of this package) installed it meanwhile:
            # the agent's status decides again, as on a resume
            again = self.agent.status(timeout=min(60.0, ctx.deadline.remaining()))
            seen = observe(again.installed.get(job.name), version=job.version,
                           digest=job.digest)
            if seen.observed is Observed.ACTIVE:
                reason = "installed meanwhile by another run"
                log.move(StepState.SKIPPED, reason=reason)
                ctx.finish_as(DeviceStatus.SKIPPED, reason)
                return DeployResult()
            if seen.observed is not Observed.STAGED:
                raise
            log.move(StepState.STAGED, observed=True, done=not job.activate,
                     reason="staged by another run")
            if not job.activate:
                ctx.finish_as(DeviceStatus.STAGED, "staged by another run")
                return DeployResult()
            return self.activate(None)
        if not job.activate:
            ctx.finish_as(DeviceStatus.STAGED, "staged only (--no-activate)")
            return DeployResult(bytes_sent=sent)
        return self.activate(sent)

    def push_and_stage(self, status_doc: dict[str, Any]) -> int:
        job, ctx, log, name = self.job, self.ctx, self.log, self.dev.name
        free = (status_doc.get("disk") or {}).get("free")
        need = room_needed(job.package.stat().st_size)
        if isinstance(free, int) and free < need:  # refuse before sending anything
            raise errors.DiskFullError(f"{name}: {free} bytes free, the package needs "
                                       f"{need}; nothing sent", device=name, free=free,
                                       needed=need)
        # This device's key envelope (format 2) travels with its stage request; a device
        # the package was not made for fails here, before a byte is sent.
        envelope = envelope_for(job.package, self.dev.fingerprint, name)
        ctx.check()
        _stop_if(self.cancel, name, "its push")
        log.move(StepState.PUSHING, remote=self.agent.incoming_path(job.package_sha256))
        log.flush()  # the registry says `pushing` before a byte reaches the device
        ctx.state("sending")

        def progress(done: int, total: int) -> None:
            if self.cancel.is_set():  # cut: the partial upload stays and resumes later
                raise errors.RolloutCancelledError(
                    f"{name}: push cut at {done} of {total} bytes (interrupted); it "
                    "resumes on `fleet deployment resume`", device=name)
            kill_point("pushing")
            ctx.bytes(done, total)

        up = self.agent.upload(job.package, job.package_sha256, progress=progress)
        tr = up.transfer
        log.move(StepState.PUSHED, bytes_sent=tr.bytes_sent, resumed_from=tr.resumed_from,
                 sha256=tr.sha256)
        ctx.check()
        ctx.state("staging")
        staged = self.agent.stage(up.remote, envelope=envelope,
                                  timeout=ctx.deadline.remaining(30))
        if staged.doc.get("root_version") is not None:  # the root chain travelled with it
            log.device_fields(root_version=staged.doc["root_version"])
        log.move(StepState.STAGED, version=staged.version, done=not job.activate)
        log.flush()  # pushed + staged in one transaction
        kill_point("staged")
        return tr.bytes_sent

    def activate(self, sent: int | None) -> DeployResult:
        job, ctx, log = self.job, self.ctx, self.log
        ctx.check()
        _stop_if(self.cancel, self.dev.name, "its activation")
        log.move(StepState.ACTIVATING)
        log.flush()  # the registry says `activating` before the agent starts
        ctx.state("activating")
        kill_point("activating")
        body = self.agent.activate(job.name, job.version, **job.bench,
                                   timeout=ctx.deadline.remaining(60)).report
        kill_point("activated")
        log.activation(body, deployment_id=self.dep_id, bytes_sent=sent)
        log.contact(status="ok")
        return DeployResult(bytes_sent=sent or 0, report=body)


def _record_failure(reg: Registry, step_id: uuid.UUID, out: DeviceOutcome[DeployResult]
                    ) -> None:
    if out.status is DeviceStatus.CANCELLED:
        return  # stopped at a safe point (or never started): the step says where; resumable
    err = out.error or errors.FleetError("unknown failure")
    hist.set_step(reg, step_id, StepState.FAILED, error_code=err.code,
                  error_message=err.message, attempts=out.attempts)
    with contextlib.suppress(errors.FleetError):
        reg.touch_device(out.device, status="unreachable"
                         if out.status is DeviceStatus.UNREACHABLE else "failed")


_RECORDED: dict[StepState, DeviceStatus] = {
    StepState.OK: DeviceStatus.OK, StepState.SKIPPED: DeviceStatus.SKIPPED,
    StepState.STAGED: DeviceStatus.STAGED, StepState.FAILED: DeviceStatus.FAILED,
    StepState.CANCELLED: DeviceStatus.CANCELLED,
    StepState.ROLLED_BACK: DeviceStatus.ROLLED_BACK,
    StepState.ROLLBACK_FAILED: DeviceStatus.ROLLBACK_FAILED,
    StepState.NOT_STARTED: DeviceStatus.NOT_STARTED,
}


def recorded(name: str, st: DeploymentStep) -> DeviceOutcome[DeployResult]:
    """A finished step's outcome as the registry has it (a resume does not redo it)."""
    err = (errors.error_from_code(st.error_code, st.error_message or st.error_code)
           if st.error_code else None)
    return DeviceOutcome(name, _RECORDED[StepState(st.state)],
                         result=DeployResult(bytes_sent=st.bytes_sent), error=err,
                         reason=f"{st.state.value} (recorded)", attempts=st.attempts)


@dataclass
class Run:
    """One deployment as this process drives it: which devices, the job, the opener and
    the fan-out's options; :meth:`run_devices` runs the unfinished steps of some devices,
    :meth:`device_task` one device's step (what a farm worker runs, too).

    Devices reached through a farm host (``via``) go to its worker when a broker is
    configured (``dispatcher``: by default :func:`fleet.worker.dispatch.dispatcher_for`;
    never with a test ``opener``), carrying the lease ``holder``: a worker runs a step
    only while the deployment is running under that holder."""

    home: FleetHome
    reg: Registry
    dep_id: uuid.UUID
    job: DeployJob
    devices: dict[str, Device]
    cancel: threading.Event = field(default_factory=threading.Event)
    opener: Opener | None = None
    fanout_kw: dict[str, Any] = field(default_factory=dict)
    holder: Holder | None = None
    dispatcher: CeleryDispatcher | None = None

    def open_agent(self, dev: Device, ctx: TaskContext) -> AbstractContextManager[AgentClient]:
        if self.opener is not None:
            return self.opener(dev, ctx)
        return device_session(self.home, dev, ctx)

    def _done(self, st: DeploymentStep) -> bool:
        return st.state.terminal or (not self.job.activate and st.state is StepState.STAGED)

    def run_devices(self, names: list[str]) -> FleetResult[DeployResult]:
        """Every named device's outcome: recorded for finished steps, run for the rest."""
        steps = {d.name: st for st, d in hist.steps_of(self.reg, self.dep_id)
                 if d.name in names}
        result: FleetResult[DeployResult] = FleetResult()
        todo = []
        for n in names:
            if self._done(steps[n]):
                result.add(recorded(n, steps[n]))
            else:
                todo.append(self.devices[n])
        ids = {n: st.id for n, st in steps.items()}

        def task(dev: Device, ctx: TaskContext) -> DeployResult:
            st = steps[dev.name]
            return self.device_task(dev, ctx, st.id, st.state)

        if todo:
            disp, remote = self._farm(ids)
            ran = call_each(todo, task, cancel=self.cancel, remote=remote, dispatcher=disp,
                            **self.fanout_kw)
            for out in ran.failed:
                _record_failure(self.reg, ids[out.device], out)
            result.extend(ran)
        return result.sorted_by(names)


    def device_task(self, dev: Device, ctx: TaskContext, step_id: uuid.UUID,
                    known: StepState | None = None) -> DeployResult:
        """One device's step: an attempt event, then the reconcile table's decision from
        the step and the agent's status (fresh or resumed alike). Its registry writes go
        through a :class:`StepLog`: about four transactions a fresh step, the last when
        it ends, whether it returns or raises. ``known``: the step's state as the caller
        just read it (first attempt only; else it is read)."""
        log = StepLog(self.reg, step_id, dev)
        state = log.attempt(ctx.attempt + 1, known if ctx.attempt == 0 else None)
        ctx.state("connecting")
        try:
            with self.open_agent(dev, ctx) as agent:
                result = _Device(self.reg, self.job, dev, agent, self.dep_id, step_id, ctx,
                                 self.cancel, log).run(state)
        except BaseException:
            with contextlib.suppress(Exception):  # the step's own error is what counts
                log.flush()
            raise
        log.flush()
        return result

    def farm_dispatcher(self) -> CeleryDispatcher | None:
        """The dispatcher for this deployment's farm devices, or None: everything runs
        here (no broker configured, a test opener, no lease holder, no farm device)."""
        if self.holder is None or not any(d.via for d in self.devices.values()):
            return None
        if self.dispatcher is None and self.opener is None:
            self.dispatcher = dispatcher_for(self.home, self.reg)
        return self.dispatcher

    def _farm(self, ids: dict[str, uuid.UUID]
              ) -> tuple[CeleryDispatcher | None, Remote | None]:
        disp = self.farm_dispatcher()
        if disp is None or self.holder is None:
            return None, None
        package = disp.publish(self.job.package, self.job.package_sha256)
        return disp, Remote("deploy", {"deployment": str(self.dep_id),
                                       "holder": list(self.holder), "package": package},
                            each={n: {"step": str(i)} for n, i in ids.items()},
                            decode=DeployResult.from_doc)


@contextlib.contextmanager
def holding(reg: Registry, dep_id: uuid.UUID, who: Holder, *, cancel: threading.Event,
            config: LeaseConfig | None = None) -> Iterator[Heartbeat]:
    """Heartbeat the lease while the block runs (a lost lease sets ``cancel``); if the
    block ends with an exception, the deployment becomes ``interrupted`` at once rather
    than waiting for a later command to find the lease stale."""
    hb = Heartbeat(reg, dep_id, who, on_lost=cancel.set, config=config)
    with hb.running():
        try:
            yield hb
        except BaseException as exc:
            with contextlib.suppress(Exception):
                abandon(reg, dep_id, who, f"interrupted: the controller stopped "
                                          f"({type(exc).__name__}: {exc})"[:300])
            raise


def run_deployment(home: FleetHome, reg: Registry, job: DeployJob, devices: list[Device], *,
                   target: str, workers: int = 8, deadline_s: float = 900.0,
                   retries: int = 2, opener: Opener | None = None,
                   cancel: threading.Event | None = None,
                   lease_config: LeaseConfig | None = None,
                   on_created: Callable[[uuid.UUID], None] | None = None,
                   dispatcher: CeleryDispatcher | None = None,
                   **fanout_kw: Any) -> tuple[uuid.UUID, FleetResult[DeployResult]]:
    """One deployment row holding a lease, one step per device (every state change an
    event, each attempt a ``connecting`` event); returns its id and every device's
    outcome. ``on_created(id)`` runs once the row exists (the CLI's Ctrl-C handler)."""
    who = holder()
    dep, _ = hist.create_deployment(
        reg, name=job.name, version=job.version, target=target, devices=devices,
        artifact_id=job.artifact_id, lease=who,
        options={"workers": workers, "deadline_s": deadline_s, "retries": retries,
                 "job": job.to_options()})
    if on_created:
        on_created(dep.id)
    kill_point("packaged")
    run = Run(home, reg, dep.id, job, {d.name: d for d in devices},
              cancel or threading.Event(), opener,
              {"workers": workers, "deadline_s": deadline_s, "retries": retries, **fanout_kw},
              holder=who, dispatcher=dispatcher)
    with holding(reg, dep.id, who, cancel=run.cancel, config=lease_config):
        result = run.run_devices([d.name for d in devices])
        hist.finish_deployment(reg, dep.id, lease=who)
    return dep.id, result
