"""One self-contained HTML page: plotly.js inlined once in the head, then every figure as
a ``div`` with its data, each beside a plain HTML table of the same numbers (readable
without JavaScript, and searchable). No request leaves the page: it opens offline.

Sections: fleet composition; latency per device and version (median, p90, change from
the previous version); the candidate grid of one device; findings by rule with their
devices; the deployment timeline with outcomes.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from fleet.core.fsutil import atomic_write
from fleet.report import figures
from fleet.report.data import ReportData

__all__ = ["render_html", "write_html"]

_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', 'DejaVu Sans', sans-serif;
       margin: 24px 32px; color: #222; max-width: 1400px; }
h1 { margin-bottom: 4px; } .sub { color: #666; margin-top: 0; }
section { margin: 28px 0 36px; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px; }
table { border-collapse: collapse; font-size: 13px; margin-top: 8px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.bad { color: #c0392b; font-weight: 600; } .good { color: #1e8449; }
.empty { color: #888; font-style: italic; }
.kpis { display: flex; gap: 28px; margin: 12px 0; }
.kpi b { display: block; font-size: 26px; }
"""


def _e(v: object) -> str:
    return html.escape("-" if v is None else str(v))


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]],
           numeric: Sequence[int] = ()) -> str:
    """Cells are HTML already (escape before)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(
        f"<td class=num>{c}</td>" if i in numeric else f"<td>{c}</td>"
        for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fig(fig: go.Figure | None, div_id: str, empty: str) -> str:
    if fig is None:
        return f"<p class=empty>{_e(empty)}</p>"
    return str(fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                           config={"displaylogo": False, "responsive": True}))


def _composition(d: ReportData) -> str:
    rows = [(_e(x.name), _e(x.platform), _e(x.arch), _e(x.backend), _e(", ".join(x.groups)),
             _e(x.status), _e(f"{x.last_seen:%Y-%m-%d %H:%M}" if x.last_seen else None))
            for x in d.devices]
    return (_fig(figures.composition(d.devices), "fig-composition", "no devices")
            + _table(["device", "platform", "arch", "backend in use", "groups", "status",
                      "last seen (UTC)"], rows))


def _latency(d: ReportData) -> str:
    rows = []
    for p in d.latency:
        change = "-" if p.change is None else f"{p.change:+.1%}"
        cls = "bad" if p.regression else ("good" if p.change is not None and p.change < 0
                                           else "")
        rows.append((_e(p.device), _e(p.entity), _ms(p.median_ms), _ms(p.p90_ms),
                     f"<span class={cls}>{_e(change)}</span>" if cls else _e(change),
                     _e(p.config), _e(f"{p.reported_at:%Y-%m-%d %H:%M}")))
    return (_fig(figures.latency_by_version(d.latency), "fig-latency",
                 "no activate or bench report stored")
            + _table(["device", "model", "median ms", "p90 ms", "vs previous version",
                      "picked configuration", "reported (UTC)"], rows, numeric=(2, 3, 4)))


def _candidates(d: ReportData) -> str:
    t = d.candidates
    if t is None:
        return "<p class=empty>no activate or bench report stored</p>"
    rows = [(_e(r.backend), _e(r.precision), _e(r.memory), _e(r.threads), _ms(r.median_ms),
             _ms(r.p90_ms), _e(None if r.cosine is None else f"{r.cosine:.6f}"),
             _e(None if r.max_abs_err is None else f"{r.max_abs_err:.2e}"),
             f"<span class={'good' if r.passed else 'bad'}>{_e(r.verdict)}</span>",
             "★ picked" if r.picked else "") for r in t.rows]
    why = "".join(f"<li>{_e(x)}</li>" for x in t.pick_reasons)
    return (f"<p>Device <b>{_e(t.device)}</b>, {_e(t.entity)}: picked "
            f"<b>{_e(t.picked or 'nothing (no candidate passed)')}</b></p><ul>{why}</ul>"
            + _fig(figures.candidate_heatmap(t), "fig-candidates", "no candidates")
            + _table(["backend", "precision", "memory", "threads", "median ms", "p90 ms",
                      "cosine", "max abs err", "verdict", "picked"], rows,
                     numeric=(3, 4, 5, 6, 7)))


def _findings(d: ReportData) -> str:
    rows = [(_e(g.code), _e(g.severity), _e(", ".join(g.devices)), _e(", ".join(g.models)),
             _e(g.message), _e(g.fix)) for g in d.findings]
    return (_fig(figures.findings_by_rule(d.findings), "fig-findings",
                 "no findings in the stored reports")
            + (_table(["rule", "severity", "devices", "models", "message", "fix"], rows)
               if rows else ""))


def _timeline(d: ReportData) -> str:
    rows = [(_e(str(x.id)[:8]), _e(x.kind), _e(x.entity), _e(x.state),
             _e(f"{x.created_at:%Y-%m-%d %H:%M:%S}"),
             _e(f"{x.finished_at:%Y-%m-%d %H:%M:%S}" if x.finished_at else None),
             _e(", ".join(f"{k} {v}" for k, v in sorted(x.steps.items()))))
            for x in reversed(d.deployments)]
    return (_fig(figures.timeline(d.deployments), "fig-timeline", "no deployments")
            + _table(["id", "kind", "model", "outcome", "started (UTC)", "ended (UTC)",
                      "device steps"], rows))


def render_html(d: ReportData) -> str:
    """The whole page as a string (about 5 MB: plotly.js is most of it)."""
    models = sorted({p.model for p in d.latency})
    failing = sum(1 for x in d.deployments if x.state not in ("completed", "running"))
    kpis = [("devices", len(d.devices)), ("models", len(models)),
            ("finding rules hit", len(d.findings)), ("deployments", len(d.deployments)),
            ("deployments not completed", failing)]
    sections = [("composition", "Fleet composition", _composition(d)),
                ("latency", "Latency per device and version", _latency(d)),
                ("candidates", "Candidate grid", _candidates(d)),
                ("findings", "Findings by rule", _findings(d)),
                ("deployments", "Deployment timeline", _timeline(d))]
    title = "mnn-fleet report" + (f": {d.targets}" if d.targets else "")
    return "\n".join([
        "<!DOCTYPE html>", "<html lang=en><head><meta charset=utf-8>",
        f"<title>{_e(title)}</title>",
        "<meta name=viewport content='width=device-width, initial-scale=1'>",
        f"<style>{_CSS}</style>",
        f"<script type=text/javascript>{get_plotlyjs()}</script>",
        "</head><body>", f"<h1>{_e(title)}</h1>",
        f"<p class=sub>generated {_e(f'{d.generated_at:%Y-%m-%d %H:%M:%S}')} UTC from the "
        "registry (what the devices last reported; FA-regression threshold "
        f"{d.regression_threshold:.0%})</p>",
        "<div class=kpis>" + "".join(f"<div class=kpi><b>{v}</b>{_e(k)}</div>"
                                     for k, v in kpis) + "</div>",
        *(f"<section id={sid}><h2>{_e(h)}</h2>{body}</section>"
          for sid, h, body in sections),
        "</body></html>", ""])


def write_html(path: Path, d: ReportData) -> int:
    """Write the page to ``path`` atomically (mode 0644); returns its size in bytes."""
    data = render_html(d).encode()
    atomic_write(path, data, mode=0o644)
    return len(data)
