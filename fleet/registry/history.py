"""What happened: artifacts built, deployments and their per-device steps (every state
change is a row), reports and findings, capability snapshots, LoRA state.

A deployment's lease is read and written by :mod:`fleet.rollout.lease`; the states are
:class:`~fleet.registry.models.DeploymentState` and :class:`~fleet.registry.models.StepState`.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, func, insert, update
from sqlmodel import Session, col, select

from fleet.core import errors
from fleet.registry import facts
from fleet.registry.api import IN_CHUNK, Registry, chunked
from fleet.registry.db import serialize
from fleet.registry.models import (
    Artifact,
    CapabilitySnapshot,
    Deployment,
    DeploymentKind,
    DeploymentState,
    DeploymentStep,
    Device,
    Finding,
    LoraState,
    Report,
    StepEvent,
    StepState,
)
from fleet.registry.types import utcnow

__all__ = [
    "StepChange",
    "add_report",
    "add_snapshot",
    "apply_state",
    "cancel_unfinished",
    "create_deployment",
    "deployment_reports",
    "final_state",
    "find_deployment",
    "finish_deployment",
    "get_deployment",
    "last_deployment_of",
    "latest_reports",
    "list_deployments",
    "lora_states",
    "next_version",
    "note_activation",
    "note_step",
    "record_activation",
    "record_artifact",
    "record_attempt",
    "record_steps",
    "report_rows",
    "reports_for",
    "reverting",
    "set_lora_state",
    "set_step",
    "step_events",
    "steps_of",
]

def next_version(reg: Registry, name: str) -> int:
    with reg.session() as s:
        rows = s.exec(select(Artifact.version).where(Artifact.name == name)).all()
    return max(rows, default=0) + 1


def record_artifact(reg: Registry, *, name: str, kind: str, version: int, digest: str,
                    package_sha256: str, size: int, path: str, manifest: dict[str, Any]
                    ) -> Artifact:
    with reg.session() as s:
        found = s.exec(select(Artifact).where(Artifact.package_sha256 == package_sha256)).first()
        if found:
            return found
        art = Artifact(name=name, kind=kind, version=version, digest=digest,
                       package_sha256=package_sha256, size=size, path=path, manifest=manifest)
        s.add(art)
        return art


def create_deployment(reg: Registry, *, name: str, version: int | None, target: str,
                      devices: list[Device], artifact_id: uuid.UUID | None,
                      options: dict[str, Any] | None = None,
                      kind: DeploymentKind = DeploymentKind.DEPLOY,
                      waves: dict[str, int] | None = None,
                      lease: tuple[str, int] | None = None,
                      reverts_id: uuid.UUID | None = None
                      ) -> tuple[Deployment, dict[str, DeploymentStep]]:
    """The deployment row (``running``, holding ``lease`` = (host, pid) when given) and one
    ``pending`` step per device (``waves``: device -> its 1-based wave), in one
    transaction: a crash leaves all of it or none."""
    with reg.session() as s:
        now = utcnow()
        dep = Deployment(name=name, version=version, target=target, artifact_id=artifact_id,
                         options=options or {}, kind=kind, reverts_id=reverts_id,
                         lease_host=lease[0] if lease else None,
                         lease_pid=lease[1] if lease else None,
                         heartbeat_at=now if lease else None)
        s.add(dep)
        s.flush()
        steps = {d.name: DeploymentStep(deployment_id=dep.id, device_id=d.id, updated_at=now,
                                        wave=(waves or {}).get(d.name)) for d in devices}
        if steps:  # bulk inserts (executemany), not one flush per device
            s.execute(insert(DeploymentStep), [st.model_dump() for st in steps.values()])
            s.execute(insert(StepEvent), [
                {"id": uuid.uuid4(), "step_id": st.id, "state": StepState.PENDING, "at": now,
                 "detail": {}} for st in steps.values()])
        return dep, steps


def apply_state(st: DeploymentStep, state: StepState, *, done: bool) -> None:
    """Move the row ``st`` to ``state`` in memory (timings; ``done``: it ends here)."""
    now = utcnow()
    st.state = state
    st.updated_at = now
    if st.started_at is None and state is not StepState.PENDING:
        st.started_at = now
    if done or state.terminal:
        st.finished_at = now


def set_step(reg: Registry, step_id: uuid.UUID, state: StepState, *,
             error_code: str | None = None, error_message: str | None = None,
             bytes_sent: int | None = None, attempt: bool = False, done: bool = False,
             **detail: Any) -> None:
    """Move a step to ``state`` and append the event row (one transaction). ``done``: the
    step ends here although ``state`` is not terminal by itself (``staged`` for a
    ``--no-activate`` deployment)."""
    with reg.session() as s:
        _set_step(s, step_id, StepState(state), error_code=error_code,
                  error_message=error_message, bytes_sent=bytes_sent, attempt=attempt,
                  done=done, detail=detail)


def _step(s: Session, step_id: uuid.UUID) -> DeploymentStep:
    """The step's row, locked (``FOR UPDATE``): its writers queue (PostgreSQL; SQLite's
    BEGIN IMMEDIATE already serialised them), so ``attempts += 1`` loses no count."""
    st = s.get(DeploymentStep, step_id, with_for_update=True)
    if st is None:
        raise errors.NotFoundError(f"no deployment step {step_id}", step=str(step_id))
    return st


def _set_step(s: Session, step_id: uuid.UUID, state: StepState, *, error_code: str | None,
              error_message: str | None, bytes_sent: int | None, attempt: bool, done: bool,
              detail: dict[str, Any]) -> None:
    note_step(s, _step(s, step_id), state, error_code=error_code,
              error_message=error_message, bytes_sent=bytes_sent, attempt=attempt, done=done,
              detail=detail)


def note_step(s: Session, st: DeploymentStep, state: StepState, *, error_code: str | None,
              error_message: str | None, bytes_sent: int | None, attempt: bool, done: bool,
              detail: dict[str, Any]) -> None:
    """:func:`set_step` on the row ``st`` (locked by the caller), in ``s``'s transaction."""
    step_id = st.id
    apply_state(st, state, done=done)
    if error_code is not None or state is not StepState.FAILED:
        st.error_code = error_code
        st.error_message = error_message
    if bytes_sent is not None:
        st.bytes_sent = bytes_sent
    if attempt:
        st.attempts += 1
    s.add(st)
    ev_detail = dict(detail)
    if error_code:
        ev_detail.update(error_code=error_code, error_message=error_message)
    s.add(StepEvent(step_id=step_id, state=state, detail=ev_detail))


