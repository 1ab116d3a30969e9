"""Deployments in pull mode: desired state instead of pushes (the seam beside fan-out).

``fleet deploy … --group field`` whose targets are ``pull://`` devices does not connect
to anything: :func:`start` records the deployment (mode ``pull`` in its options, one step
per device, its wave) and writes the first wave's **desired state** (table
``desired_states``: per device, the models it should run, with a counter from the
registry's counter). ``fleet server`` signs it for each device at check-in
(:mod:`fleet.core.pull`); what the device then says moves its step:

==================  ====================  ==============================================
device says         step                  ``fleet deployment show``
==================  ====================  ==============================================
(nothing yet)       ``pending``           waiting for check-in
``downloading``     ``pushing``           downloading
``staged``          ``staged``            staged
``activating``      ``activating``        activating
signed report       ``activated``, ``ok`` active
``skipped``         ``skipped``           already active
``failed``          ``failed``            failed (its error code and message)
``rolled_back``     ``rolled_back``       rolled back by the gate
==================  ====================  ==============================================

Waves (:func:`advance`, called after every step that ends): when every device of the
open wave has ended, its gate counts the failed ones; more than ``max_failed`` halts the
rollout (later waves ``not_started``; every device this rollout activated gets a desired
state that takes it back to its previous version with a signed rollback order), else the
next wave's desired state is written; after the last wave the deployment finishes as push
deployments do. A device that joins a target group later (or enrolls later) joins the
newest pull deployment of each model to that group at its next check-in, in its open
wave (a finished deployment reopens until the late device has ended: :func:`late_join`).

LoRA packs travel the same way (``fleet lora push PACK`` to pull devices: entries of
kind ``lora``, :mod:`fleet.rollout.pull_lora`).

A pull deployment holds no lease (no controller process drives it; ``fleet server``
does, on the devices' schedule), so :func:`fleet.rollout.lease.reap_stale` leaves it
running.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlmodel import Session, col, select

from fleet.core import errors
from fleet.core.pull import DesiredModel, parse_window
from fleet.home import FleetHome
from fleet.registry import Device, Registry
from fleet.registry import history as hist
from fleet.registry.counters import next_value
from fleet.registry.db import serialize
from fleet.registry.models import (
    Artifact,
    Deployment,
    DeploymentKind,
    DeploymentState,
    DeploymentStep,
    DesiredState,
    Group,
    Membership,
    StepEvent,
    StepState,
)
from fleet.registry.types import utcnow
from fleet.rollout.deploy import DeployJob
from fleet.rollout.plan import split_waves

__all__ = ["MODE", "PROGRESS", "Progress", "advance", "apply_progress", "desired_of",
           "entry_for", "is_pull", "late_join", "put_entry", "record_report", "start",
           "step_view"]

MODE = "pull"

#: what a device may say about one model -> the step state it moves to
PROGRESS: dict[str, StepState] = {
    "downloading": StepState.PUSHING, "staged": StepState.STAGED,
    "activating": StepState.ACTIVATING, "skipped": StepState.SKIPPED,
    "failed": StepState.FAILED, "rolled_back": StepState.ROLLED_BACK,
}
#: how ``fleet deployment show`` words a pull step
VIEW: dict[StepState, str] = {
    StepState.PENDING: "waiting for check-in", StepState.PUSHING: "downloading",
    StepState.STAGED: "staged", StepState.ACTIVATING: "activating",
    StepState.ACTIVATED: "active", StepState.OK: "active", StepState.FAILED: "failed",
    StepState.SKIPPED: "already active", StepState.ROLLED_BACK: "rolled back",
    StepState.ROLLING_BACK: "rolling back", StepState.NOT_STARTED: "not started",
    StepState.CANCELLED: "cancelled",
}


def is_pull(dev: Device) -> bool:
    return dev.uri.startswith("pull://")


def step_view(state: StepState) -> str:
    return VIEW.get(state, state.value)


@dataclass(frozen=True)
class Progress:
    """One model's progress as a device reports it at check-in."""

    name: str
    version: int
    state: str
    deployment: str | None = None
    error_code: str | None = None
    error_message: str | None = None


