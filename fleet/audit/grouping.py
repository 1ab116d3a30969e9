"""Findings grouped by rule: one entry per finding code with the devices that have it,
instead of the same finding repeated on every device row.

A finding as the agent reports it is ``{"id", "severity", "title", "message", "fix",
"evidence"}`` (``docs/audit-rules.md``); :func:`finding` gives it the controller's JSON
shape (``code`` instead of ``id``). Messages can differ per device (they quote the
device's own figures): a group keeps the message when every device has the same one, and
the rule's title otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SEVERITIES", "GroupedFinding", "finding", "group_findings"]

#: Most severe first.
SEVERITIES = ("error", "warning", "info")


def finding(f: Mapping[str, Any]) -> dict[str, Any]:
    """One finding in the controller's JSON shape: ``code``, ``severity``, ``title``,
    ``message``, ``fix``, ``evidence`` (and ``model`` when known)."""
    out = {"code": str(f.get("code") or f.get("id") or "?"),
           "severity": str(f.get("severity") or "info"), "title": str(f.get("title") or ""),
           "message": str(f.get("message") or ""), "fix": str(f.get("fix") or ""),
           "evidence": f.get("evidence")}
    if f.get("model"):
        out["model"] = f["model"]
    return out


@dataclass
class GroupedFinding:
    """One rule's findings across devices (``devices``: names, sorted; ``models``:
    ``name@version`` entities, sorted)."""

    code: str
    severity: str
    title: str
    message: str
    fix: str
    devices: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "severity": self.severity, "title": self.title,
                "message": self.message, "fix": self.fix, "devices": list(self.devices),
                "models": list(self.models)}


def _rank(severity: str) -> int:
    return SEVERITIES.index(severity) if severity in SEVERITIES else len(SEVERITIES)


def group_findings(items: Iterable[tuple[str, str | None, Mapping[str, Any]]]
                   ) -> list[GroupedFinding]:
    """Group ``(device, model entity or None, finding)`` triples by finding code; most
    severe first, then by code. A code's severity is the most severe seen."""
    groups: dict[str, GroupedFinding] = {}
    messages: dict[str, set[str]] = {}
    for device, entity, raw in items:
        f = finding(raw)
        g = groups.get(f["code"])
        if g is None:
            g = groups[f["code"]] = GroupedFinding(f["code"], f["severity"], f["title"],
                                                   f["message"], f["fix"])
            messages[f["code"]] = set()
        if _rank(f["severity"]) < _rank(g.severity):
            g.severity = f["severity"]
        messages[f["code"]].add(f["message"])
        if device not in g.devices:
            g.devices.append(device)
        if entity and entity not in g.models:
            g.models.append(entity)
    for code, g in groups.items():
        if len(messages[code]) > 1:
            g.message = g.title or sorted(messages[code])[0]
        g.devices.sort()
        g.models.sort()
    return sorted(groups.values(), key=lambda g: (_rank(g.severity), g.code))
