"""``fleet report``: the fleet as one self-contained HTML page with plots, or CSV tables.

Plotly is imported here (through :mod:`fleet.report`), so only ``fleet report`` pays for
it; the lazy command table keeps ``fleet --help`` and every other command without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from fleet.audit.regression import DEFAULT_THRESHOLD
from fleet.cli._ctx import state
from fleet.cli._output import emit, human_bytes
from fleet.cli._targets import DeviceOpt, GroupOpt, SelectorOpt, Targets
from fleet.cli.app import app
from fleet.core import errors
from fleet.registry import Registry


@app.command("report")
def report(
    html: Annotated[Path | None, typer.Option(
        "--html", metavar="FILE",
        help="Write the report as one HTML file that opens offline (plotly.js inlined).")
    ] = None,
    csv: Annotated[Path | None, typer.Option(
        "--csv", metavar="DIR", help="Write one CSV file per table into DIR.")] = None,
    group: GroupOpt = [],  # noqa: B006 (typer reads the default; targets: fleet.cli._targets)
    device: DeviceOpt = [],  # noqa: B006
    selector: SelectorOpt = [],  # noqa: B006
    grid_device: Annotated[str | None, typer.Option(
        "--grid-device", metavar="NAME",
        help="Whose candidate grid to draw (default: the device reported most recently).")
    ] = None,
    regression_threshold: Annotated[float, typer.Option(
        "--regression-threshold", metavar="PERCENT",
        help="FA-regression: a version more than this many percent slower than the "
             "previous one on a device.")] = DEFAULT_THRESHOLD * 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Report on the fleet (every device, or the targets) from what the registry last
    heard: composition, latency per device and version, one device's candidate grid,
    findings by rule, deployment timeline. No device is contacted.

    Examples:

    \b
      fleet report --html fleet.html
      fleet report --html phones.html -g phones --grid-device pixel7 --csv tables/
    """
    if html is None and csv is None:
        raise errors.UsageError("say what to write: --html FILE and/or --csv DIR")
    if regression_threshold < 0:
        raise errors.UsageError(
            f"--regression-threshold must be >= 0 (percent), not {regression_threshold}")
    if html is not None and html.is_dir():
        raise errors.UsageError(f"--html {html}: is a directory, give a file name")
    if html is not None and not html.absolute().parent.is_dir():  # a typo is not a new tree
        raise errors.UsageError(f"--html {html}: no folder {html.absolute().parent}; "
                                "create it first")
    tg = Targets.parse(group, device, selector)  # none named: every device
    from fleet.report.csvfiles import write_csv
    from fleet.report.data import gather
    from fleet.report.html import write_html

    home = state().home
    reg = Registry.open(home)
    devices = tg.resolve(reg, required=tg.named)
    data = gather(home, reg, devices, targets=tg.describe(), grid_device=grid_device,
                  threshold=regression_threshold / 100)
    doc: dict[str, Any] = data.to_dict()
    if html is not None:
        doc["html"] = {"path": str(html), "bytes": write_html(html, data)}
    if csv is not None:
        doc["csv"] = [str(p) for p in write_csv(csv, data)]
    emit(doc, as_json=as_json, render=lambda c: _render(c, doc))


def _render(c: Console, doc: dict[str, Any]) -> None:
    what = (f"{len(doc['devices'])} device(s), {len(doc['models'])} model version(s), "
            f"{len(doc['findings'])} finding rule(s), {doc['deployments']} deployment(s)")
    if "html" in doc:
        c.print(f"wrote {doc['html']['path']} ({human_bytes(doc['html']['bytes'])}): {what}",
                highlight=False, markup=False)
    if "csv" in doc:
        c.print(f"wrote {len(doc['csv'])} CSV file(s): {', '.join(doc['csv'])}",
                highlight=False, markup=False)
