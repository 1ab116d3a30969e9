"""Pruning the controller's package cache (``fleet gc``) by the devices' keep policy.

Built packages accumulate in ``$FLEET_HOME/artifacts`` (one ``.fpkg`` per build). Per
model or LoRA name, what a device keeps (``fleet-agent gc``: the active version, the
previous one and up to ``keep`` more) is what the controller keeps too, so that a rollback
or a re-deploy of a kept version never needs a rebuild:

- the newest ``keep + 2`` versions that reached any device (a step that ended ``ok``,
  ``activated`` or ``staged``);
- the newest built version of every name, deployed or not (what ``fleet package`` just
  made);
- every version of a deployment that is still ``running`` or ``interrupted`` (its resume
  needs the package).

Everything else is deleted: the package file (only files inside the cache folder; a path
the operator chose is never touched) and prepared-payload cache entries no kept version
uses. Registry rows stay (history); a deleted package is rebuilt when it is needed again
(``fleet.artifacts.publish`` checks the file). Pure planning (:func:`plan_gc`) is apart
from the deletion (:func:`apply_gc`).
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from sqlmodel import col, select

from fleet.artifacts.envelopes import remove_package
from fleet.core.package.bundle import bundle_path
from fleet.home import FleetHome
from fleet.registry import Artifact, Deployment, DeploymentStep, Registry
from fleet.registry.models import DeploymentState, StepState

__all__ = ["DEFAULT_KEEP", "GcPlan", "apply_gc", "plan_gc"]

DEFAULT_KEEP = 1
_REACHED = (StepState.OK, StepState.ACTIVATED, StepState.STAGED)


@dataclass
class GcPlan:
    """What ``fleet gc`` keeps and deletes; sizes in bytes."""

    keep: dict[str, list[int]] = field(default_factory=dict)  #: name -> kept versions
    delete: list[Path] = field(default_factory=list)  #: package files
    delete_prepared: list[Path] = field(default_factory=list)  #: prepared-cache folders
    bytes_freed: int = 0

    def to_dict(self) -> dict[str, object]:
        return {"keep": {k: sorted(v) for k, v in sorted(self.keep.items())},
                "delete": [str(p) for p in self.delete],
                "delete_prepared": [str(p) for p in self.delete_prepared],
                "bytes_freed": self.bytes_freed}


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def plan_gc(home: FleetHome, reg: Registry, *, keep: int = DEFAULT_KEEP) -> GcPlan:
    """Decide what to delete; touches nothing. ``keep`` >= 0 (``UsageError`` otherwise)."""
    from fleet.core import errors

    if keep < 0:
        raise errors.UsageError("--keep must be 0 or more")
    with reg.reading() as s:
        arts = list(s.exec(select(Artifact)).all())
        reached = s.exec(
            select(Deployment.name, Deployment.version)
            .join(DeploymentStep, col(DeploymentStep.deployment_id) == col(Deployment.id))
            .where(col(DeploymentStep.state).in_(_REACHED))
            .where(col(Deployment.version).is_not(None))).all()
        open_ = s.exec(select(Deployment.name, Deployment.version).where(
            col(Deployment.status).in_((DeploymentState.RUNNING,
                                        DeploymentState.INTERRUPTED)))).all()
    deployed: dict[str, set[int]] = defaultdict(set)
    for name, version in reached:
        if version is not None:
            deployed[name].add(int(version))
    built: dict[str, set[int]] = defaultdict(set)
    for a in arts:
        built[a.name].add(a.version)
    plan = GcPlan()
    for name, versions in built.items():
        kept = set(sorted(deployed.get(name, set()), reverse=True)[:keep + 2])
        kept.add(max(versions))
        kept |= {int(v) for n, v in open_ if n == name and v is not None}
        plan.keep[name] = sorted(kept)
    kept_files: set[str] = set()  # sha256 of every payload file a kept version holds
    folder = home.artifacts_dir
    for a in arts:
        if a.version in plan.keep[a.name]:
            kept_files.add(a.digest)
            kept_files.update(str(f.get("sha256")) for f in a.manifest.get("files") or []
                              if isinstance(f, dict))
            continue
        path = Path(a.path)
        if path.is_file() and _inside(path, folder) and path not in plan.delete:
            plan.delete.append(path)
            plan.bytes_freed += path.stat().st_size
            bundle = bundle_path(path)
            if bundle.is_file():
                plan.bytes_freed += bundle.stat().st_size
    prepared = home.path / "cache" / "prepared"
    if prepared.is_dir():
        for entry in sorted(prepared.iterdir()):
            files = _prepared_files(entry)
            if files is not None and not files & kept_files:
                plan.delete_prepared.append(entry)
                plan.bytes_freed += sum(f.stat().st_size for f in entry.rglob("*")
                                        if f.is_file())
    return plan


def _prepared_files(entry: Path) -> set[str] | None:
    """The sha256 of the payload files a prepared-cache entry holds (its ``spec.json``), or
    None when it cannot tell (such an entry is kept)."""
    try:
        doc = json.loads((entry / "spec.json").read_text())
    except (OSError, ValueError):
        return None
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict) or not files:
        return None
    return {str(v) for v in files.values()}


def apply_gc(plan: GcPlan) -> int:
    """Delete what ``plan`` lists; returns the bytes freed. Missing files are fine."""
    for path in plan.delete:
        remove_package(path)  # and its key envelope bundle
    for entry in plan.delete_prepared:
        shutil.rmtree(entry, ignore_errors=True)
    return plan.bytes_freed