@dataclass(frozen=True)
class StepChange:
    """One step's move for :func:`record_steps`: its new state, the event's detail, and
    the error (None clears it) and bytes sent (None keeps them)."""

    step_id: uuid.UUID
    state: StepState
    detail: dict[str, Any] = field(default_factory=dict)
    error_code: str | None = None
    error_message: str | None = None
    bytes_sent: int | None = None
    done: bool = False


def record_steps(reg: Registry, changes: Sequence[StepChange]) -> int:
    """Many steps' moves in one transaction (a farm worker's, or a dispatcher's, batch):
    each step takes its state as :func:`set_step` would set it (timings from the
    database's own ``started_at``/``finished_at``) and gets its event, in two executemany
    statements whatever the batch's size. The UPDATE locks each row it changes, so two
    writers of one step queue. Returns how many changes were written; an unknown step is
    skipped by the UPDATE but its event fails the foreign key (IntegrityError, nothing
    written)."""
    if not changes:
        return 0
    t = DeploymentStep.__table__  # type: ignore[attr-defined]
    now = utcnow()
    stmt = (update(t).where(t.c.id == bindparam("b_id")).values(
        state=bindparam("b_state"), updated_at=bindparam("b_now"),
        started_at=func.coalesce(t.c.started_at, bindparam("b_start")),
        finished_at=func.coalesce(bindparam("b_finish"), t.c.finished_at),
        error_code=bindparam("b_code"), error_message=bindparam("b_message"),
        bytes_sent=func.coalesce(bindparam("b_bytes"), t.c.bytes_sent)))
    rows = [{"b_id": c.step_id, "b_state": StepState(c.state), "b_now": now,
             "b_start": None if c.state is StepState.PENDING else now,
             "b_finish": now if (c.done or StepState(c.state).terminal) else None,
             "b_code": c.error_code, "b_message": c.error_message, "b_bytes": c.bytes_sent}
            for c in changes]
    events = [{"id": uuid.uuid4(), "step_id": c.step_id, "state": StepState(c.state),
               "at": now, "detail": dict(c.detail) | ({"error_code": c.error_code,
                                                       "error_message": c.error_message}
                                                      if c.error_code else {})}
              for c in changes]
    with reg.session() as s:
        s.connection().execute(stmt, rows)
        s.execute(insert(StepEvent), events)
    return len(changes)


