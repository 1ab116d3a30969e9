"""The report's figures, drawn with Plotly (graph objects only: no pandas needed).

Each function takes :mod:`fleet.report.data` dataclasses and returns one
:class:`plotly.graph_objects.Figure`, or None when there is nothing to draw. Text that
comes from devices (names, messages) is HTML-escaped, since Plotly renders a subset of
HTML in labels and hover text.
"""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Sequence
from datetime import timedelta

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from fleet.audit.candidates import CandidateTable
from fleet.audit.grouping import GroupedFinding
from fleet.report.data import DeploymentInfo, DeviceInfo, LatencyPoint

__all__ = ["candidate_heatmap", "composition", "findings_by_rule", "latency_by_version",
           "timeline"]

TEMPLATE = "plotly_white"
SEVERITY_COLORS = {"error": "#d62728", "warning": "#ff7f0e", "info": "#1f77b4"}
STATE_COLORS = {"completed": "#2ca02c", "failed": "#d62728", "halted": "#9467bd",
                "interrupted": "#ff7f0e", "cancelled": "#7f7f7f", "running": "#17becf"}
#: the shortest bar on the timeline (else 1 % of the time shown): a deployment of a
#: second still shows
_MIN_BAR = timedelta(seconds=1)


def _e(text: object) -> str:
    return html.escape(str(text), quote=False)


def composition(devices: Sequence[DeviceInfo]) -> go.Figure | None:
    """Device counts by platform, CPU architecture and backend in use (three bars)."""
    if not devices:
        return None
    facets = [("platform", [d.platform for d in devices]),
              ("architecture", [d.arch for d in devices]),
              ("backend in use", [d.backend for d in devices])]
    fig = make_subplots(rows=1, cols=3, subplot_titles=[f"by {name}" for name, _ in facets])
    for i, (name, values) in enumerate(facets, start=1):
        counts = Counter(values)
        keys = sorted(counts)
        fig.add_trace(go.Bar(
            x=[_e(k) for k in keys], y=[counts[k] for k in keys], name=name,
            text=[counts[k] for k in keys], textposition="auto", showlegend=False,
            hovertemplate="%{x}: %{y} device(s)<extra>" + name + "</extra>"), row=1, col=i)
    fig.update_yaxes(title_text="devices", row=1, col=1, rangemode="tozero")
    fig.update_layout(template=TEMPLATE, height=320, margin={"t": 50, "b": 40})
    return fig


def _change_text(p: LatencyPoint) -> str:
    if p.change is None:
        return ""
    return f"{p.change:+.0%}" + (" ⚠" if p.regression else "")


def latency_by_version(points: Sequence[LatencyPoint]) -> go.Figure | None:
    """Per model (one panel each): each device's median per version as bars, the bar's
    whisker reaching the p90, labelled with the change from the previous version."""
    points = [p for p in points if p.median_ms is not None]
    if not points:
        return None
    models = sorted({p.model for p in points})
    fig = make_subplots(rows=len(models), cols=1, subplot_titles=[_e(m) for m in models],
                        vertical_spacing=min(0.12, 0.3 / max(len(models), 1)))
    for row, model in enumerate(models, start=1):
        mine = [p for p in points if p.model == model]
        for version in sorted({p.version for p in mine}):
            vp = sorted((p for p in mine if p.version == version), key=lambda p: p.device)
            med = [float(p.median_ms or 0.0) for p in vp]
            up = [max(float(p.p90_ms) - m, 0.0) if p.p90_ms is not None else 0.0
                  for p, m in zip(vp, med, strict=True)]
            fig.add_trace(go.Bar(
                x=[_e(p.device) for p in vp], y=med, name=_e(f"{model}@{version}"),
                legendgroup=_e(model), text=[_change_text(p) for p in vp],
                textposition="outside",
                error_y={"type": "data", "symmetric": False, "array": up,
                         "arrayminus": [0.0] * len(vp), "thickness": 1.2},
                customdata=[[p.p90_ms, _e(p.config or "-")] for p in vp],
                hovertemplate="%{x} " + _e(f"{model}@{version}") +
                              "<br>median %{y:.3f} ms, p90 %{customdata[0]:.3f} ms"
                              "<br>%{customdata[1]}<extra></extra>"), row=row, col=1)
        # a noisy p90 can be 100x the median: a log axis keeps the medians readable
        spread = max((p.p90_ms or p.median_ms or 0.0) for p in mine) / max(
            min(float(p.median_ms or 0.0) for p in mine), 1e-9)
        fig.update_yaxes(title_text="ms (bar: median, whisker: p90)", row=row, col=1,
                         **({"type": "log"} if spread > 20 else {"rangemode": "tozero"}))
    fig.update_layout(template=TEMPLATE, barmode="group",
                      height=max(340, 300 * len(models)), margin={"t": 50},
                      legend_title_text="version")
    return fig