# -- writing desired state ----------------------------------------------------------------
def entry_for(job: DeployJob, dep_id: uuid.UUID, window: str | None = None
              ) -> dict[str, Any]:
    """The desired-state entry of deployment ``dep_id`` (``window``: its install window,
    ``HH:MM-HH:MM`` device-local)."""
    try:
        size = job.package.stat().st_size  # the file a device downloads
    except OSError:  # gone (fleet gc): the server leaves the entry out at check-in
        size = job.size
    return DesiredModel(name=job.name, version=job.version, kind=job.kind,
                        package_sha256=job.package_sha256, size=size,
                        digest=job.digest, activate=job.activate,
                        deployment=str(dep_id), window=window).to_dict()


def put_entry(s: Session, device_id: uuid.UUID, entry: dict[str, Any], counter: int
              ) -> None:
    """Upsert ``entry`` (by model name) into the device's desired state at ``counter``."""
    row = s.get(DesiredState, device_id)
    if row is None:
        row = DesiredState(device_id=device_id, counter=counter, models=[])
    models = [m for m in row.models if m.get("name") != entry["name"]]
    row.models = sorted([*models, entry], key=lambda m: str(m.get("name")))
    row.counter = counter
    row.updated_at = utcnow()
    s.add(row)


def _open_wave(reg: Registry, dep_id: uuid.UUID, wave: int) -> None:
    counter = next_value(reg)  # before the session: SQLite has one writer at a time
    with reg.session() as s:
        serialize(s, f"pull:{dep_id}")
        dep = s.get(Deployment, dep_id)
        if dep is None or int((dep.options or {}).get("open_wave") or 0) >= wave:
            return
        job = DeployJob.from_options(dep.options["job"])
        entry = entry_for(job, dep_id, dep.options.get("window"))
        steps = s.exec(select(DeploymentStep).where(
            DeploymentStep.deployment_id == dep_id)).all()
        for st in steps:
            if (st.wave or 1) == wave and st.state is StepState.PENDING:
                put_entry(s, st.device_id, entry, counter)
                s.add(StepEvent(step_id=st.id, state=StepState.PENDING,
                                detail={"desired": counter, "wave": wave}))
        dep.options = {**dep.options, "open_wave": wave}
        s.add(dep)


def start(reg: Registry, job: DeployJob, devices: Sequence[Device], *, target: str,
          groups: Sequence[str] = (), waves: str | None = None, max_failed: int = 0,
          window: str | None = None) -> uuid.UUID:
    """Record a pull deployment of ``job`` to ``devices`` (``groups``: the target groups,
    whose later members join it) and write the first wave's desired state. ``window``:
    the device-local install window (``HH:MM-HH:MM``, :func:`fleet.core.pull.parse_window`)
    every entry carries. UsageError (exit 2) for a target that is not a ``pull://``
    device or a malformed window."""
    if window is not None:
        parse_window(window)
    push = [d.name for d in devices if not is_pull(d)]
    if push:
        raise errors.UsageError(f"not pull devices: {', '.join(push)}; deploy pull and "
                                "push devices separately", devices=push)
    names = [d.name for d in devices]
    wave_list = split_waves(names, waves) if waves and names else [names]
    dep, _ = hist.create_deployment(
        reg, name=job.name, version=job.version, target=target, devices=list(devices),
        artifact_id=job.artifact_id, lease=None,
        waves={n: i for i, w in enumerate(wave_list, 1) for n in w} if waves else None,
        options={"mode": MODE, "job": job.to_options(), "waves": waves,
                 "max_failed": max_failed, "groups": list(groups), "open_wave": 0,
                 "wave_count": len(wave_list), "window": window})
    _open_wave(reg, dep.id, 1)
    return dep.id


