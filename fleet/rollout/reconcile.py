"""The reconcile table: a step's recorded state x the device's real state -> next action.

A pure function (mender's installer state machine, read back after a crash): no I/O, no
clock. Every device of a deployment goes through it, a fresh one (``pending``) as well
as one a resume finds half-done, so deploy and resume take the same decisions.

The step says how far the controller got; ``activating`` is written *before* the
activate call, so it alone means "the controller asked this device to activate". The
device is what its agent's ``status`` says about the deployment's ``name@version``
(:func:`observe`). Where the two disagree, the device is right: the action names what
happened while nobody watched (``record``) and what to do next (``do``).

======================  ==========  =========  =========  ==========  ==========
step \\ device           active      staged     absent     newer       conflict
======================  ==========  =========  =========  ==========  ==========
pending, connecting      skip        push       push       refuse      refuse
pushing, pushed          skip        activate*  push       refuse      refuse
staged                   skip        activate   push       refuse      refuse
activating, activated    record_act  activate   push       refuse      refuse
terminal (ok, failed..)  nothing     nothing    nothing    nothing     nothing
======================  ==========  =========  =========  ==========  ==========

``*`` records ``staged`` first (the stage finished unwatched). ``push`` pushes (resuming
a partial upload), stages and activates; ``record_act`` reads the finished activation's
report back from the agent. For a ``--no-activate`` deployment (goal ``staged``) a staged
device ends the step (``record_staged``) and ``staged`` is terminal. ``staged`` with a
``pending`` step pushes again rather than activating: only this deployment's own stage
proves the staged build is ours (the agent's stage is idempotent, so the push is cheap to
verify and nothing is stored twice).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from fleet.registry.models import StepState

__all__ = ["Action", "DeviceState", "Do", "Goal", "Observed", "next_action", "observe"]


class Observed(StrEnum):
    """The device relative to the deployment's ``name@version`` (digest included)."""

    ACTIVE = "active"  #: runs it
    STAGED = "staged"  #: has it in its store, runs something older (or nothing)
    ABSENT = "absent"  #: does not have it
    NEWER = "newer"  #: runs a newer version
    CONFLICT = "conflict"  #: runs this version number with another digest


class Goal(StrEnum):
    ACTIVE = "active"
    STAGED = "staged"  #: ``--no-activate``


class Do(StrEnum):
    NOTHING = "nothing"  #: the step is over; leave it
    SKIP = "skip"  #: already runs it; nothing sent
    PUSH = "push"  #: push (resumable), stage, then activate unless the goal is staged
    ACTIVATE = "activate"
    RECORD_ACTIVE = "record_active"  #: activated unwatched: read its report, mark ok
    RECORD_STAGED = "record_staged"  #: staged unwatched and the goal is staged: mark it
    REFUSE = "refuse"  #: fail the step with a plan error, nothing sent


@dataclass(frozen=True)
class DeviceState:
    observed: Observed
    active: int | None = None  #: the active version (for messages)


@dataclass(frozen=True)
class Action:
    do: Do
    reason: str
    #: what happened while nobody watched, to record before ``do`` (None: nothing)
    record: StepState | None = None


def observe(installed: dict[str, Any] | None, *, version: int, digest: str) -> DeviceState:
    """The device from its agent's ``status.installed[name]``."""
    row = installed or {}
    active = row.get("active", row.get("version"))
    active = active if isinstance(active, int) else None
    if active == version:
        if row.get("digest") not in (None, digest):
            return DeviceState(Observed.CONFLICT, active)
        return DeviceState(Observed.ACTIVE, active)
    if active is not None and active > version:
        return DeviceState(Observed.NEWER, active)
    if version in (row.get("versions") or []):
        return DeviceState(Observed.STAGED, active)
    return DeviceState(Observed.ABSENT, active)


_BEFORE_PUSH = frozenset({StepState.PENDING, StepState.CONNECTING})
_PUSHING = frozenset({StepState.PUSHING, StepState.PUSHED})
_ACTIVATING = frozenset({StepState.ACTIVATING, StepState.ACTIVATED})


def next_action(step: StepState, device: DeviceState, *, goal: Goal = Goal.ACTIVE) -> Action:
    """What to do with one device (the table in the module docstring)."""
    seen = device.observed
    if step.terminal or (goal is Goal.STAGED and step is StepState.STAGED):
        return Action(Do.NOTHING, f"step already {step.value}")
    if seen is Observed.NEWER:
        return Action(Do.REFUSE, f"device runs version {device.active}, newer than this "
                                 "deployment's; use `fleet rollback` with a signed order")
    if seen is Observed.CONFLICT:
        return Action(Do.REFUSE, f"device runs a different build of version {device.active} "
                                 "(digest differs); bump the version")
    if seen is Observed.ACTIVE:
        if step in _ACTIVATING:
            return Action(Do.RECORD_ACTIVE, "the device finished the activation unwatched",
                          record=StepState.ACTIVATED)
        return Action(Do.SKIP, "already active")
    if seen is Observed.ABSENT:
        return Action(Do.PUSH, "not on the device" if step in _BEFORE_PUSH else
                      f"not on the device after {step.value}: push (resumes a partial "
                      "upload)")
    # staged on the device, not active
    if step in _BEFORE_PUSH:
        return Action(Do.PUSH, "staged before this deployment: push and stage again "
                               "(idempotent) so the build is known to be ours")
    record = StepState.STAGED if step in _PUSHING else None
    if goal is Goal.STAGED:
        return Action(Do.RECORD_STAGED, "staged", record=StepState.STAGED)
    why = ("the stage finished unwatched" if record else
           "the activation did not finish" if step in _ACTIVATING else "staged")
    return Action(Do.ACTIVATE, why, record=record)
