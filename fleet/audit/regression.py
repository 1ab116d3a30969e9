"""FA-regression, a controller-side audit rule: a version of a model that runs slower on a
device than the version before it did on the same device.

The agent's rules (``FA001``...) see one device and one report; a regression needs the
history, which only the registry has. For each device, the newest ``activate``/``bench``
report of the version judged (by default the newest version reported there) is compared
with the newest report of the highest lower version, under comparable conditions: the median of
the configuration the new version picked (what the device now serves) against the
previous version's median in the same backend, precision and thread count, from the
candidate tables both reports carry (memory modes folded: ``memory: low`` exists only for
weight-quantized variants). When the previous report did not measure that configuration,
the two picks are compared and the finding names both. Reports without candidate tables
(conditions not recorded) compare their picks' medians. A slowdown of more than
``threshold`` (a fraction; 0.10 = 10 %) is a finding. Docs: ``docs/audit-rules.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlmodel import col, select

from fleet.audit.candidates import CandidateRow, candidate_table
from fleet.audit.latest import latest_model_reports
from fleet.core import errors
from fleet.registry import Device, Registry
from fleet.registry.models import Report

__all__ = ["DEFAULT_THRESHOLD", "RULE_ID", "Regression", "compare_reports",
           "find_regressions", "regressions_after_deploy"]

RULE_ID = "FA-regression"
#: Slowdown that makes a finding, as a fraction of the previous version's median.
DEFAULT_THRESHOLD = 0.10

_Key = tuple[str, str, int | None]


@dataclass(frozen=True)
class Regression:
    """``model@version`` on ``device`` has median ``median_ms`` where ``model@previous``
    had ``previous_median_ms`` (milliseconds), measured as ``conditions`` (a
    ``backend/p-PRECISION/tTHREADS`` label, or ``"picks (conditions not recorded)"``)."""

    device: str
    model: str
    version: int
    previous_version: int
    median_ms: float
    previous_median_ms: float
    conditions: str
    threshold: float
    reported_at: datetime
    previous_reported_at: datetime

    @property
    def change(self) -> float:
        """Relative slowdown: 0.66 means 66 % slower."""
        return self.median_ms / self.previous_median_ms - 1.0

    @property
    def message(self) -> str:
        return (f"{self.model}@{self.version} median {self.median_ms:.4g} ms is "
                f"{self.change:+.0%} vs {self.model}@{self.previous_version} "
                f"({self.previous_median_ms:.4g} ms) on this device, {self.conditions}")

    def to_finding(self) -> dict[str, Any]:
        """The finding in the agent's shape (``id``, ``severity``, ``title``, ...)."""
        return {"id": RULE_ID, "severity": "warning",
                "title": "new version slower than the previous one on this device",
                "message": self.message,
                "fix": f"roll back (`fleet rollback {self.model}`) or find what changed "
                       f"(variant, conversion, runtime options)",
                "evidence": self.to_dict(), "model": self.model}

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "model": f"{self.model}@{self.version}",
                "name": self.model, "version": self.version,
                "previous": f"{self.model}@{self.previous_version}",
                "previous_version": self.previous_version,
                "median_ms": self.median_ms, "previous_median_ms": self.previous_median_ms,
                "change": round(self.change, 4), "conditions": self.conditions,
                "threshold": self.threshold, "reported_at": self.reported_at.isoformat(),
                "previous_reported_at": self.previous_reported_at.isoformat()}


def _key(r: CandidateRow) -> _Key:
    return (r.backend, r.precision, r.threads)


def _label(k: _Key) -> str:
    return f"{k[0]}/p-{k[1]}/t{k[2] if k[2] is not None else '?'}"


def _medians(rows: Sequence[CandidateRow]) -> dict[_Key, float]:
    """The best passing median per comparable configuration (memory modes folded)."""
    out: dict[_Key, float] = {}
    for r in rows:
        if r.passed and r.median_ms is not None:
            out[_key(r)] = min(out.get(_key(r), float("inf")), float(r.median_ms))
    return out


def compare_reports(device: str, new: Report, old: Report, threshold: float
                    ) -> Regression | None:
    """The regression of ``new`` against ``old`` (same device and model), or None when it
    is within ``threshold``, or the two share no comparable measurement."""
    name = str(new.model_name)
    new_t, old_t = candidate_table(device, new), candidate_table(device, old)
    found: tuple[float, float, str] | None = None  # (new ms, old ms, conditions)
    new_pick = next((r for r in new_t.rows if r.picked and r.median_ms is not None), None)
    old_pick = next((r for r in old_t.rows if r.picked and r.median_ms is not None), None)
    if new_pick is not None:
        same = _medians(old_t.rows).get(_key(new_pick))
        if same:
            found = (float(new_pick.median_ms or 0.0), same, _label(_key(new_pick)))
        elif old_pick is not None and old_pick.median_ms:
            found = (float(new_pick.median_ms or 0.0), float(old_pick.median_ms),
                     f"picks: {_label(_key(new_pick))} vs {_label(_key(old_pick))}")
    elif not new_t.rows and not old_t.rows and new.median_ms and old.median_ms:
        found = (float(new.median_ms), float(old.median_ms), "picks (conditions not recorded)")
    if found is None:
        return None
    new_ms, old_ms, cond = found
    if new_ms <= old_ms * (1.0 + threshold):
        return None
    return Regression(device=device, model=name, version=int(new.model_version or 0),
                      previous_version=int(old.model_version or 0), median_ms=new_ms,
                      previous_median_ms=old_ms, conditions=cond, threshold=threshold,
                      reported_at=new.created_at, previous_reported_at=old.created_at)


def find_regressions(reg: Registry, devices: Sequence[Device], model: str, *,
                     version: int | Mapping[str, int] | None = None,
                     threshold: float = DEFAULT_THRESHOLD) -> list[Regression]:
    """FA-regression of ``model`` on each of ``devices`` (one registry query).

    ``version``: the version judged, for every device (an int) or per device name (a
    mapping; a device missing from it is not judged); None judges each device's newest
    reported version. ``threshold``: the slowdown that counts, as a fraction (>= 0).
    Raises :class:`UsageError` for a negative threshold."""
    if threshold < 0:
        raise errors.UsageError(f"the regression threshold must be >= 0, not {threshold}")
    by_id = {d.id: d for d in devices}
    per_device: dict[str, dict[int, Report]] = {}
    for rep in latest_model_reports(reg, list(by_id), model=model):
        dev = by_id[rep.device_id]
        per_device.setdefault(dev.name, {})[int(rep.model_version or 0)] = rep
    out = []
    for dev in devices:
        reps = per_device.get(dev.name) or {}
        if isinstance(version, Mapping):
            want: int | None = version.get(dev.name)
            if want is None:
                continue
        else:
            want = version if version is not None else max(reps, default=None)
        if want is None or want not in reps:
            continue
        older = [v for v in reps if v < want]
        if not older:
            continue
        found = compare_reports(dev.name, reps[want], reps[max(older)], threshold)
        if found is not None:
            out.append(found)
    return out


def regressions_after_deploy(reg: Registry, device_names: Sequence[str], model: str,
                             version: int, *, threshold: float = DEFAULT_THRESHOLD
                             ) -> list[Regression]:
    """FA-regression of ``model@version`` on the named devices (a deploy's or a resume's
    result; two queries). Unknown names are ignored."""
    if not device_names:
        return []
    with reg.reading() as s:
        devs = list(s.exec(select(Device).where(col(Device.name).in_(list(device_names))))
                    .all())
    return find_regressions(reg, sorted(devs, key=lambda d: d.name), model, version=version,
                            threshold=threshold)
