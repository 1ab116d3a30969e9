"""LoRA packs through the desired state (pull mode): ``fleet lora push PACK -g field``.

The pack (a package of kind ``lora`` that ``fleet lora package`` built and registered)
becomes a desired-state entry like a model's (:func:`fleet.rollout.pull.entry_for`,
:func:`fleet.rollout.pull.start`): kind ``lora``, signed and addressed to each device by
``fleet server`` at check-in, under the registry's counter; the entry's ``activate``
means *swap it in* (``--swap``). The agent downloads it with HTTP Range and verifies it
as it arrives (as a model), stages it with the push-mode ``lora add`` verb and, for a
swap, asks its serve daemon with ``lora swap`` (waiting, step ``staged``, while no daemon
runs). The device's signed report of the swap moves the step to ``ok`` and records what
it serves (``fleet lora list``), as a push-mode swap does (:func:`record_swap`).

A LoRA pull deployment has no target groups (no late joiners: a pack is encrypted for the
devices named when it was packaged) and no waves.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from sqlmodel import select

from fleet.core import errors
from fleet.core.fsutil import sha256_file
from fleet.registry import Artifact, Device, Registry
from fleet.registry import history as hist
from fleet.registry.models import DeploymentStep, StepState
from fleet.rollout.deploy import DeployJob

__all__ = ["is_lora", "pack_job", "record_swap"]


def pack_job(reg: Registry, pack: Path, *, swap: bool) -> DeployJob:
    """The deploy job of ``pack`` (``swap``: the devices serve it once staged), from its
    registry row: the server serves registered packages only. NotFoundError (exit 5) for
    a pack this controller did not build; UsageError (exit 2) for a model package."""
    sha = sha256_file(pack)
    with reg.reading() as s:
        art = s.exec(select(Artifact).where(Artifact.package_sha256 == sha)).first()
    if art is None:
        raise errors.NotFoundError(f"{pack} is not a pack in this controller's registry "
                                   "(`fleet lora package` it here): the fleet server "
                                   "serves registered packages only", path=str(pack))
    if art.kind != "lora":
        raise errors.UsageError(f"{pack} is a {art.kind} package, not a LoRA pack "
                                "(`fleet deploy` it)", path=str(pack))
    return DeployJob(name=art.name, version=art.version, kind="lora", package=Path(art.path),
                     package_sha256=sha, digest=art.digest, size=art.size,
                     artifact_id=art.id, activate=swap)


def is_lora(options: dict[str, Any] | None) -> bool:
    """Whether a deployment's options describe a LoRA pack's rollout."""
    return ((options or {}).get("job") or {}).get("kind") == "lora"


def record_swap(reg: Registry, st: DeploymentStep, device: Device, deployment_id: uuid.UUID,
                report: dict[str, Any]) -> None:
    """A verified swap report (the daemon's answer to ``lora swap``): the registry's
    record of what the device serves and its ``lora`` report (as after a push-mode
    swap: :func:`fleet.rollout.lora_push.lora_task`), then the step ``activated``,
    ``ok``."""
    from fleet.rollout.lora_push import _record

    _record(reg, device, report)
    hist.set_step(reg, st.id, StepState.ACTIVATED, reported=True,
                  adapter=report.get("adapter"))
    hist.set_step(reg, st.id, StepState.OK, done=True, deployment=str(deployment_id))
