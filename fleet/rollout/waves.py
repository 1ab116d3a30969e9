"""Roll out in waves with a health gate after each, and roll back automatically.

A wave rollout is one deployment: each step records its wave. After a wave, the gate
counts its failed devices (a device fails when its transfer, verification or health
check fails, see :mod:`fleet.rollout.deploy`); more than ``max_failed`` halts the rollout
(``halted``), and every device this rollout activated is switched back to its previous
slot (its step ``rolled_back``, or ``rollback_failed`` with the error). Later waves are
not touched (``not_started``). A cancel (Ctrl-C, a lost lease) between waves stops
without a gate: the deployment is ``interrupted`` and a resume carries on from the first
unfinished wave. The loop (:func:`roll_waves`) knows nothing of the registry, so it runs
on fakes; :func:`drive_waves` wires it to a deployment and agents.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from fleet.agent_client import RollbackResult
from fleet.home import FleetHome
from fleet.registry import Device, Registry
from fleet.registry import history as hist
from fleet.registry.models import StepState
from fleet.rollout.deploy import (
    DeployJob,
    DeployResult,
    Opener,
    Run,
    holding,
    kill_point,
)
from fleet.rollout.fanout import (
    DeviceOutcome,
    DeviceStatus,
    Dispatcher,
    FleetResult,
    Remote,
    TaskContext,
    call_each,
)
from fleet.rollout.lease import Holder, LeaseConfig, holder
from fleet.rollout.plan import split_waves

__all__ = ["WaveOutcome", "drive_waves", "previous_slot_task", "roll_waves", "rollback_each",
           "run_waves"]

R = TypeVar("R")
Say = Callable[[str], None]


@dataclass
class WaveOutcome(Generic[R]):
    result: FleetResult[R] = field(default_factory=FleetResult)
    waves: list[list[str]] = field(default_factory=list)
    deployments: list[uuid.UUID] = field(default_factory=list)  #: the one deployment
    halted_at: int | None = None  #: 1-based wave whose gate failed
    rolled_back: FleetResult[RollbackResult] = field(default_factory=FleetResult)
    interrupted_at: int | None = None  #: 1-based wave not started because of a cancel


def roll_waves(waves: list[list[str]], deploy_wave: Callable[[int, list[str]], FleetResult[R]],
               rollback: Callable[[list[str]], FleetResult[RollbackResult]], *,
               max_failed: int, say: Say | None = None,
               cancel: threading.Event | None = None) -> WaveOutcome[R]:
    """Deploy wave after wave (``deploy_wave(i, names)``, 1-based ``i``); when a wave has
    more than ``max_failed`` failed devices, ``rollback`` every device activated so far
    (status ``OK``; skipped and staged ones were not changed) and stop. Once ``cancel`` is
    set no new wave starts and no gate is judged (cancelled devices are not failures)."""
    out: WaveOutcome[R] = WaveOutcome(waves=waves)
    stop = cancel or threading.Event()
    for i, wave in enumerate(waves, 1):
        if stop.is_set():
            out.interrupted_at = i
            for name in (n for later in waves[i - 1:] for n in later):
                out.result.add(DeviceOutcome(name, DeviceStatus.CANCELLED,
                                             reason=f"interrupted before wave {i}"))
            break
        if say:
            say(f"wave {i}/{len(waves)}: {', '.join(wave)}")
        res = deploy_wave(i, wave)
        for o in res:
            o.reason = o.reason or f"wave {i}"
        out.result.extend(res)
        failed = len(res.failed)
        if stop.is_set() or failed <= max_failed:
            continue
        out.halted_at = i
        activated = [o.device for o in out.result if o.status is DeviceStatus.OK]
        if say:
            say(f"wave {i}: {failed} device(s) failed (gate allows {max_failed}); "
                f"halting and rolling back {len(activated)} device(s)")
        out.rolled_back = rollback(activated) if activated else FleetResult()
        for back in out.rolled_back:
            o = out.result[back.device]
            o.status = DeviceStatus.ROLLED_BACK if back.ok else DeviceStatus.ROLLBACK_FAILED
            o.error = back.error if not back.ok else None
            o.reason = f"wave {i} gate failed; {back.error_text() if back.error else 'ok'}"
        for later in waves[i:]:
            for name in later:
                out.result.add(DeviceOutcome(name, DeviceStatus.NOT_STARTED,
                                             reason=f"halted at wave {i}"))
        break
    return out


def previous_slot_task(name: str, connect: Opener
                       ) -> Callable[[Device, TaskContext], RollbackResult]:
    """One device's gate rollback: ``name`` back to its previous slot."""
    def task(dev: Device, ctx: TaskContext) -> RollbackResult:
        with connect(dev, ctx) as agent:
            return agent.rollback(name, timeout=ctx.deadline.remaining(30))

    return task