# -- reading it (the server, at check-in) ---------------------------------------------------
def desired_of(reg: Registry, device_id: uuid.UUID) -> DesiredState | None:
    with reg.reading() as s:
        return s.get(DesiredState, device_id)


def set_envelope(reg: Registry, device_id: uuid.UUID, name: str, envelope: str | None
                 ) -> None:
    """Keep the envelope the server sealed for one entry (the counter stays: the state
    means the same; the device accepts an equal counter)."""
    with reg.session() as s:
        row = s.get(DesiredState, device_id)
        if row is None:
            return
        row.models = [({**m, "envelope": envelope} if m.get("name") == name else m)
                      for m in row.models]
        s.add(row)


def package_path(reg: Registry, package_sha256: str) -> str | None:
    with reg.reading() as s:
        return s.exec(select(Artifact.path).where(
            Artifact.package_sha256 == package_sha256)).first()


# -- late joiners ---------------------------------------------------------------------------
_cache: dict[str, tuple[float, list[tuple[uuid.UUID, list[str]]]]] = {}
CACHE_S = 2.0
#: a finished pull deployment a late device still joins (it reopens): not a halted,
#: cancelled or interrupted one
_JOINABLE = (DeploymentState.RUNNING, DeploymentState.COMPLETED, DeploymentState.FAILED)


def _joinable(reg: Registry) -> list[tuple[uuid.UUID, list[str]]]:
    """Per model name the newest joinable pull deployment to groups, with its groups
    (cached ``CACHE_S`` per process: every check-in asks)."""
    hit = _cache.get(reg.url)
    if hit is not None and time.monotonic() - hit[0] < CACHE_S:
        return hit[1]
    with reg.reading() as s:
        deps = s.exec(select(Deployment).where(col(Deployment.status).in_(_JOINABLE))
                      .order_by(col(Deployment.created_at).desc())).all()
        found: dict[str, tuple[uuid.UUID, list[str]]] = {}
        for d in deps:
            opts = d.options or {}
            if opts.get("mode") == MODE and opts.get("groups") and d.name not in found:
                found[d.name] = (d.id, list(opts["groups"]))
    _cache[reg.url] = (time.monotonic(), list(found.values()))
    return list(found.values())


def late_join(reg: Registry, device: Device) -> list[uuid.UUID]:
    """Add ``device`` to the newest pull deployment of each model that targets one of its
    groups and that it is not part of yet (a finished one reopens), in the open wave,
    with its desired state; returns their ids."""
    running = _joinable(reg)
    if not running or device.revoked_at is not None:
        return []
    with reg.reading() as s:
        mine = set(s.exec(select(Group.name).join(
            Membership, col(Membership.group_id) == col(Group.id))
            .where(Membership.device_id == device.id)).all())
        cand = [i for i, g in running if mine & set(g)]
        if not cand:
            return []
        have = set(s.exec(select(DeploymentStep.deployment_id).where(
            DeploymentStep.device_id == device.id)
            .where(col(DeploymentStep.deployment_id).in_(cand))).all())
    joined = []
    for dep_id in cand:
        if dep_id in have:
            continue
        counter = next_value(reg)
        with reg.session() as s:
            serialize(s, f"pull:{dep_id}")
            dep = s.get(Deployment, dep_id)
            if dep is None or dep.status not in _JOINABLE:
                continue
            if s.exec(select(DeploymentStep).where(DeploymentStep.deployment_id == dep_id)
                      .where(DeploymentStep.device_id == device.id)).first() is not None:
                continue
            wave = max(int(dep.options.get("open_wave") or 1), 1)
            st = DeploymentStep(deployment_id=dep_id, device_id=device.id,
                                wave=wave if dep.options.get("waves") else None)
            s.add(st)
            s.flush()
            s.add(StepEvent(step_id=st.id, state=StepState.PENDING,
                            detail={"late_join": True, "desired": counter, "wave": wave}))
            put_entry(s, device.id, entry_for(DeployJob.from_options(dep.options["job"]),
                                              dep_id, dep.options.get("window")), counter)
            if dep.status is not DeploymentState.RUNNING:
                dep.status = DeploymentState.RUNNING  # reopened until the late one ends
                dep.finished_at = None
                dep.status_reason = f"reopened: {device.name} joined late"
                s.add(dep)
            joined.append(dep_id)
    if joined:
        _cache.pop(reg.url, None)
    return joined