def record_attempt(reg: Registry, step_id: uuid.UUID, attempt_no: int) -> StepState:
    """A ``connecting`` event for one attempt; the step's state moves to ``connecting``
    only from ``pending``, so it keeps saying how far the device got (the reconcile table
    reads it). Returns that state."""
    with reg.session() as s:
        st = _step(s, step_id)
        if st.state is StepState.PENDING:
            apply_state(st, StepState.CONNECTING, done=False)
        st.attempts += 1
        s.add(st)
        s.add(StepEvent(step_id=step_id, state=StepState.CONNECTING,
                        detail={"attempt_no": attempt_no}))
        return StepState(st.state)


def record_activation(reg: Registry, step_id: uuid.UUID, device: Device, body: dict[str, Any],
                      *, deployment_id: uuid.UUID, bytes_sent: int | None,
                      recovered: bool = False) -> None:
    """``activated`` + the report (+ its findings and probe snapshot) + ``ok``, in one
    transaction. ``recovered``: the activation finished while no controller watched and
    the report was read back from the agent afterwards."""
    with reg.session() as s:
        note_activation(s, _step(s, step_id), device, body, deployment_id=deployment_id,
                        bytes_sent=bytes_sent, recovered=recovered)


def note_activation(s: Session, st: DeploymentStep, device: Device, body: dict[str, Any],
                    *, deployment_id: uuid.UUID, bytes_sent: int | None,
                    recovered: bool = False) -> None:
    """:func:`record_activation` on the row ``st`` (locked), in ``s``'s transaction."""
    extra = {"recovered": True} if recovered else {}
    note_step(s, st, StepState.ACTIVATED, error_code=None, error_message=None,
              bytes_sent=None, attempt=False, done=False, detail=extra)
    _add_report(s, device, "activate", body, deployment_id=deployment_id)
    if body.get("probe"):
        s.add(CapabilitySnapshot(device_id=device.id, probe=body["probe"]))
    facts.note_activation(s, device.id, body)  # selectors: hw.*, model.NAME
    note_step(s, st, StepState.OK, error_code=None, error_message=None,
              bytes_sent=bytes_sent, attempt=False, done=True, detail=extra)


def get_deployment(reg: Registry, deployment_id: uuid.UUID) -> Deployment:
    with reg.session() as s:
        dep = s.get(Deployment, deployment_id)
    if dep is None:
        raise errors.NotFoundError(f"no deployment {deployment_id}", id=str(deployment_id))
    return dep