def rollback_each(devices: list[Device], name: str, connect: Opener, *,
                  dispatcher: Dispatcher | None = None, **fanout_kw: Any
                  ) -> FleetResult[RollbackResult]:
    """Switch ``name`` back to its previous slot on every device (one retry); farm
    devices on their host's worker when ``dispatcher`` is given."""
    kw: dict[str, Any] = {"deadline_s": 120.0, "retries": 1, **fanout_kw}
    remote = Remote("rollback.previous", {"name": name}, decode=RollbackResult.from_doc)
    return call_each(devices, previous_slot_task(name, connect), remote=remote,
                     dispatcher=dispatcher, **kw)


def drive_waves(run: Run, who: Holder, waves: list[list[str]], *, max_failed: int,
                say: Say | None = None, lease_config: LeaseConfig | None = None
                ) -> WaveOutcome[DeployResult]:
    """Run (or carry on) a wave rollout that ``who`` holds, record the gate's rollbacks and
    the waves never started on its steps, and finish the deployment."""
    steps = {d.name: st.id for st, d in hist.steps_of(run.reg, run.dep_id)}

    def rollback(names: list[str]) -> FleetResult[RollbackResult]:
        back = rollback_each([run.devices[n] for n in names], run.job.name,
                             run.open_agent, dispatcher=run.farm_dispatcher())
        for o in back:
            res = o.result
            hist.set_step(run.reg, steps[o.device],
                          StepState.ROLLED_BACK if o.ok else StepState.ROLLBACK_FAILED,
                          error_code=o.error.code if o.error else None,
                          error_message=o.error.message if o.error else None,
                          current=res.current if res else None,
                          previous=res.previous if res else None)
        return back

    with holding(run.reg, run.dep_id, who, cancel=run.cancel, config=lease_config):
        out = roll_waves(waves, lambda _i, names: run.run_devices(names), rollback,
                         max_failed=max_failed, say=say, cancel=run.cancel)
        if out.halted_at is not None:
            for later in waves[out.halted_at:]:
                for n in later:
                    hist.set_step(run.reg, steps[n], StepState.NOT_STARTED,
                                  reason=f"halted at wave {out.halted_at}")
        hist.finish_deployment(run.reg, run.dep_id, lease=who, halted_at=out.halted_at,
                               reason=f"wave {out.halted_at} gate failed"
                               if out.halted_at else None)
    out.deployments = [run.dep_id]
    return out


def run_waves(home: FleetHome, reg: Registry, job: DeployJob, devices: list[Device], *,
              spec: str, max_failed: int, target: str, say: Say | None = None,
              opener: Opener | None = None, cancel: threading.Event | None = None,
              lease_config: LeaseConfig | None = None,
              on_created: Callable[[uuid.UUID], None] | None = None,
              workers: int = 8, deadline_s: float = 900.0, retries: int = 2,
              **fanout_kw: Any) -> WaveOutcome[DeployResult]:
    """Deploy ``job`` in the waves ``spec`` describes (``"1,25%,100%"``), as one
    deployment."""
    waves = split_waves([d.name for d in devices], spec)
    who = holder()
    dep, _ = hist.create_deployment(
        reg, name=job.name, version=job.version, target=target, devices=devices,
        artifact_id=job.artifact_id, lease=who,
        waves={n: i for i, wave in enumerate(waves, 1) for n in wave},
        options={"workers": workers, "deadline_s": deadline_s, "retries": retries,
                 "waves": spec, "max_failed": max_failed, "job": job.to_options()})
    if on_created:
        on_created(dep.id)
    kill_point("packaged")
    run = Run(home, reg, dep.id, job, {d.name: d for d in devices},
              cancel or threading.Event(), opener,
              {"workers": workers, "deadline_s": deadline_s, "retries": retries, **fanout_kw},
              holder=who)
    return drive_waves(run, who, waves, max_failed=max_failed, say=say,
                       lease_config=lease_config)
