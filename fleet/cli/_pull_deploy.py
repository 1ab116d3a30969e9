"""``fleet deploy`` to pull devices: package once (with the server's escrow key as a
recipient, so devices that enroll later get it too), write the desired state, return;
``--wait`` follows the steps until every device has ended or the deadline passed."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fleet.cli._output import emit, err, table
from fleet.cli._targets import Targets
from fleet.core import errors
from fleet.home import FleetHome
from fleet.registry import Device, Registry
from fleet.registry import history as hist
from fleet.rollout import pull
from fleet.rollout.deploy import DeployJob

__all__ = ["deploy_pull", "lora_push_pull", "pull_rows", "rollback_pull"]

POLL_S = 1.0


def pull_rows(reg: Registry, dep_id: uuid.UUID) -> list[dict[str, Any]]:
    """Per device: the step and how it reads in pull mode (``waiting for check-in`` ...)."""
    return [{"device": d.name, "wave": st.wave, "state": st.state.value,
             "status": pull.step_view(st.state), "error_code": st.error_code,
             "error": st.error_message} for st, d in hist.steps_of(reg, dep_id)]


def deploy_pull(home: FleetHome, reg: Registry, model: Path, devs: list[Device],
                tg: Targets, package: Callable[[list[Device]], DeployJob], *,
                waves: str | None, max_failed: int, wait: bool, deadline: float,
                as_json: bool, window: str | None = None) -> None:
    """Write the desired state of a pull deployment (see the module docstring)."""
    from fleet.server.escrow import escrow_device

    push = [d.name for d in devs if not pull.is_pull(d)]
    if push:
        raise errors.UsageError(f"pull and push devices in one deploy ({', '.join(push)} "
                                "are push devices): deploy them separately", devices=push)
    revoked = [d.name for d in devs if d.revoked_at is not None]
    targets = [d for d in devs if d.revoked_at is None]
    if revoked:
        err.print(f"left out (revoked): {', '.join(revoked)}", highlight=False)
    ready = [d for d in targets if d.public_key and d.fingerprint]
    job = package([*ready, escrow_device(home)])
    groups = list(tg.groups) if not tg.selectors and not tg.devices else []
    dep_id = pull.start(reg, job, targets, target=tg.describe(), groups=groups, waves=waves,
                        max_failed=max_failed, window=window)
    err.print(f"{job.name}@{job.version}: desired state written for "
              f"{len(targets)} pull device(s) (deployment {dep_id}); they take it at "
              "their next check-in", highlight=False)
    if wait:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            dep = hist.get_deployment(reg, dep_id)
            steps = hist.steps_of(reg, dep_id)
            staged_done = not job.activate
            if dep.status.finished or all(
                    st.state.terminal or (staged_done and st.state.value == "staged")
                    for st, _ in steps):
                break
            time.sleep(POLL_S)
    dep = hist.get_deployment(reg, dep_id)
    rows = pull_rows(reg, dep_id)
    failed = [r for r in rows if r["state"] in ("failed", "rollback_failed")]
    doc = {"deployment": dep_id, "mode": pull.MODE, "state": dep.status.value,
           "model": f"{job.name}@{job.version}", "name": job.name, "version": job.version,
           "window": window,
           "results": rows, "failed": len(failed), "revoked": revoked,
           "halted_at_wave": dep.halted_at_wave, "targets": tg.to_dict()}
    emit(doc, as_json=as_json, render=lambda c: c.print(table(
        f"deploy {job.name}@{job.version} in pull mode (deployment {dep_id}: "
        f"{dep.status.value})", ["device", "wave", "status", "error"],
        [(r["device"], r["wave"] or "-", r["status"],
          f"{r['error_code']}: {r['error']}" if r["error_code"] else "") for r in rows])))
    if wait and failed:
        raise errors.PartialFailureError(
            f"deploy: {len(failed)} pull device(s) failed", failed={
                r["device"]: r["error_code"] for r in failed})


def rollback_pull(home: FleetHome, reg: Registry, name: str, devs: list[Device],
                  tg: Targets, *, to: int | None, as_json: bool) -> None:
    """``fleet rollback NAME`` to pull devices: the rollback's desired state is written
    (:func:`fleet.rollout.pull_revert.rollback_pull`) and the command returns; devices
    switch at their next check-in (``fleet deployment show ID``)."""
    from fleet.rollout.pull_revert import rollback_pull as write

    dep_id, left_out = write(home, reg, name, devs, to=to, target=tg.describe())
    dep = hist.get_deployment(reg, dep_id)
    rows = pull_rows(reg, dep_id)
    err.print(f"rollback {name}: desired state written for {len(devs) - len(left_out)} "
              f"pull device(s) (deployment {dep_id}); they switch at their next check-in",
              highlight=False)
    doc = {"deployment": dep_id, "mode": pull.MODE, "kind": "rollback", "name": name,
           "to": to, "state": dep.status.value, "results": rows, "left_out": left_out,
           "targets": tg.to_dict()}
    emit(doc, as_json=as_json, render=lambda c: c.print(table(
        f"rollback {name} in pull mode (deployment {dep_id}: {dep.status.value})",
        ["device", "status", "error"],
        [(r["device"], r["status"], r["error"] or "") for r in rows])))
    if left_out:
        raise errors.PartialFailureError(
            f"rollback: {len(left_out)} pull device(s) left out", failed=left_out)


def lora_push_pull(home: FleetHome, reg: Registry, pack: Path, devs: list[Device],
                   tg: Targets, *, swap: bool, as_json: bool) -> None:
    """``fleet lora push PACK`` to pull devices: the pack's desired-state entry (kind
    ``lora``; ``activate``: ``--swap``) is written and the command returns; devices take
    it at their next check-in (:mod:`fleet.rollout.pull_lora`). Every target is checked
    first (enrolled, and the pack opens for it: built for its key or with the server's
    escrow envelope); one that fails leaves nothing written (NotRecipientError, exit 15)."""
    from fleet.rollout.pull_lora import pack_job
    from fleet.server.escrow import envelope_for_device

    push = [d.name for d in devs if not pull.is_pull(d)]
    if push:
        raise errors.UsageError(f"pull and push devices in one lora push ({', '.join(push)} "
                                "are push devices): push them separately", devices=push)
    revoked = [d.name for d in devs if d.revoked_at is not None]
    targets = [d for d in devs if d.revoked_at is None]
    if revoked:
        err.print(f"left out (revoked): {', '.join(revoked)}", highlight=False)
    job = pack_job(reg, pack, swap=swap)
    refused: dict[str, str] = {}
    for d in targets:
        try:
            envelope_for_device(home, job.package, d)
        except errors.FleetError as exc:
            refused[d.name] = exc.message
    if refused:
        raise errors.NotRecipientError(
            f"lora push: the pack does not open for {', '.join(sorted(refused))} (package "
            "it again for them: `fleet lora package … -g GROUP`)", refused=refused)
    dep_id = pull.start(reg, job, targets, target=tg.describe())
    err.print(f"{job.name}@{job.version}: desired state written for {len(targets)} pull "
              f"device(s) (deployment {dep_id}); they take it at their next check-in",
              highlight=False)
    dep = hist.get_deployment(reg, dep_id)
    rows = pull_rows(reg, dep_id)
    doc = {"deployment": dep_id, "mode": pull.MODE, "kind": "lora", "swap": swap,
           "state": dep.status.value, "name": job.name, "version": job.version,
           "results": rows, "revoked": revoked, "targets": tg.to_dict()}
    emit(doc, as_json=as_json, render=lambda c: c.print(table(
        f"lora push {job.name}@{job.version} in pull mode (deployment {dep_id})",
        ["device", "status"], [(r["device"], r["status"]) for r in rows])))