def find_deployment(reg: Registry, ref: str) -> Deployment:
    """A deployment by its id or an unambiguous prefix of it (hex, dashes optional)."""
    want = ref.strip().lower().replace("-", "")
    if not want or any(c not in "0123456789abcdef" for c in want):
        raise errors.UsageError(f"{ref!r} is not a deployment id (hex digits)", ref=ref)
    with reg.session() as s:
        ids = list(s.exec(select(Deployment.id)).all())
    hits = [i for i in ids if i.hex.startswith(want)]
    if not hits:
        raise errors.NotFoundError(f"no deployment {ref!r}", ref=ref)
    if len(hits) > 1:
        raise errors.UsageError(f"deployment id {ref!r} is ambiguous: "
                                f"{', '.join(sorted(str(h) for h in hits)[:5])}",
                                ref=ref, matches=len(hits))
    return get_deployment(reg, hits[0])


def list_deployments(reg: Registry, *, limit: int = 50
                     ) -> list[tuple[Deployment, dict[StepState, int]]]:
    """Newest first, with the count of steps per state (two queries)."""
    with reg.session() as s:
        deps = list(s.exec(select(Deployment).order_by(col(Deployment.created_at).desc())
                           .limit(limit)).all())
        ids = [d.id for d in deps]
        rows = s.exec(select(DeploymentStep.deployment_id, DeploymentStep.state,
                             func.count()).where(col(DeploymentStep.deployment_id).in_(ids))
                      .group_by(col(DeploymentStep.deployment_id),
                                col(DeploymentStep.state))).all() if ids else []
    counts: dict[uuid.UUID, dict[StepState, int]] = {i: {} for i in ids}
    for dep_id, state, n in rows:
        counts[dep_id][StepState(state)] = int(n)
    return [(d, counts[d.id]) for d in deps]


def final_state(states: list[StepState], *, staged_is_done: bool = False,
                halted: bool = False) -> DeploymentState:
    """What a deployment whose run ended is, from its steps: any step unfinished ->
    ``interrupted`` (resumable); a failed wave gate -> ``halted``; any failure ->
    ``failed``; else ``completed``."""
    def unfinished(x: StepState) -> bool:
        return not x.terminal and not (staged_is_done and x is StepState.STAGED)

    if halted:
        return DeploymentState.HALTED
    if any(unfinished(x) for x in states):
        return DeploymentState.INTERRUPTED
    if any(x in (StepState.FAILED, StepState.ROLLBACK_FAILED) for x in states):
        return DeploymentState.FAILED
    return DeploymentState.COMPLETED


def finish_deployment(reg: Registry, deployment_id: uuid.UUID, *,
                      lease: tuple[str, int] | None = None, halted_at: int | None = None,
                      reason: str | None = None) -> DeploymentState:
    """End a ``running`` deployment held by ``lease`` with the state its steps say, and
    drop the lease. If someone else changed it meanwhile (``cancelled``, or marked
    ``interrupted`` while this process slept), that stands; a cancelled deployment's
    unfinished steps become ``cancelled``. Returns the deployment's state."""
    with reg.session() as s:
        dep = s.get(Deployment, deployment_id, with_for_update=True)  # vs cancel, reap
        if dep is None:
            raise errors.NotFoundError(f"no deployment {deployment_id}")
        staged_done = not bool((dep.options.get("job") or {}).get("activate", True))
        holds = lease is None or (dep.lease_host, dep.lease_pid) == lease
        if dep.status is not DeploymentState.RUNNING or not holds:
            if dep.status is DeploymentState.CANCELLED:
                cancel_unfinished(s, deployment_id, staged_is_done=staged_done)
            return DeploymentState(dep.status)
        states = [StepState(x) for x in s.exec(  # distinct states: one aggregate query
            select(DeploymentStep.state).where(DeploymentStep.deployment_id == deployment_id)
            .distinct()).all()]
        dep.status = final_state(states, staged_is_done=staged_done,
                                 halted=halted_at is not None)
        dep.halted_at_wave = halted_at
        dep.status_reason = reason if dep.status is not DeploymentState.COMPLETED else None
        dep.finished_at = utcnow() if dep.status.finished else None
        dep.lease_host = dep.lease_pid = None
        dep.heartbeat_at = None
        s.add(dep)
        return DeploymentState(dep.status)


