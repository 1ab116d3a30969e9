"""Bounds on what one side reads from the other or from the operator, in one place
(python-tuf keeps its limits in one config dataclass; package-format caps are in
:mod:`fleet.core.package.limits`).

- What the controller reads from a device: a broken or hostile agent can print without
  end; the controller keeps at most :data:`MAX_AGENT_OUTPUT` bytes of each stream and
  fails the call with :class:`~fleet.core.errors.OutputLimitError` past it (the rest is
  read and dropped, never held).
- What the controller packages as reference data (golden ``.npz``, LLM ``.ref.json``,
  ``--inputs``): checked by ``stat`` before a byte is read, against the same cap the
  device applies (:data:`MAX_GOLDEN_BYTES`), so an oversized file is refused on the
  controller instead of being built, pushed and refused on every device.
- The serve daemon (:data:`SERVE`): connections, idle time, prompt length.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["MAX_AGENT_OUTPUT", "MAX_GOLDEN_BYTES", "MAX_OUTPUT_ENV", "SERVE", "ServeLimits",
           "agent_output_limit"]

#: bytes of stdout (and of stderr) the controller keeps from one device command
MAX_AGENT_OUTPUT = 16 << 20
#: environment override of :data:`MAX_AGENT_OUTPUT` (bytes), for operators and tests
MAX_OUTPUT_ENV = "FLEET_MAX_AGENT_OUTPUT"
#: golden / reference data, on the controller and on the device
MAX_GOLDEN_BYTES = 64 << 20


def agent_output_limit() -> int:
    """:data:`MAX_AGENT_OUTPUT`, or ``$FLEET_MAX_AGENT_OUTPUT`` when set to a positive int."""
    try:
        value = int(os.environ.get(MAX_OUTPUT_ENV, ""))
    except ValueError:
        return MAX_AGENT_OUTPUT
    return value if value > 0 else MAX_AGENT_OUTPUT


@dataclass(frozen=True)
class ServeLimits:
    """Bounds of the serve daemon (``fleet-agent serve``); same-uid clients only, but a
    stuck or greedy client must not starve the others or the device."""

    #: connections served at once; the next one is answered ``request_limit`` and closed
    max_connections: int = 64
    #: seconds a connection may stay silent (no complete request line) before it is closed
    idle_timeout_s: float = 30.0
    #: tokens in one prompt (ids or encoded text), whatever the model's context allows
    max_prompt_tokens: int = 4096
    #: seconds the accept loop sleeps after EMFILE/ENFILE/ENOBUFS/ENOMEM (doubles to 1 s)
    accept_backoff_s: float = 0.05


SERVE = ServeLimits()
