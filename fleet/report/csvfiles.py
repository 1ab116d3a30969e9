"""The report's tables as CSV files, one per table, for spreadsheets and scripts.

``devices.csv``, ``latency.csv``, ``candidates.csv`` (the chosen device's grid),
``findings.csv`` (one row per rule, devices separated by spaces) and
``deployments.csv``. Times ISO 8601 UTC, latencies milliseconds, changes fractions.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fleet.core import errors
from fleet.core.fsutil import atomic_write
from fleet.report.data import ReportData

__all__ = ["TABLES", "write_csv"]

TABLES = ("devices", "latency", "candidates", "findings", "deployments")


def _iso(v: Any) -> Any:
    return v.isoformat() if hasattr(v, "isoformat") else v


def _tables(d: ReportData) -> dict[str, tuple[Sequence[str], list[Sequence[Any]]]]:
    cand = d.candidates
    return {
        "devices": (["device", "platform", "arch", "backend", "groups", "status",
                     "last_seen"],
                    [(x.name, x.platform, x.arch, x.backend, " ".join(x.groups), x.status,
                      _iso(x.last_seen)) for x in d.devices]),
        "latency": (["device", "model", "name", "version", "median_ms", "p90_ms",
                     "change_vs_previous", "regression", "config", "reported_at"],
                    [(p.device, p.entity, p.model, p.version, p.median_ms, p.p90_ms, p.change,
                      p.regression, p.config, _iso(p.reported_at)) for p in d.latency]),
        "candidates": (["device", "model", "label", "backend", "precision", "memory",
                        "threads", "status", "median_ms", "p90_ms", "cosine", "max_abs_err",
                        "verdict", "picked"],
                       [(cand.device, cand.entity, r.label, r.backend, r.precision, r.memory,
                         r.threads, r.status, r.median_ms, r.p90_ms, r.cosine, r.max_abs_err,
                         r.verdict, r.picked) for r in cand.rows] if cand else []),
        "findings": (["code", "severity", "devices", "models", "message", "fix"],
                     [(g.code, g.severity, " ".join(g.devices), " ".join(g.models), g.message,
                       g.fix) for g in d.findings]),
        "deployments": (["id", "kind", "model", "state", "created_at", "finished_at",
                         "steps"],
                        [(str(x.id), x.kind, x.entity, x.state, _iso(x.created_at),
                          _iso(x.finished_at),
                          " ".join(f"{k}={v}" for k, v in sorted(x.steps.items())))
                         for x in d.deployments]),
    }


def write_csv(directory: Path, d: ReportData) -> list[Path]:
    """Write one CSV per table into ``directory`` (created if missing); returns the files.
    Raises :class:`UsageError` when ``directory`` exists and is not a directory."""
    if directory.exists() and not directory.is_dir():
        raise errors.UsageError(f"--csv {directory}: not a directory", path=str(directory))
    out = []
    for name, (header, rows) in _tables(d).items():
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        w.writerows(["" if v is None else v for v in r] for r in rows)
        path = directory / f"{name}.csv"
        atomic_write(path, buf.getvalue().encode(), mode=0o644)
        out.append(path)
    return out