def cancel_unfinished(s: Session, deployment_id: uuid.UUID, *, staged_is_done: bool,
                      reason: str = "deployment cancelled") -> int:
    """Every unfinished step of the deployment becomes ``cancelled``, each with its event,
    in ``s``'s transaction: two statements (UPDATE and INSERT ... SELECT) whatever the
    number of steps. ``staged_is_done``: a ``staged`` step counts as finished (a
    ``--no-activate`` deployment). Returns how many steps changed."""
    open_states = [x.value for x in StepState if not x.terminal
                   and not (staged_is_done and x is StepState.STAGED)]
    now = utcnow()
    ids = [i for i in s.exec(select(DeploymentStep.id).where(
        DeploymentStep.deployment_id == deployment_id,
        col(DeploymentStep.state).in_(open_states)).with_for_update()).all()]
    for part in chunked(ids, IN_CHUNK):
        s.execute(update(DeploymentStep).where(col(DeploymentStep.id).in_(part)).values(
            state=StepState.CANCELLED, updated_at=now, finished_at=now,
            started_at=func.coalesce(col(DeploymentStep.started_at), now)))
        s.execute(insert(StepEvent), [{"id": uuid.uuid4(), "step_id": i,
                                       "state": StepState.CANCELLED, "at": now,
                                       "detail": {"reason": reason}} for i in part])
    return len(ids)


def steps_of(reg: Registry, deployment_id: uuid.UUID) -> list[tuple[DeploymentStep, Device]]:
    with reg.session() as s:
        stmt = (select(DeploymentStep, Device)
                .join(Device, col(Device.id) == col(DeploymentStep.device_id))
                .where(DeploymentStep.deployment_id == deployment_id)
                .order_by(col(Device.name)))
        return [(a, b) for a, b in s.exec(stmt).all()]


def step_events(reg: Registry, step_id: uuid.UUID) -> list[StepEvent]:
    with reg.session() as s:
        return list(s.exec(select(StepEvent).where(StepEvent.step_id == step_id)
                           .order_by(col(StepEvent.at))).all())


def add_report(reg: Registry, device: Device, kind: str, body: dict[str, Any], *,
               deployment_id: uuid.UUID | None = None) -> Report:
    """Store one agent report and its findings."""
    with reg.session() as s:
        return _add_report(s, device, kind, body, deployment_id=deployment_id)


def report_rows(device_id: uuid.UUID, kind: str, body: dict[str, Any], *,
                deployment_id: uuid.UUID | None) -> tuple[Report, list[Finding]]:
    """One agent report's row and its findings' rows (not added to any session)."""
    pick = body.get("pick") or {}
    rep = Report(device_id=device_id, deployment_id=deployment_id, kind=kind,
                 model_name=body.get("name"), model_version=body.get("version"),
                 configured_backend=body.get("configured_backend"),
                 effective_backend=body.get("effective_backend") or pick.get("effective_backend"),
                 recommended_backend=body.get("recommended_backend") or pick.get("backend"),
                 median_ms=pick.get("median_ms"), body=body)
    found = [Finding(report_id=rep.id, device_id=device_id, rule_id=str(f.get("id")),
                     severity=str(f.get("severity", "info")),
                     message=str(f.get("message", "")), fix=str(f.get("fix", "")))
             for f in body.get("findings") or []]
    return rep, found


def _add_report(s: Session, device: Device, kind: str, body: dict[str, Any], *,
                deployment_id: uuid.UUID | None) -> Report:
    rep, found = report_rows(device.id, kind, body, deployment_id=deployment_id)
    s.add(rep)
    s.flush()
    s.add_all(found)
    return rep


def deployment_reports(reg: Registry, deployment_id: uuid.UUID) -> list[Report]:
    with reg.session() as s:
        return list(s.exec(select(Report).where(Report.deployment_id == deployment_id)
                           .order_by(col(Report.created_at))).all())


