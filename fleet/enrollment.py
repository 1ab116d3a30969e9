"""Enrollment: the agent makes its P-256 key, the registry keeps the public half.

One function for one device (:func:`enroll`) and one for many (:func:`enroll_many`, on the
fan-out), used by ``fleet device add|enroll``, ``fleet deploy`` (devices without a key) and
``fleet lab up``. Raises the transport's and the agent's errors
(:class:`~fleet.core.errors.FleetError` subclasses); the registry changes only after the
agent answered.
"""

from __future__ import annotations

from collections.abc import Sequence

from fleet.agent_client import EnrollResult
from fleet.connect import controller_public_pem, device_session
from fleet.home import FleetHome
from fleet.registry import Device, Registry
from fleet.rollout.fanout import FleetResult, Remote, TaskContext, call_each
from fleet.worker.dispatch import dispatcher_for

__all__ = ["enroll", "enroll_many"]


def enroll(home: FleetHome, reg: Registry, device: Device, ctx: TaskContext | None = None, *,
           accept_host_key: str | None = None) -> EnrollResult:
    """Enroll one device and record its key, fingerprint and agent version."""
    with device_session(home, device, ctx, accept_host_key=accept_host_key) as agent:
        timeout = ctx.deadline.remaining() if ctx is not None else 120.0
        res = agent.enroll(controller_public_pem(home), timeout=timeout)
    reg.update_device(device.name, public_key=res.public_key, fingerprint=res.fingerprint,
                      status="enrolled", agent_version=res.agent_version,
                      root_version=res.root_version)
    reg.touch_device(device.name)
    return res


def enroll_many(home: FleetHome, reg: Registry, devices: Sequence[Device], *,
                workers: int = 8, deadline_s: float = 120.0) -> FleetResult[EnrollResult]:
    """Enroll every device in parallel; one failure hides nothing (per-device outcomes).
    A device behind a farm host is enrolled by its worker (fleet.worker, kind ``enroll``)
    when a broker is configured."""
    devs = list(devices)
    disp = dispatcher_for(home, reg) if any(d.via for d in devs) else None
    return call_each(devs, lambda dev, ctx: enroll(home, reg, dev, ctx),
                     workers=workers, deadline_s=deadline_s, dispatcher=disp,
                     remote=Remote("enroll", decode=EnrollResult.from_doc))
