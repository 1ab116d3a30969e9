"""FA-regression in a deploy's (or a resume's) result: the devices where the version just
deployed runs slower than the previous one did (:mod:`fleet.audit.regression`)."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from fleet.audit.regression import DEFAULT_THRESHOLD, regressions_after_deploy
from fleet.cli._output import table
from fleet.registry import Registry

__all__ = ["deploy_regressions", "render_regressions"]


def deploy_regressions(reg: Registry, devices: list[str],
                       model: tuple[str, int | None] | None) -> list[dict[str, Any]]:
    """The regressions of ``model`` = (name, version) on ``devices`` as JSON objects."""
    if model is None or model[1] is None:
        return []
    return [r.to_dict() for r in regressions_after_deploy(reg, devices, model[0], model[1])]


def render_regressions(c: Console, regs: list[dict[str, Any]]) -> None:
    if not regs:
        return
    c.print(table(
        f"FA-regression: slower than the previous version on the same device "
        f"(> {DEFAULT_THRESHOLD:.0%}; `fleet audit` shows it too)",
        ["device", "model", "median ms", "previous", "previous ms", "change", "conditions"],
        [(r["device"], r["model"], f"{r['median_ms']:.3f}", r["previous"],
          f"{r['previous_median_ms']:.3f}", f"{r['change']:+.0%}", r["conditions"])
         for r in regs]))