# -- what devices say -----------------------------------------------------------------------
def _step(s: Session, dep_id: uuid.UUID, device_id: uuid.UUID) -> DeploymentStep | None:
    return s.exec(select(DeploymentStep).where(DeploymentStep.deployment_id == dep_id)
                  .where(DeploymentStep.device_id == device_id)).first()


def _dep_id(ref: str | None) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(ref)) if ref else None
    except ValueError:
        return None


def apply_progress(reg: Registry, device: Device, items: Sequence[Progress], *,
                   home: FleetHome | None = None) -> list[str]:
    """Move the device's steps as it says (forward only; an ended step stays as it is);
    returns the deployments whose step ended, after :func:`advance` ran for each."""
    ended: list[uuid.UUID] = []
    for p in items:
        dep_id = _dep_id(p.deployment)
        target = PROGRESS.get(p.state)
        if dep_id is None or target is None:
            continue
        with reg.reading() as s:
            st = _step(s, dep_id, device.id)
            dep = s.get(Deployment, dep_id)
        if st is None or dep is None or st.state.terminal or st.state is target \
                or (dep.version is not None and dep.version != p.version):
            continue
        if dep.kind is DeploymentKind.ROLLBACK and target in (StepState.ROLLED_BACK,
                                                              StepState.SKIPPED):
            target = StepState.OK  # `fleet rollback` reached its goal on this device
        if target is StepState.STAGED and not (dep.options.get("job") or {}).get(
                "activate", True):
            hist.set_step(reg, st.id, target, done=True, reported=True)
        elif target is StepState.FAILED:
            hist.set_step(reg, st.id, target, error_code=p.error_code or "agent",
                          error_message=p.error_message or "failed on the device")
        else:
            hist.set_step(reg, st.id, target, reported=True)
        if target.terminal or target is StepState.STAGED:
            ended.append(dep_id)
    for dep_id in dict.fromkeys(ended):
        advance(reg, dep_id, home=home)
    return [str(i) for i in dict.fromkeys(ended)]


def record_report(reg: Registry, device: Device, body: dict[str, Any], *,
                  home: FleetHome | None = None) -> uuid.UUID | None:
    """A verified activation report (:func:`fleet.core.pull.verify_report`): the step's
    ``activated`` + report + ``ok``, then :func:`advance` (a LoRA pack's swap report:
    :func:`fleet.rollout.pull_lora.record_swap`). Returns the deployment id, or None when
    the report names no step of this device (kept as a plain report)."""
    dep_id = _dep_id(body.get("deployment"))
    raw = body.get("report")
    report: dict[str, Any] = dict(raw) if isinstance(raw, dict) else {}
    with reg.reading() as s:
        st = _step(s, dep_id, device.id) if dep_id else None
        dep = s.get(Deployment, dep_id) if dep_id else None
    if dep_id is None or st is None or st.state.terminal:
        hist.add_report(reg, device, "activate", report)
        return None
    from fleet.rollout import pull_lora

    if dep is not None and pull_lora.is_lora(dep.options):  # a LoRA pack's swap
        pull_lora.record_swap(reg, st, device, dep_id, report)
        reg.touch_device(device.name, status="ok")
        advance(reg, dep_id, home=home)
        return dep_id
    hist.record_activation(reg, st.id, device, report, deployment_id=dep_id,
                           bytes_sent=body.get("bytes_received"))
    reg.touch_device(device.name, status="ok")
    advance(reg, dep_id, home=home)
    return dep_id


