"""Pure planning: waves, and what a deploy, rollback or LoRA push would do per device.

No I/O here: the inputs are registry rows (a device's facts say what it had installed and
how much room it had when the controller last heard from it, :mod:`fleet.registry.facts`)
and the package's name, version, digest and size. ``fleet deploy --dry-run`` prints these
plans (:mod:`fleet.rollout.dryrun` gathers the inputs); the real run takes the same
decisions from each agent's live ``status`` (:mod:`fleet.rollout.reconcile`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from fleet.core import errors
from fleet.core.fsutil import room_needed
from fleet.registry.models import Device, StepState
from fleet.rollout.reconcile import Do, Goal, next_action, observe

__all__ = ["Action", "ActionKind", "Plan", "PlannedDevice", "WaveSize", "decide",
           "parse_waves", "plan_deploy", "plan_lora_push", "plan_rollback", "split_waves"]

WAVES_HELP = ("cumulative sizes, each a count or a percentage of the targets and larger "
              "than the one before (1,25%,100%); the rest always follows as a last wave, "
              "nothing comes after 100%")


class ActionKind(StrEnum):
    DEPLOY = "deploy"
    SKIP = "skip"
    REFUSE = "refuse"  #: the caller raises :class:`fleet.core.errors.PlanError` (exit 17)


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    reason: str

    def refusal(self, device: str, name: str) -> errors.PlanError:
        """The error a refused device ends with: a rollout error, not a package attack."""
        return errors.PlanError(f"{device}: {self.reason}", device=device, model=name)


def decide(installed: dict[str, Any] | None, *, name: str, version: int, digest: str,
           force: bool = False) -> Action:
    """Decide for one device from its agent's ``status.installed[name]``."""
    if not installed:
        return Action(ActionKind.DEPLOY, "not installed")
    active_version = installed.get("version")
    active_digest = installed.get("digest")
    if active_version == version and active_digest == digest and not force:
        return Action(ActionKind.SKIP, f"{name}@{version} already active")
    if isinstance(active_version, int) and active_version > version:
        return Action(ActionKind.REFUSE,
                      f"device runs {name}@{active_version}, newer than {version}; "
                      "use `fleet rollback` with a signed order")
    if active_version == version and active_digest != digest:
        return Action(ActionKind.REFUSE,
                      f"device runs a different {name}@{version} (digest differs); "
                      "bump the version")
    return Action(ActionKind.DEPLOY, f"{active_version} -> {version}")


# -- waves ------------------------------------------------------------------------------
@dataclass(frozen=True)
class WaveSize:
    """One cumulative wave size: ``count`` devices or ``percent`` of the targets."""

    count: int | None = None
    percent: float | None = None

    def bound(self, total: int) -> int:
        if self.count is not None:
            return min(self.count, total)
        return min(total, math.ceil(total * (self.percent or 0) / 100 - 1e-9))

    def __str__(self) -> str:
        return str(self.count) if self.count is not None else f"{self.percent:g}%"


_WAVE = re.compile(r"^(?:(?P<n>\d+)|(?P<p>\d+(?:\.\d+)?)%)$")


def parse_waves(spec: str) -> list[WaveSize]:
    """Check a ``--waves`` value (:data:`WAVES_HELP`) without the targets: UsageError
    (exit 2) for a malformed size, a size that does not grow, or anything after 100%."""
    parts = [p.strip() for p in spec.split(",")]
    if not spec.strip() or any(not p for p in parts):
        raise errors.UsageError(f"--waves {spec!r}: give sizes like 1,25%,100% ({WAVES_HELP})",
                                waves=spec)
    sizes: list[WaveSize] = []
    for raw in parts:
        m = _WAVE.match(raw)
        if m is None:
            raise errors.UsageError(f"--waves {spec!r}: {raw!r} is neither a device count nor "
                                    f"a percentage ({WAVES_HELP})", waves=spec)
        size = WaveSize(count=int(m["n"])) if m["n"] else WaveSize(percent=float(m["p"]))
        if (size.count is not None and size.count < 1) or \
                (size.percent is not None and not 0 < size.percent <= 100):
            raise errors.UsageError(f"--waves {spec!r}: {raw!r} holds no device or is over "
                                    "100%", waves=spec)
        same = [s for s in sizes if (s.count is None) == (size.count is None)]
        if same and (size.count or size.percent or 0) <= (same[-1].count or
                                                         same[-1].percent or 0):
            raise errors.UsageError(f"--waves {spec!r}: sizes are cumulative and must grow "
                                    f"({raw} after {same[-1]}); e.g. 1,25%,100%", waves=spec)
        if sizes and sizes[-1].percent == 100:
            raise errors.UsageError(f"--waves {spec!r}: nothing can follow 100%", waves=spec)
        sizes.append(size)
    return sizes


