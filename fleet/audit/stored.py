"""What the registry last heard from each device, for ``fleet audit --offline`` and the
HTML report: per device, the version of each model that is active as last reported, and
the newest stored figures and findings for exactly that version.

A device's active version is the newest of: the versions its last ``audit`` report
listed, its ``activate``/``bench`` reports, and the versions successful ``fleet
rollback`` steps left active (the agent's answer, kept on the step). So after a rollback
the row shows the version rolled back to, with the newest report of that version, and not
the version the last audit saw. Every row says when its data was reported.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fleet.audit.latest import latest_audit_reports, latest_model_reports, rollbacks
from fleet.registry import Device, Registry

__all__ = ["StoredModel", "stored_state"]


@dataclass
class StoredModel:
    """``name@version`` active on a device as last reported. ``entry`` is the newest
    stored summary of that version (the agent's ``configured_backend``,
    ``effective_backend``, ``recommended_backend``, ``median_ms``, ``findings`` ...;
    empty when none is stored), reported at ``reported_at`` by a report of ``kind``.
    ``active_since``: set when a rollback made this version active after that report."""

    name: str
    version: int
    entry: dict[str, Any] = field(default_factory=dict)
    reported_at: datetime | None = None
    kind: str | None = None
    active_since: datetime | None = None

    @property
    def note(self) -> str | None:
        if not self.entry:
            return "no stored report of this version"
        if self.active_since is not None:
            return f"active again after a rollback at {self.active_since:%Y-%m-%d %H:%M} UTC"
        return None


def _newer(a: datetime | None, b: datetime) -> bool:
    return a is None or b > a


def stored_state(reg: Registry, devices: Sequence[Device]) -> dict[str, list[StoredModel]]:
    """Device name -> its active models as last reported (three queries for any number of
    devices); a device the registry heard nothing from maps to an empty list."""
    ids = [d.id for d in devices]
    audits = latest_audit_reports(reg, ids)
    measured = latest_model_reports(reg, ids)
    back = rollbacks(reg, ids)

    # per device: (model, version) -> newest (at, kind, entry); model -> newest (at, version)
    data: dict[uuid.UUID, dict[tuple[str, int], tuple[datetime, str, dict[str, Any]]]] = {}
    active: dict[uuid.UUID, dict[str, tuple[datetime, int | None, bool]]] = {}

    def saw(dev: uuid.UUID, name: str, version: int, at: datetime, kind: str,
            entry: dict[str, Any]) -> None:
        d = data.setdefault(dev, {})
        if (name, version) not in d or at > d[(name, version)][0]:
            d[(name, version)] = (at, kind, entry)
        a = active.setdefault(dev, {})
        if name not in a or _newer(a[name][0], at):
            a[name] = (at, version, False)

    for dev_id, rep in audits.items():
        for m in (rep.body or {}).get("models") or []:
            if m.get("name") is not None and m.get("version") is not None:
                saw(dev_id, str(m["name"]), int(m["version"]), rep.created_at, "audit", dict(m))
    for rep in measured:
        saw(rep.device_id, str(rep.model_name), int(rep.model_version or 0), rep.created_at,
            rep.kind, dict(rep.body or {}))
    for rb in back:
        a = active.setdefault(rb.device_id, {})
        if rb.model not in a or _newer(a[rb.model][0], rb.at):
            a[rb.model] = (rb.at, rb.current, True)

    out: dict[str, list[StoredModel]] = {}
    for dev in devices:
        models = []
        for name, (at, version, by_rollback) in sorted(active.get(dev.id, {}).items()):
            if version is None:
                continue  # rolled back to nothing
            found = data.get(dev.id, {}).get((name, version))
            sm = StoredModel(name, version)
            if found is not None:
                sm.reported_at, sm.kind, sm.entry = found
            if by_rollback:
                sm.active_since = at
            models.append(sm)
        out[dev.name] = models
    return out