# -- waves ----------------------------------------------------------------------------------
def _ended(st: DeploymentStep, staged_done: bool) -> bool:
    return st.state.terminal or (staged_done and st.state is StepState.STAGED)


def _roll_back(reg: Registry, home: FleetHome, dep: Deployment,
               steps: list[DeploymentStep]) -> None:
    """The gate failed: every device this rollout activated gets a desired state that
    takes it back to the version its activation report names as previous, with a signed
    rollback order (the device's version floor needs one); its step ``rolling_back``."""
    from fleet.artifacts.trust import sign_order

    prev = {r.device_id: (r.body or {}).get("previous")
            for r in hist.deployment_reports(reg, dep.id)}
    for st in steps:
        back = prev.get(st.device_id)
        if st.state is not StepState.OK or not isinstance(back, int):
            continue
        with reg.reading() as s:
            dev = s.get(Device, st.device_id)
            art = s.exec(select(Artifact).where(Artifact.name == dep.name)
                         .where(Artifact.version == back)
                         .order_by(col(Artifact.created_at).desc())).first()
        if dev is None or art is None:
            continue
        order = sign_order(home, reg, name=dep.name, version=back,
                           devices=[dev.fingerprint] if dev.fingerprint else None)
        entry = DesiredModel(name=dep.name, version=back, kind=art.kind,
                             package_sha256=art.package_sha256, size=art.size,
                             digest=art.digest, order=order,
                             deployment=str(dep.id)).to_dict()
        counter = next_value(reg)
        with reg.session() as s:
            put_entry(s, st.device_id, entry, counter)
        hist.set_step(reg, st.id, StepState.ROLLING_BACK, to=back, desired=counter)


def advance(reg: Registry, dep_id: uuid.UUID, *, home: FleetHome | None = None
            ) -> DeploymentState | None:
    """Judge the open wave once all its devices have ended: halt (gate; with ``home``
    the activated devices are rolled back through their desired state), open the next
    wave, or finish the deployment. Idempotent; returns the deployment's state after."""
    with reg.reading() as s:
        dep = s.get(Deployment, dep_id)
        if dep is None or dep.status is not DeploymentState.RUNNING \
                or (dep.options or {}).get("mode") != MODE:
            return None
        steps = list(s.exec(select(DeploymentStep).where(
            DeploymentStep.deployment_id == dep_id)).all())
    opts = dep.options
    staged_done = not bool((opts.get("job") or {}).get("activate", True))
    open_wave = int(opts.get("open_wave") or 1)
    count = int(opts.get("wave_count") or 1)
    cur = [st for st in steps if (st.wave or 1) <= open_wave]
    if not all(_ended(st, staged_done) for st in cur):
        return DeploymentState.RUNNING
    failed = sum(1 for st in cur if (st.wave or 1) == open_wave
                 and st.state is StepState.FAILED)
    if opts.get("waves") and failed > int(opts.get("max_failed") or 0):
        for st in steps:
            if (st.wave or 1) > open_wave and not st.state.terminal:
                hist.set_step(reg, st.id, StepState.NOT_STARTED,
                              reason=f"halted at wave {open_wave}")
        if home is not None:
            _roll_back(reg, home, dep, steps)
        return hist.finish_deployment(reg, dep_id, halted_at=open_wave,
                                      reason=f"wave {open_wave} gate failed: {failed} "
                                             "device(s) failed")
    if open_wave < count:
        _open_wave(reg, dep_id, open_wave + 1)
        return advance(reg, dep_id, home=home)
    if any(not _ended(st, staged_done) for st in steps):
        return DeploymentState.RUNNING
    return hist.finish_deployment(reg, dep_id)