def reverting(reg: Registry, deployment_id: uuid.UUID) -> list[Deployment]:
    """The ``fleet rollback`` deployments recorded as reverting this one."""
    with reg.session() as s:
        return list(s.exec(select(Deployment).where(Deployment.reverts_id == deployment_id)
                           .order_by(col(Deployment.created_at))).all())


def last_deployment_of(reg: Registry, name: str, devices: list[Device]) -> Deployment | None:
    """The newest deploy of ``name`` that reached any of ``devices`` (a rollback's
    ``reverts_id``)."""
    ids = [d.id for d in devices]
    found: list[Deployment] = []
    with reg.reading() as s:
        for part in chunked(ids, IN_CHUNK):
            stmt = (select(Deployment).join(DeploymentStep, col(DeploymentStep.deployment_id)
                                            == col(Deployment.id))
                    .where(Deployment.name == name, Deployment.kind == DeploymentKind.DEPLOY,
                           col(DeploymentStep.device_id).in_(part),
                           col(DeploymentStep.state).in_([StepState.OK,
                                                          StepState.ACTIVATED]))
                    .order_by(col(Deployment.created_at).desc()).limit(1))
            hit = s.exec(stmt).first()
            if hit is not None:
                found.append(hit)
    return max(found, key=lambda d: d.created_at, default=None)


def reports_for(reg: Registry, device: Device, *, kind: str | None = None, limit: int = 20
                ) -> list[Report]:
    with reg.session() as s:
        stmt = select(Report).where(Report.device_id == device.id)
        if kind:
            stmt = stmt.where(Report.kind == kind)
        return list(s.exec(stmt.order_by(col(Report.created_at).desc()).limit(limit)).all())


def latest_reports(reg: Registry, devices: list[Device], kinds: tuple[str, ...]
                   ) -> dict[str, Report | None]:
    """Each device's newest report of one of ``kinds`` (None when it has none): one query
    per :data:`IN_CHUNK` devices (a window over ``reports(device_id, created_at)``)."""
    out: dict[str, Report | None] = {d.name: None for d in devices}
    names = {d.id: d.name for d in devices}
    with reg.reading() as s:
        for part in chunked(list(names), IN_CHUNK):
            ranked = (select(col(Report.id).label("id"), func.row_number().over(
                partition_by=col(Report.device_id),
                order_by=col(Report.created_at).desc()).label("n"))
                .where(col(Report.device_id).in_(part), col(Report.kind).in_(kinds))
                .subquery())
            stmt = select(Report).join(ranked, col(Report.id) == ranked.c.id).where(
                ranked.c.n == 1)
            for rep in s.exec(stmt).all():
                out[names[rep.device_id]] = rep
    return out


def add_snapshot(reg: Registry, device: Device, probe: dict[str, Any]) -> None:
    with reg.session() as s:
        s.add(CapabilitySnapshot(device_id=device.id, probe=probe))
        facts.note_probe(s, device.id, probe)  # selectors: hw.*


def set_lora_state(reg: Registry, device: Device, base_name: str, adapter_name: str | None,
                   adapter_version: int | None) -> None:
    with reg.session() as s:
        serialize(s, f"lora:{device.id}:{base_name}")  # the row may not exist yet
        row = s.get(LoraState, (device.id, base_name))
        if row is None:
            row = LoraState(device_id=device.id, base_name=base_name)
        elif row.adapter_name:
            row.previous = f"{row.adapter_name}@{row.adapter_version}"
        row.adapter_name = adapter_name
        row.adapter_version = adapter_version
        row.updated_at = utcnow()
        s.add(row)


def lora_states(reg: Registry, device: Device) -> list[LoraState]:
    with reg.session() as s:
        return list(s.exec(select(LoraState).where(LoraState.device_id == device.id)).all())


