"""Pick the runtime configuration to serve with: the fastest one that is correct.

Rules, in order:
1. Only candidates whose status is ``passed`` are eligible: outputs matched the reference
   and the backend that ran is the backend that was asked for. A candidate that fell back
   (asked OpenCL, ran CPU) is never picked as OpenCL; its CPU twin competes as CPU.
2. The lowest median latency wins.
3. Within 3 % of the fastest (measurement noise on a shared device), prefer fewer threads
   (cores left to the app), then ``memory: low`` (less RAM for the same speed), then
   ``precision: normal`` (no accuracy given away for nothing).

On an emulated CPU (the probe's ``cpu.emulated``, e.g. ``"qemu"``) the same rules pick,
but the pick says that its speed ranking is not representative of real hardware
(``emulated``, ``timings_representative: false`` and a reason); which candidates passed
the reference check still holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fleet.core.mnn.session import RuntimeConfig

__all__ = ["EMULATED_NOTE", "NOISE_MARGIN", "Measured", "Pick", "pick"]

NOISE_MARGIN = 0.03


class Measured(Protocol):
    """What the policy reads from a measured candidate (``healthbench.CandidateResult``)."""

    @property
    def config(self) -> RuntimeConfig: ...

    @property
    def status(self) -> str: ...

    @property
    def median_ms(self) -> float | None: ...


@dataclass
class Pick:
    config: RuntimeConfig
    median_ms: float
    reasons: list[str] = field(default_factory=list)
    speedup_vs_cpu: float | None = None
    emulated: str | None = None  #: the CPU was emulated ("qemu"): timings meaningless

    def to_dict(self) -> dict[str, Any]:
        return {**self.config.to_dict(), "label": self.config.label(),
                "median_ms": round(self.median_ms, 4), "speedup_vs_cpu": self.speedup_vs_cpu,
                "reasons": self.reasons, "emulated": self.emulated,
                "timings_representative": self.emulated is None}


def _tiebreak(c: Measured) -> tuple[int, int, int]:
    return (c.config.threads if c.config.backend == "cpu" else 0,
            0 if c.config.memory == "low" else 1,
            0 if c.config.precision == "normal" else 1)


EMULATED_NOTE = ("timings come from an emulated CPU ({}): the speed ranking is not "
                 "representative of real hardware; the correctness verdicts hold")


def pick(results: Sequence[Measured], *, emulated: str | None = None
         ) -> tuple[Pick | None, list[str]]:
    """The pick and the reasons; ``(None, reasons)`` when nothing passed. ``emulated``:
    the probe's ``cpu.emulated`` (the pick is then marked as timed on an emulator)."""
    eligible = [r for r in results if r.status == "passed" and r.median_ms is not None]
    if not eligible:
        statuses = sorted({r.status for r in results})
        reasons = ["no candidate passed: every measured configuration either produced wrong "
                   f"outputs, fell back to another backend or failed to run "
                   f"(statuses seen: {', '.join(statuses) or 'none'})"]
        crashed = [r for r in results if getattr(r, "crash", None)]
        if crashed:
            signals = sorted({str((getattr(r, "crash", None) or {}).get("signal")
                                  or "timeout/exit") for r in crashed})
            reasons.append(f"{len(crashed)} candidate(s) crashed MNN natively "
                           f"({', '.join(signals)}): " + ", ".join(
                               r.config.label() for r in crashed[:6]))
        on_cpu = [r for r in results if r.config.backend == "cpu"]
        if on_cpu and all(r.status == "failed" and not getattr(r, "crash", None)
                          for r in on_cpu):
            reasons.append("even the CPU candidates fail the reference check: the model file "
                           "itself disagrees with the reference (a broken variant?)")
        return None, reasons
    fastest = min(float(r.median_ms or 0.0) for r in eligible)
    close = [r for r in eligible if float(r.median_ms or 0.0) <= fastest * (1 + NOISE_MARGIN)]
    chosen = min(close, key=lambda r: (_tiebreak(r), float(r.median_ms or 0.0)))
    median = float(chosen.median_ms or 0.0)
    reasons = [f"{chosen.config.label()} passed the reference check with median "
               f"{median:.3f} ms, the fastest of {len(eligible)} passing candidate(s)"]
    if len(close) > 1:
        reasons.append(f"{len(close)} candidates were within {NOISE_MARGIN:.0%} of the fastest "
                       f"({fastest:.3f} ms); preferred fewer threads, then memory low, then "
                       "precision normal")
    cpu = [float(r.median_ms or 0.0) for r in eligible if r.config.backend == "cpu"]
    speedup = round(min(cpu) / median, 3) if cpu and median > 0 else None
    if chosen.config.backend != "cpu" and speedup is not None:
        reasons.append(f"{speedup:.2f}x the best passing CPU candidate")
    failed = [r for r in results if r.status != "passed"]
    if failed:
        reasons.append(f"{len(failed)} candidate(s) not eligible: " + ", ".join(
            f"{r.config.label()} ({r.status})" for r in failed[:6]))
    if emulated:
        reasons.append(EMULATED_NOTE.format(emulated))
    return Pick(chosen.config, median, reasons, speedup, emulated), reasons
