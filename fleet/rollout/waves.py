"""Roll out in waves with a health gate after each, and roll back automatically.

Each wave is an ordinary deployment (its own registry row and step events). After a wave,
the gate counts its failed devices (a device fails when its transfer, verification or
health check fails, see :mod:`fleet.rollout.deploy`); more than ``max_failed`` halts the
rollout, and every device this rollout activated is switched back to its previous slot.
Later waves are not touched.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from fleet.connect import open_device
from fleet.home import FleetHome
from fleet.registry import Device, Registry
from fleet.rollout.deploy import DeployJob, DeviceResult, run_deployment
from fleet.rollout.execute import FanOut, TaskContext
from fleet.rollout.plan import split_waves

__all__ = ["WaveOutcome", "run_waves"]


@dataclass
class WaveOutcome:
    results: list[DeviceResult] = field(default_factory=list)
    deployments: list[uuid.UUID] = field(default_factory=list)
    waves: list[list[str]] = field(default_factory=list)
    halted_at: int | None = None  #: 1-based wave whose gate failed
    rolled_back: dict[str, str] = field(default_factory=dict)  #: device -> "ok" or error


def _rollback(home: FleetHome, devices: list[Device], name: str) -> dict[str, str]:
    def task(dev: Device, ctx: TaskContext) -> dict[str, Any]:
        transport, agent = open_device(home, dev)
        ctx.add_closer(transport.close)
        with transport:
            return agent.call("rollback", {"name": name}, timeout=ctx.deadline.remaining(30))

    outs = FanOut(deadline_s=120, retries=1).run({d.name: d for d in devices}, task)
    return {n: "ok" if o.ok else f"{o.error.code}: {o.error.message}" if o.error else "failed"
            for n, o in outs.items()}


def run_waves(home: FleetHome, reg: Registry, job: DeployJob, devices: list[Device], *,
              spec: str, max_failed: int, target: str, say: Any = None,
              **deploy_kw: Any) -> WaveOutcome:
    by_name = {d.name: d for d in devices}
    out = WaveOutcome(waves=split_waves([d.name for d in devices], spec))
    for i, wave in enumerate(out.waves, 1):
        if say:
            say(f"wave {i}/{len(out.waves)}: {', '.join(wave)}")
        dep_id, res = run_deployment(home, reg, job, [by_name[n] for n in wave],
                                     target=f"{target} (wave {i}/{len(out.waves)})",
                                     **deploy_kw)
        out.deployments.append(dep_id)
        for r in res:
            r.reason = r.reason or f"wave {i}"
        out.results.extend(res)
        failed = sum(1 for r in res if r.status == "failed")
        if failed > max_failed:
            out.halted_at = i
            activated = [by_name[r.device] for r in out.results if r.status == "ok"]
            if say:
                say(f"wave {i}: {failed} device(s) failed (gate allows {max_failed}); "
                    f"halting and rolling back {len(activated)} device(s)")
            out.rolled_back = _rollback(home, activated, job.name) if activated else {}
            for r in out.results:
                if r.device in out.rolled_back:
                    r.status = ("rolled back" if out.rolled_back[r.device] == "ok"
                                else "rollback failed")
                    r.reason = f"wave {i} gate failed; {out.rolled_back[r.device]}"
            for later in out.waves[i:]:
                out.results.extend(DeviceResult(n, "not started",
                                                reason=f"halted at wave {i}") for n in later)
            break
    return out
