"""Pure planning: which devices need the package, which already run it, which can't take it.

No I/O here: the inputs are registry rows and what each device said it has installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Action", "decide"]


@dataclass(frozen=True)
class Action:
    kind: str  # "deploy" | "skip" | "refuse"
    reason: str


def decide(installed: dict[str, Any] | None, *, name: str, version: int, digest: str,
           force: bool = False) -> Action:
    """Decide for one device from its agent's ``status.installed[name]``."""
    if not installed:
        return Action("deploy", "not installed")
    active_version = installed.get("version")
    active_digest = installed.get("digest")
    if active_version == version and active_digest == digest and not force:
        return Action("skip", f"{name}@{version} already active")
    if isinstance(active_version, int) and active_version > version:
        return Action("refuse", f"device runs {name}@{active_version}, newer than {version}; "
                                "use `fleet rollback` with a signed order")
    if active_version == version and active_digest != digest:
        return Action("refuse", f"device runs a different {name}@{version} (digest differs); "
                                "bump the version")
    return Action("deploy", f"{active_version} -> {version}")


def split_waves(names: list[str], spec: str) -> list[list[str]]:
    """Cut the targets into waves: ``"1,25%,100%"`` means one device, then up to a quarter
    of the fleet in total, then the rest. Each step is a cumulative count or percentage;
    the last wave always takes whatever is left."""
    from fleet.core import errors

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
