"""Resume an interrupted deployment, and cancel one.

``resume`` takes the deployment's lease over (``interrupted`` -> ``running``, a
compare-and-set: two resumes never both run), rebuilds the job from what the deployment
recorded, and runs every unfinished device through the reconcile table
(:mod:`fleet.rollout.reconcile`): each agent's ``status`` says what really happened while
nobody watched (recorded as ``observed`` events, a finished activation with its report
read back), and the device carries on from there. Finished steps are not touched. A wave
rollout carries on wave by wave with its gate; the waves finished before count.

``cancel`` ends a ``running`` deployment (its controller, if on this host, gets SIGTERM,
which it treats as a first Ctrl-C; one on another host sees its lease gone at its next
heartbeat and stops the same way) or an ``interrupted`` one; its unfinished steps become
``cancelled``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass

from fleet.core import errors
from fleet.home import FleetHome
from fleet.registry import Registry
from fleet.registry import history as hist
from fleet.registry.models import (
    Deployment,
    DeploymentKind,
    DeploymentState,
)
from fleet.registry.types import utcnow
from fleet.rollout.deploy import DeployJob, DeployResult, Opener, Run, holding
from fleet.rollout.fanout import FleetResult
from fleet.rollout.lease import LeaseConfig, holder, pid_alive, reap_stale, take_over
from fleet.rollout.waves import Say, drive_waves
from fleet.worker.dispatch import CeleryDispatcher

__all__ = ["Resumed", "cancel_deployment", "resume_deployment"]


@dataclass
class Resumed:
    deployment: Deployment
    result: FleetResult[DeployResult]
    halted_at: int | None = None


def _job(dep: Deployment) -> DeployJob:
    doc = dep.options.get("job")
    if not isinstance(doc, dict):
        raise errors.UsageError(f"deployment {dep.id} was recorded before resume existed "
                                "(no job in its options); deploy again", id=str(dep.id))
    job = DeployJob.from_options(doc)
    if not job.package.is_file():
        raise errors.NotFoundError(
            f"deployment {dep.id}: its package {job.package} is gone (pruned?); "
            f"deploy {job.name}@{job.version} again", id=str(dep.id), path=str(job.package))
    return job


def _resumable(dep: Deployment) -> None:
    if dep.kind is not DeploymentKind.DEPLOY:
        raise errors.UsageError(f"deployment {dep.id} is a {dep.kind.value}: a rollback is "
                                "not resumed; run `fleet rollback` again", id=str(dep.id))
    if dep.status is DeploymentState.RUNNING:
        raise errors.UsageError(
            f"deployment {dep.id} is running (pid {dep.lease_pid} on {dep.lease_host}); "
            "wait for it, or `fleet deployment cancel` it", id=str(dep.id))
    if dep.status is not DeploymentState.INTERRUPTED:
        raise errors.UsageError(f"deployment {dep.id} is {dep.status.value}: only an "
                                "interrupted deployment is resumed", id=str(dep.id),
                                status=dep.status.value)


def resume_deployment(home: FleetHome, reg: Registry, dep_id: uuid.UUID, *,
                      cancel: threading.Event | None = None, opener: Opener | None = None,
                      say: Say | None = None, lease_config: LeaseConfig | None = None,
                      workers: int | None = None, only: Collection[str] | None = None,
                      dispatcher: CeleryDispatcher | None = None,
                      **fanout_kw: object) -> Resumed:
    """Carry an interrupted deployment on to its end (see the module docstring).

    ``only``: resume just these of its devices (``fleet deployment resume ID -l ...``);
    the deployment stays ``interrupted`` while any other device is unfinished. Raises
    NoTargetsError when none of them is in the deployment."""
    reap_stale(reg, config=lease_config)
    dep = hist.get_deployment(reg, dep_id)
    _resumable(dep)
    job = _job(dep)
    steps = hist.steps_of(reg, dep.id)
    if only is not None:
        steps = [(st, d) for st, d in steps if d.name in only]
        if not steps:
            raise errors.NoTargetsError(f"none of the selected devices is in deployment "
                                        f"{dep.id}", id=str(dep.id))
    who = holder()
    if not take_over(reg, dep.id, who):
        raise errors.UsageError(f"deployment {dep.id} was taken over by another process",
                                id=str(dep.id))
    opts = dep.options
    kw: dict[str, object] = {"workers": workers or int(opts.get("workers", 8)),
                             "deadline_s": float(opts.get("deadline_s", 900.0)),
                             "retries": int(opts.get("retries", 2)), **fanout_kw}
    run = Run(home, reg, dep.id, job, {d.name: d for _, d in steps},
              cancel or threading.Event(), opener, kw, holder=who, dispatcher=dispatcher)
    names = [d.name for _, d in steps]
    if say:
        todo = [d.name for st, d in steps if not st.state.terminal]
        say(f"resuming {dep.name}@{dep.version}: {len(todo)} of {len(names)} device(s) "
            f"unfinished{': ' + ', '.join(todo) if todo else ''}")
    if opts.get("waves"):
        by_wave: dict[int, list[str]] = {}
        for st, d in steps:
            by_wave.setdefault(st.wave or 1, []).append(d.name)
        out = drive_waves(run, who, [by_wave[w] for w in sorted(by_wave)],
                          max_failed=int(opts.get("max_failed", 0)), say=say,
                          lease_config=lease_config)
        return Resumed(hist.get_deployment(reg, dep.id), out.result, out.halted_at)
    with holding(reg, dep.id, who, cancel=run.cancel, config=lease_config):
        result = run.run_devices(names)
        hist.finish_deployment(reg, dep.id, lease=who)
    return Resumed(hist.get_deployment(reg, dep.id), result)


def cancel_deployment(reg: Registry, dep_id: uuid.UUID, *,
                      signal_process: Callable[[int], None] | None = None,
                      lease_config: LeaseConfig | None = None) -> tuple[Deployment, str]:
    """Mark a running or interrupted deployment ``cancelled``; returns it and what was
    done to its controller."""
    reap_stale(reg, config=lease_config)
    here = socket.gethostname()
    did = "no controller was running it"
    with reg.session() as s:
        dep = s.get(Deployment, dep_id, with_for_update=True)  # vs finish, take_over
        if dep is None:
            raise errors.NotFoundError(f"no deployment {dep_id}", id=str(dep_id))
        if dep.status not in (DeploymentState.RUNNING, DeploymentState.INTERRUPTED):
            raise errors.UsageError(f"deployment {dep.id} is {dep.status.value}: nothing to "
                                    "cancel", id=str(dep.id), status=dep.status.value)
        pid, host = dep.lease_pid, dep.lease_host
        was_running = dep.status is DeploymentState.RUNNING
        dep.status = DeploymentState.CANCELLED
        dep.status_reason = "cancelled by `fleet deployment cancel`"
        dep.finished_at = utcnow()
        dep.lease_host = dep.lease_pid = None
        dep.heartbeat_at = None
        s.add(dep)
        if not was_running:  # nobody works on it: its unfinished steps end here
            hist.cancel_unfinished(s, dep.id, staged_is_done=False)
        pull_mode = (dep.options or {}).get("mode") == "pull"
    if pull_mode:  # no controller runs it: the devices' desired state goes back
        from fleet.rollout.pull_revert import cancel_pull

        back = cancel_pull(reg, dep_id)
        did = f"desired state reverted on {len(back)} pull device(s)"
    elif was_running and pid is not None:
        if host == here and pid != os.getpid() and pid_alive(pid):
            send = signal_process or (lambda p: os.kill(p, signal.SIGTERM))
            with contextlib.suppress(ProcessLookupError):
                send(pid)
            did = f"sent SIGTERM to its controller (pid {pid})"
        else:
            did = (f"its controller (pid {pid} on {host}) stops at its next heartbeat")
    return hist.get_deployment(reg, dep_id), did
