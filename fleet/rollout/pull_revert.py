"""Cancel and rollback in pull mode: both change the desired state (nothing is pushed).

``fleet deployment cancel ID`` on a pull deployment (:func:`cancel_pull`, called by
:func:`fleet.rollout.resume.cancel_deployment` once the deployment is marked
``cancelled``): every device whose step has not ended gets back the desired state it had
before this deployment: the entry of the newest earlier pull deployment of the model in
which the device ended ``ok``/``skipped`` (so a device not yet updated stays on, or is
told again to run, its old version), or no entry for the model at all; its step becomes
``cancelled``. Devices that already activated keep the new version (that is what
``fleet rollback`` is for). Waves not opened yet never had a desired state.

``fleet rollback NAME`` to pull devices (:func:`rollback_pull`): a deployment of kind
``rollback`` (mode ``pull``) whose desired state names, per device, the version to go
back to (``--to V``, else the ``previous`` version the device last reported) with a
signed rollback order (the device's version floor accepts an older version only with
one). The device switches at its next check-in (its ``rollback`` verb when it still holds
the version, else download, stage and activate) and its step ends ``ok``.

Every change takes a new value of the registry's counter, so a device never accepts the
older state again (no replay).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlmodel import col, select

from fleet.core import errors
from fleet.core.pull import DesiredModel
from fleet.home import FleetHome
from fleet.registry import Device, Registry
from fleet.registry import history as hist
from fleet.registry.counters import next_value
from fleet.registry.models import (
    Artifact,
    Deployment,
    DeploymentKind,
    DeploymentStep,
    DesiredState,
    StepState,
)
from fleet.registry.types import utcnow
from fleet.rollout.deploy import DeployJob

__all__ = ["cancel_pull", "rollback_pull"]

_KEPT = (StepState.OK, StepState.SKIPPED)


def _earlier_entry(reg: Registry, dep: Deployment, device_id: uuid.UUID
                   ) -> dict[str, Any] | None:
    """The desired-state entry of the newest earlier pull deployment of ``dep.name`` that
    this device ended ``ok`` or ``skipped`` in; None when there is none."""
    from fleet.rollout.pull import MODE, entry_for

    with reg.reading() as s:
        rows = s.exec(select(Deployment).join(
            DeploymentStep, col(DeploymentStep.deployment_id) == col(Deployment.id))
            .where(Deployment.name == dep.name).where(col(Deployment.id) != dep.id)
            .where(col(Deployment.created_at) <= dep.created_at)
            .where(DeploymentStep.device_id == device_id)
            .where(col(DeploymentStep.state).in_(_KEPT))
            .order_by(col(Deployment.created_at).desc())).all()
    for d in rows:
        opts = d.options or {}
        if opts.get("mode") == MODE and opts.get("job") \
                and d.kind is DeploymentKind.DEPLOY:
            return entry_for(DeployJob.from_options(opts["job"]), d.id, opts.get("window"))
    return None


def cancel_pull(reg: Registry, dep_id: uuid.UUID) -> list[str]:
    """Put back the earlier desired state of every device whose step in the (cancelled)
    pull deployment ``dep_id`` has not ended, and cancel those steps; returns the names
    of the devices whose desired state changed."""
    with reg.reading() as s:
        dep = s.get(Deployment, dep_id)
        if dep is None:
            raise errors.NotFoundError(f"no deployment {dep_id}", id=str(dep_id))
        pairs = list(s.exec(select(DeploymentStep, Device).join(
            Device, col(Device.id) == col(DeploymentStep.device_id))
            .where(DeploymentStep.deployment_id == dep_id)).all())
    staged_done = not bool(((dep.options or {}).get("job") or {}).get("activate", True))
    changed: list[str] = []
    for st, dev in pairs:
        if st.state.terminal or (staged_done and st.state is StepState.STAGED):
            continue
        before = _earlier_entry(reg, dep, dev.id)
        counter = next_value(reg)
        with reg.session() as s:
            row = s.get(DesiredState, dev.id, with_for_update=True)
            if row is None or not any(m.get("deployment") == str(dep_id)
                                      for m in row.models):
                continue  # its wave never opened (or a later deployment replaced it)
            models = [m for m in row.models if m.get("name") != dep.name]
            row.models = sorted([*models, *([before] if before else [])],
                                key=lambda m: str(m.get("name")))
            row.counter = counter
            row.updated_at = utcnow()
            s.add(row)
        changed.append(dev.name)
    with reg.session() as s:
        hist.cancel_unfinished(s, dep_id, staged_is_done=staged_done,
                               reason="deployment cancelled: desired state reverted")
    return changed


def _previous(dev: Device, name: str) -> int | None:
    row = ((dev.facts or {}).get("_installed") or {}).get(name) or {}
    prev = row.get("previous")
    return prev if isinstance(prev, int) and not isinstance(prev, bool) else None


def rollback_pull(home: FleetHome, reg: Registry, name: str, devices: Sequence[Device], *,
                  to: int | None, target: str) -> tuple[uuid.UUID, dict[str, str]]:
    """Write the rollback desired state (see the module docstring) for ``devices`` (pull
    devices); returns the deployment id and, per device left out, why (no previous
    version known, or no package of that version on the controller): their steps fail."""
    from fleet.artifacts.trust import sign_order
    from fleet.rollout.pull import MODE, is_pull, put_entry

    push = [d.name for d in devices if not is_pull(d)]
    if push:
        raise errors.UsageError(f"pull and push devices in one rollback ({', '.join(push)} "
                                "are push devices): roll them back separately", devices=push)
    reverts = hist.last_deployment_of(reg, name, list(devices))
    dep, steps = hist.create_deployment(
        reg, name=name, version=to, target=target, devices=list(devices), artifact_id=None,
        kind=DeploymentKind.ROLLBACK, lease=None, reverts_id=reverts.id if reverts else None,
        options={"mode": MODE, "to": to, "open_wave": 1, "wave_count": 1})
    goal = {d.name: to if to is not None else _previous(d, name) for d in devices}
    skipped: dict[str, str] = {}
    orders: dict[int, dict[str, Any]] = {}
    for dev in devices:
        v = goal[dev.name]
        art = None
        if v is not None:
            with reg.reading() as s:
                art = s.exec(select(Artifact).where(Artifact.name == name)
                             .where(Artifact.version == v)
                             .order_by(col(Artifact.created_at).desc())).first()
        if v is None or art is None or dev.revoked_at is not None:
            why = ("revoked" if dev.revoked_at is not None else
                   f"no previous version of {name} known for it" if v is None else
                   f"no package of {name}@{v} on the controller")
            skipped[dev.name] = why
            hist.set_step(reg, steps[dev.name].id, StepState.FAILED,
                          error_code="no_rollback_target", error_message=why)
            continue
        if v not in orders:
            orders[v] = sign_order(home, reg, name=name, version=v, devices=[
                d.fingerprint for d in devices if goal[d.name] == v and d.fingerprint])
        entry = DesiredModel(name=name, version=v, kind=art.kind,
                             package_sha256=art.package_sha256, size=art.size,
                             digest=art.digest, order=orders[v],
                             deployment=str(dep.id)).to_dict()
        counter = next_value(reg)
        with reg.session() as s:
            put_entry(s, dev.id, entry, counter)
        hist.set_step(reg, steps[dev.name].id, StepState.PENDING, to=v, desired=counter)
    from fleet.rollout.pull import advance

    advance(reg, dep.id, home=home)  # every device left out: the rollback ends here
    return dep.id, skipped
