"""The candidate table of one health benchmark, read from a stored report.

An ``activate`` or ``bench`` report's body (``fleet_agent.verbs_install._summary``) holds
one entry per measured configuration: its ``label`` (``cpu/p-normal/m-low/t4``: backend,
precision, memory mode, threads; ``RuntimeConfig.label``), ``status`` (``passed``,
``failed``, ``fallback``, ``error``), ``timing`` (``median_ms``, ``p90_ms``, ...),
``comparison`` with the reference (``worst_cosine``, per output ``max_abs``) and the
``reasons`` it is not eligible; plus the ``pick`` and ``pick_reasons``. This module turns
that into plain rows for ``fleet reports --candidates`` and the HTML report's heat map.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from fleet.registry.models import Report

__all__ = ["CandidateRow", "CandidateTable", "candidate_table", "parse_label"]


def parse_label(label: str) -> tuple[str, str, str, int | None]:
    """``backend/p-PRECISION/m-MEMORY/tTHREADS`` -> (backend, precision, memory, threads);
    parts that are missing or malformed read as ``"?"`` (threads: None)."""
    parts = label.split("/")
    backend = parts[0] if parts and parts[0] else "?"
    precision = memory = "?"
    threads: int | None = None
    for p in parts[1:]:
        if p.startswith("p-"):
            precision = p[2:]
        elif p.startswith("m-"):
            memory = p[2:]
        elif p.startswith("t") and p[1:].isdigit():
            threads = int(p[1:])
    return backend, precision, memory, threads


@dataclass(frozen=True)
class CandidateRow:
    """One measured configuration. Times in milliseconds; ``cosine`` is the worst output's
    cosine similarity with the reference, ``max_abs_err`` the largest absolute error of any
    output; ``verdict`` is ``pass``, or ``fail (STATUS): why``."""

    label: str
    backend: str
    precision: str
    memory: str
    threads: int | None
    status: str
    role: str
    effective_backend: str | None
    median_ms: float | None
    p90_ms: float | None
    cosine: float | None
    max_abs_err: float | None
    passed: bool
    verdict: str
    picked: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CandidateTable:
    """The candidates of ``device``'s report on ``model@version``, and the pick (its
    label, or None when nothing passed) with the agent's reasons."""

    device: str
    model: str | None
    version: int | None
    kind: str
    reported_at: datetime
    picked: str | None
    pick_reasons: list[str] = field(default_factory=list)
    rows: list[CandidateRow] = field(default_factory=list)

    @property
    def entity(self) -> str:
        return f"{self.model}@{self.version}" if self.model else "-"

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "model": self.entity, "name": self.model,
                "version": self.version, "kind": self.kind,
                "reported_at": self.reported_at.isoformat(), "picked": self.picked,
                "pick_reasons": list(self.pick_reasons),
                "candidates": [r.to_dict() for r in self.rows]}


def _max_abs(comparison: Mapping[str, Any] | None) -> float | None:
    vals = [float(o["max_abs"]) for o in (comparison or {}).get("outputs") or []
            if o.get("max_abs") is not None]
    return max(vals) if vals else None


def _verdict(c: Mapping[str, Any]) -> str:
    status = str(c.get("status") or "error")
    if status == "passed":
        return "pass"
    why = "; ".join(str(r) for r in (c.get("reasons") or [])[:2]) or c.get("error") or ""
    return f"fail ({status})" + (f": {why}" if why else "")


def _row(c: Mapping[str, Any], picked: str | None) -> CandidateRow:
    label = str(c.get("label") or "?")
    backend, precision, memory, threads = parse_label(label)
    cfg = c.get("config")
    if isinstance(cfg, Mapping):  # newer bodies may carry the config itself
        backend = str(cfg.get("backend", backend))
        precision = str(cfg.get("precision", precision))
        memory = str(cfg.get("memory", memory))
        threads = int(cfg["threads"]) if cfg.get("threads") is not None else threads
    timing = c.get("timing") or {}
    comparison = c.get("comparison")
    cosine = (comparison or {}).get("worst_cosine")
    status = str(c.get("status") or "error")
    return CandidateRow(
        label=label, backend=backend, precision=precision, memory=memory, threads=threads,
        status=status, role=str(c.get("role") or "candidate"),
        effective_backend=c.get("effective_backend"),
        median_ms=timing.get("median_ms"), p90_ms=timing.get("p90_ms"),
        cosine=None if cosine is None else float(cosine), max_abs_err=_max_abs(comparison),
        passed=status == "passed", verdict=_verdict(c), picked=label == picked)


def candidate_table(device: str, report: Report) -> CandidateTable:
    """The candidate table of one ``activate``/``bench`` report (a report without
    candidates gives an empty table)."""
    body = report.body or {}
    pick = body.get("pick") or {}
    picked = pick.get("label")
    reasons = [str(r) for r in (body.get("pick_reasons") or pick.get("reasons") or [])]
    rows = [_row(c, picked) for c in body.get("candidates") or [] if isinstance(c, Mapping)]
    rows.sort(key=lambda r: (not r.passed, r.median_ms if r.median_ms is not None
                             else float("inf"), r.label))
    return CandidateTable(device=device, model=report.model_name or body.get("name"),
                          version=report.model_version or body.get("version"),
                          kind=report.kind, reported_at=report.created_at,
                          picked=picked, pick_reasons=reasons, rows=rows)