def split_waves(names: list[str], spec: str) -> list[list[str]]:
    """Cut the targets into waves: ``"1,25%,100%"`` means one device, then up to a quarter
    of the fleet in total, then the rest. A size that adds no device adds no wave; the
    last wave always takes whatever is left. Raises UsageError as :func:`parse_waves`."""
    total = len(names)
    waves: list[list[str]] = []
    done = 0
    for b in [*(s.bound(total) for s in parse_waves(spec)), total]:
        if b > done:
            waves.append(names[done:b])
            done = b
    return waves


# -- per-device plans -------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedDevice:
    """``action``: ``send`` (push and stage/activate, or switch for a rollback), ``skip``
    (nothing to do) or ``refuse`` (the real run would fail this device, and why)."""

    device: str
    action: str
    reason: str
    bytes: int = 0
    wave: int | None = None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "wave": self.wave, "action": self.action,
                "reason": self.reason, "bytes": self.bytes, "notes": list(self.notes)}


@dataclass
class Plan:
    """What a command would do. ``version`` None: each device's previous slot."""

    command: str
    name: str
    version: int | None
    kind: str = "model"
    devices: list[PlannedDevice] = field(default_factory=list)
    waves: list[list[str]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> str:
        return f"{self.name}@{self.version if self.version is not None else 'previous'}"

    @property
    def refused(self) -> list[PlannedDevice]:
        return [d for d in self.devices if d.action == "refuse"]

    def to_dict(self) -> dict[str, Any]:
        counts = {a: sum(1 for d in self.devices if d.action == a)
                  for a in ("send", "skip", "refuse")}
        return {"dry_run": True, "command": self.command, "model": self.model,
                "name": self.name, "version": self.version, "kind": self.kind,
                "waves": self.waves, **self.extra,
                "devices": [d.to_dict() | {"model": self.name, "version": self.version}
                            for d in self.devices],
                "totals": {"devices": len(self.devices), **counts,
                           "bytes": sum(d.bytes for d in self.devices)}}


def _installed(dev: Device, name: str) -> dict[str, Any] | None:
    row = ((dev.facts or {}).get("_installed") or {}).get(name)
    return dict(row) if isinstance(row, Mapping) else None


def _common_notes(dev: Device) -> list[str]:
    notes = []
    if not dev.public_key:
        notes.append("not enrolled yet: enrolls first")
    if dev.status not in ("ok", "enrolled", "registered"):
        notes.append(f"last contact: {dev.status}"
                     + (f" ({dev.last_error})" if dev.last_error else ""))
    if "_status_at" not in (dev.facts or {}):
        notes.append("no status reported yet: planned as if nothing were installed")
    return notes


def _no_room(dev: Device, size: int) -> str | None:
    free = (dev.facts or {}).get("_disk_free")
    need = room_needed(size)
    if isinstance(free, int) and free < need:
        return f"too little free space as last reported: {free} bytes free, needs {need}"
    return None


def _waves_of(names: list[str], spec: str | None) -> tuple[list[list[str]] | None,
                                                           dict[str, int]]:
    if not spec:
        return None, {}
    waves = split_waves(names, spec)
    return waves, {n: i for i, wave in enumerate(waves, 1) for n in wave}


def plan_deploy(devices: Sequence[Device], *, name: str, version: int, digest: str,
                size: int, activate: bool = True, waves: str | None = None,
                recipients: Collection[str] | None = None) -> Plan:
    """Per device, what ``fleet deploy`` would do: the reconcile table's first decision
    (:func:`fleet.rollout.reconcile.next_action` for a fresh step) on the installed state
    last reported, then the checks the real run makes before sending (revoked, not a
    recipient of a ready package, too little room). ``recipients``: fingerprints a ready
    ``.fpkg`` was made for (None: the package is made for the targets)."""
    wave_list, wave_of = _waves_of([d.name for d in devices], waves)
    goal = Goal.ACTIVE if activate else Goal.STAGED
    plan = Plan("deploy", name, version, waves=wave_list)
    for dev in devices:
        notes = _common_notes(dev)
        act = next_action(StepState.PENDING, observe(_installed(dev, name), version=version,
                                                     digest=digest), goal=goal)
        action, reason, sent = "send", "not on the device", size
        if dev.revoked_at is not None:
            action, reason = "refuse", "revoked (no package is made for it)"
        elif recipients is not None and dev.fingerprint not in recipients:
            action, reason = "refuse", "not a recipient of this package"
        elif act.do is Do.REFUSE:
            action, reason = "refuse", act.reason
        elif act.do in (Do.SKIP, Do.NOTHING, Do.RECORD_STAGED, Do.RECORD_ACTIVE):
            action, reason = "skip", f"{act.reason} (as last reported)"
        elif (why := _no_room(dev, size)) is not None:
            action, reason = "refuse", why
        else:
            reason = act.reason if act.do is Do.PUSH else reason
        plan.devices.append(PlannedDevice(dev.name, action, reason,
                                          sent if action == "send" else 0,
                                          wave_of.get(dev.name), tuple(notes)))
    return plan


def plan_rollback(devices: Sequence[Device], *, name: str, to: int | None) -> Plan:
    """Per device, what ``fleet rollback NAME [--to V]`` would do from the installed state
    last reported: switch to the previous slot (or V, which must be in its store), skip a
    device already there, refuse one without NAME. Nothing is sent but a signed order."""
    plan = Plan("rollback", name, to)
    for dev in devices:
        notes = _common_notes(dev)
        row = _installed(dev, name)
        reported = "_status_at" in (dev.facts or {}) or row is not None
        active = row.get("active") if row else None
        if not reported:
            action, reason = "send", "switch back (nothing reported yet to check against)"
        elif row is None or active is None:
            action, reason = "refuse", f"{name} is not active there (as last reported)"
        elif to is None:
            prev = row.get("previous")
            action, reason = (("send", f"switch {name}@{active} -> @{prev}") if prev else
                              ("refuse", f"{name}@{active} has no previous version there"))
        elif to == active:
            action, reason = "skip", f"already runs {name}@{to} (as last reported)"
        elif to in (row.get("versions") or []):
            action, reason = "send", f"signed order: {name}@{active} -> @{to}"
        else:
            action, reason = "refuse", f"{name}@{to} is not in its store (as last reported)"
        plan.devices.append(PlannedDevice(dev.name, action, reason, 0, None, tuple(notes)))
    return plan


def plan_lora_push(devices: Sequence[Device], *, name: str, version: int, size: int,
                   base: tuple[str, int | None] | None, recipients: Collection[str]) -> Plan:
    """Per device, what ``fleet lora push PACK`` would do: send the pack to a recipient
    whose base model is the pack's (as last reported), refuse the others."""
    plan = Plan("lora push", name, version, kind="lora")
    for dev in devices:
        notes = _common_notes(dev)
        action, reason = "send", "stage the pack"
        if dev.revoked_at is not None:
            action, reason = "refuse", "revoked (no package is made for it)"
        elif dev.fingerprint not in recipients:
            action, reason = "refuse", "not a recipient of this pack"
        elif base is not None:
            row = _installed(dev, base[0])
            active = row.get("active") if row else None
            if row is not None and active != base[1] and base[1] is not None:
                action, reason = "refuse", (f"the pack binds {base[0]}@{base[1]}; the device "
                                            f"runs {base[0]}@{active} (as last reported)")
            elif row is None and "_status_at" in (dev.facts or {}):
                action, reason = "refuse", f"base {base[0]} is not installed (as last reported)"
        if action == "send" and (why := _no_room(dev, size)) is not None:
            action, reason = "refuse", why
        plan.devices.append(PlannedDevice(dev.name, action, reason,
                                          size if action == "send" else 0, None,
                                          tuple(notes)))
    return plan
