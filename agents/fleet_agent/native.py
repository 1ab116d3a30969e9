"""The native runtime core (``runtime/``), re-exported: clock, memory readings, probe.

The compiled module ``fleet_agent._native`` is private so that its binding details can
change; code imports from here. The same C++ core builds the ``fleet-probe`` executable,
which prints exactly what :func:`probe_json` returns (``docs/probe.md``).
"""

from __future__ import annotations

from fleet_agent._native import (
    PROBE_SCHEMA,
    RUNTIME_VERSION,
    ProbeError,
    current_rss_bytes,
    hwm_rss_bytes,
    monotonic_ns,
    peak_rss_bytes,
    probe_json,
    reset_peak_rss,
)

__all__ = [
    "PROBE_SCHEMA",
    "RUNTIME_VERSION",
    "ProbeError",
    "current_rss_bytes",
    "hwm_rss_bytes",
    "monotonic_ns",
    "peak_rss_bytes",
    "probe_json",
    "reset_peak_rss",
]
