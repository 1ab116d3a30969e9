"""fleet-agent: the device side of mnn-fleet.

Every verb takes JSON in and prints exactly one JSON document out (``docs/agent-protocol.md``).
"""

from __future__ import annotations

from fleet.core.protocol import SCHEMA, fail, ok

__all__ = ["AGENT_VERSION", "SCHEMA", "fail", "ok"]

AGENT_VERSION = "0.1.0"
