"""``fleet rollback``'s per-device step: switch a model back and record it on the step.

One function builds the task (:func:`rollback_task`); the CLI runs it through the fan-out
and a farm worker runs the same one for a device it reaches (fleet.worker.tasks, kind
``rollback``): an attempt event, ``rolling_back``, the agent's ``rollback`` (previous
slot, or a signed order), then ``ok`` with where the device is now.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from typing import Any

from fleet.agent_client import RollbackResult
from fleet.connect import device_session
from fleet.home import FleetHome
from fleet.registry import Device, Registry
from fleet.registry import history as hist
from fleet.registry.models import StepState
from fleet.rollout.deploy import Opener
from fleet.rollout.fanout import TaskContext

__all__ = ["rollback_task"]


def rollback_task(home: FleetHome, reg: Registry, name: str, order: dict[str, Any] | None,
                  to: int | None, steps: Mapping[str, uuid.UUID], *,
                  opener: Opener | None = None
                  ) -> Callable[[Device, TaskContext], RollbackResult]:
    """The task for devices whose rollback steps are ``steps`` (device name -> step id):
    ``name`` to its previous slot, or where ``order`` says (version ``to``)."""
    def task(dev: Device, ctx: TaskContext) -> RollbackResult:
        step = steps[dev.name]
        hist.record_attempt(reg, step, ctx.attempt + 1)
        session = opener(dev, ctx) if opener else device_session(home, dev, ctx)
        with session as agent:
            hist.set_step(reg, step, StepState.ROLLING_BACK, to=to)
            back = agent.rollback(name, order, timeout=ctx.deadline.remaining(30))
        hist.set_step(reg, step, StepState.OK, current=back.current, previous=back.previous,
                      changed=back.changed)
        return back

    return task
