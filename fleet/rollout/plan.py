"""Pure planning: which devices need the package, which already run it, which can't take it.

No I/O here: the inputs are registry rows and what each device said it has installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from fleet.core import errors

__all__ = ["Action", "ActionKind", "decide", "split_waves"]


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


def split_waves(names: list[str], spec: str) -> list[list[str]]:
    """Cut the targets into waves: ``"1,25%,100%"`` means one device, then up to a quarter
    of the fleet in total, then the rest. Each step is a cumulative count or percentage;
    the last wave always takes whatever is left."""
    total = len(names)
    bounds: list[int] = []
    for raw in (p.strip() for p in spec.split(",") if p.strip()):
        try:
            n = (int(-(-total * float(raw[:-1]) // 100)) if raw.endswith("%")
                 else int(raw))
        except ValueError as exc:
            raise errors.UsageError(f"bad wave {raw!r} in --waves {spec!r}") from exc
        if n < 1:
            raise errors.UsageError(f"wave {raw!r} in --waves {spec!r} holds no device")
        bounds.append(min(n, total))
    if not bounds:
        raise errors.UsageError("--waves needs at least one size, e.g. 1,50%,100%")
    waves: list[list[str]] = []
    done = 0
    for b in [*bounds, total]:
        if b > done:
            waves.append(names[done:b])
            done = b
    return waves
