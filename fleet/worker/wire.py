"""One device's outcome as the JSON a farm task returns, and back (pure, no I/O).

The worker runs a device's task through the fan-out and returns
:func:`outcome_doc`; the controller rebuilds the :class:`DeviceOutcome` with
:func:`outcome_from_doc`, its error as the same :class:`FleetError` class (by its stable
code, :func:`fleet.core.errors.error_from_code`), its result through the task kind's
``decode``. Shape (``"schema": "fleet.task/1"``)::

    {"schema", "device", "status": DeviceStatus value, "result": JSON | null,
     "error": {"code", "message", "details"} | null, "reason", "attempts",
     "duration_s", "worker": Celery node name}
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fleet.core import errors
from fleet.rollout.fanout import DeviceOutcome, DeviceStatus

__all__ = ["SCHEMA", "json_safe", "outcome_doc", "outcome_from_doc"]

SCHEMA = "fleet.task/1"


def json_safe(value: Any) -> Any:
    """``value`` with anything JSON cannot carry (paths, UUIDs, datetimes) as text."""
    return json.loads(json.dumps(value, default=str))


def outcome_doc(out: DeviceOutcome[Any], encode: Callable[[Any], Any], *, worker: str
                ) -> dict[str, Any]:
    err = out.error
    return {
        "schema": SCHEMA, "device": out.device, "status": out.status.value,
        "result": json_safe(encode(out.result)) if out.result is not None else None,
        "error": None if err is None else {"code": err.code, "message": err.message,
                                           "details": json_safe(err.details)},
        "reason": out.reason, "attempts": out.attempts, "duration_s": out.duration_s,
        "worker": worker,
    }


def outcome_from_doc(doc: dict[str, Any], decode: Callable[[Any], Any]) -> DeviceOutcome[Any]:
    """Raises ValueError for a document that is not a ``fleet.task/1`` outcome."""
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ValueError(f"not a {SCHEMA} outcome: {str(doc)[:200]}")
    e = doc.get("error")
    err = (errors.error_from_code(str(e.get("code")), str(e.get("message")),
                                  dict(e.get("details") or {})) if e else None)
    result = doc.get("result")
    return DeviceOutcome(str(doc["device"]), DeviceStatus(doc["status"]),
                         result=decode(result) if result is not None else None, error=err,
                         reason=str(doc.get("reason") or ""),
                         attempts=int(doc.get("attempts") or 0),
                         duration_s=float(doc.get("duration_s") or 0.0))