def candidate_heatmap(t: CandidateTable | None) -> go.Figure | None:
    """Median latency per candidate: rows backend / precision / memory, columns threads.
    Failing candidates are grey cells marked ✗ with the verdict on hover; the pick ★.
    Colour: faster is lighter."""
    if t is None or not t.rows:
        return None
    ys = sorted({f"{r.backend} / p-{r.precision} / m-{r.memory}" for r in t.rows})
    xs = sorted({r.threads for r in t.rows}, key=lambda v: (v is None, v or 0))
    xlab = [f"{x} thread(s)" if x is not None else "threads ?" for x in xs]
    z: list[list[float | None]] = [[None] * len(xs) for _ in ys]
    text = [[""] * len(xs) for _ in ys]
    hover = [["not measured"] * len(xs) for _ in ys]
    fails_x, fails_y, fails_h = [], [], []
    for r in t.rows:
        yi = ys.index(f"{r.backend} / p-{r.precision} / m-{r.memory}")
        xi = xs.index(r.threads)
        detail = (f"{_e(r.label)}<br>{_e(r.verdict)}<br>median "
                  f"{'-' if r.median_ms is None else f'{r.median_ms:.3f}'} ms, p90 "
                  f"{'-' if r.p90_ms is None else f'{r.p90_ms:.3f}'} ms<br>cosine "
                  f"{'-' if r.cosine is None else f'{r.cosine:.6f}'}")
        hover[yi][xi] = detail
        if r.passed:
            z[yi][xi] = r.median_ms
            text[yi][xi] = "-" if r.median_ms is None else f"{r.median_ms:.3f} ms"
        else:
            text[yi][xi] = f"✗ {r.status}"
            fails_x.append(xlab[xi])
            fails_y.append(ys[yi])
            fails_h.append(detail)
        if r.picked:
            text[yi][xi] = f"★ picked<br>{text[yi][xi]}"
    fig = go.Figure(go.Heatmap(
        x=xlab, y=ys, z=z, text=text, texttemplate="%{text}", hovertext=hover,
        hoverinfo="text", colorscale="Viridis", reversescale=True, hoverongaps=True,
        colorbar={"title": {"text": "median ms"}}, xgap=3, ygap=3))
    if fails_x:
        fig.add_trace(go.Scatter(
            x=fails_x, y=fails_y, mode="markers", name="failed / not eligible",
            marker={"symbol": "x-thin-open", "size": 34, "color": "#d62728",
                    "line": {"width": 3}}, hovertext=fails_h, hoverinfo="text"))
    fig.update_layout(
        template=TEMPLATE, height=max(260, 90 * len(ys) + 120),
        title_text=_e(f"{t.device}: {t.entity} ({t.kind}, "
                      f"{t.reported_at:%Y-%m-%d %H:%M} UTC)"),
        plot_bgcolor="#e6e6e6", legend={"orientation": "h", "y": -0.2},
        yaxis={"automargin": True}, font={"size": 13})
    return fig


def findings_by_rule(groups: Sequence[GroupedFinding]) -> go.Figure | None:
    """Devices per finding rule, coloured by severity; the devices on hover."""
    if not groups:
        return None
    fig = go.Figure()
    for sev in dict.fromkeys(g.severity for g in groups):
        mine = [g for g in groups if g.severity == sev]
        fig.add_trace(go.Bar(
            y=[_e(g.code) for g in mine], x=[len(g.devices) for g in mine], orientation="h",
            name=sev, marker_color=SEVERITY_COLORS.get(sev, "#7f7f7f"),
            text=[_e(", ".join(g.devices[:8]) + (" …" if len(g.devices) > 8 else ""))
                  for g in mine], textposition="auto",
            hovertext=[_e(f"{g.code}: {g.message}") for g in mine], hoverinfo="text+x"))
    fig.update_layout(template=TEMPLATE, height=max(220, 60 * len(groups) + 120),
                      xaxis_title="devices", yaxis={"autorange": "reversed"},
                      legend_title_text="severity", margin={"t": 30})
    return fig


def timeline(deps: Sequence[DeploymentInfo]) -> go.Figure | None:
    """One bar per deployment from its start to its end (still running: to now), coloured
    by its outcome; the per-device step counts on hover."""
    if not deps:
        return None
    fig = go.Figure()
    labels = [_e(f"{d.kind} {d.entity} · {str(d.id)[:8]}") for d in deps]
    first = min(d.created_at for d in deps)
    last = max(d.finished_at or d.created_at for d in deps)
    min_bar = max((last - first) / 100, _MIN_BAR)
    for state in dict.fromkeys(d.state for d in deps):
        idx = [i for i, d in enumerate(deps) if d.state == state]
        starts = [deps[i].created_at for i in idx]
        spans = [max((deps[i].finished_at or deps[i].created_at) - deps[i].created_at,
                     min_bar) for i in idx]
        fig.add_trace(go.Bar(
            base=[s.isoformat() for s in starts],
            x=[sp.total_seconds() * 1000 for sp in spans], y=[labels[i] for i in idx],
            orientation="h", name=state, marker_color=STATE_COLORS.get(state, "#bcbd22"),
            hovertext=[_e(f"{deps[i].kind} {deps[i].entity}: {state}; steps " + ", ".join(
                f"{k} {v}" for k, v in sorted(deps[i].steps.items()))) for i in idx],
            hoverinfo="text"))
    fig.update_layout(template=TEMPLATE, barmode="overlay",
                      height=max(240, 34 * len(deps) + 140),
                      xaxis={"type": "date", "title": "UTC"},
                      yaxis={"categoryorder": "array", "categoryarray": labels[::-1]},
                      legend_title_text="outcome", margin={"t": 30})
    return fig
