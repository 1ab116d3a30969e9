"""The server's knobs in one frozen dataclass (python-tuf keeps its limits the same way),
read from the environment so every uvicorn worker process sees the same values.

========================================  =========  ==========================================
variable                                  default    meaning
========================================  =========  ==========================================
``FLEET_HOME`` / ``FLEET_DB``             ~/.fleet   the controller home and registry URL
``FLEET_SERVER_POLL_S``                   1800       check-in interval suggested to devices (s)
``FLEET_SERVER_TOKEN_TTL_S``              900        bearer token lifetime (s)
``FLEET_SERVER_STATE_TTL_S``              86400      a signed desired state's lifetime (s)
``FLEET_SERVER_RATE_PER_MIN``             60         requests per device per minute
``FLEET_SERVER_RATE_BURST``               30         burst above that rate
``FLEET_TEST_SERVER_CLOCK_SKEW_S``        0          test hook: the server's clock offset (s)
``FLEET_SERVER_ARTIFACTS``                (none)     a directory served read-only (GET, HEAD,
                                                     Range) under ``/artifacts/``: the farm
                                                     artifact location, for workers'
                                                     ``artifacts.url``
========================================  =========  ==========================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fleet.core import errors
from fleet.home import FleetHome

__all__ = ["ServerSettings"]


def _num(name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw else default
    except ValueError as exc:
        raise errors.UsageError(f"{name}={raw!r} is not a number") from exc
    if value < minimum:
        raise errors.UsageError(f"{name} must be at least {minimum:g}")
    return value


@dataclass(frozen=True)
class ServerSettings:
    home: FleetHome
    poll_s: int = 1800
    token_ttl_s: int = 900
    state_ttl_s: int = 86400
    rate_per_min: float = 60.0
    rate_burst: float = 30.0
    clock_skew_s: int = 0  #: test hook only (an expired desired state, for real)
    #: served under ``/artifacts/`` for farm workers (None: not served)
    artifacts: Path | None = None

    @classmethod
    def from_env(cls) -> ServerSettings:
        return cls(home=FleetHome.from_env(),
                   poll_s=int(_num("FLEET_SERVER_POLL_S", 1800, minimum=1)),
                   token_ttl_s=int(_num("FLEET_SERVER_TOKEN_TTL_S", 900, minimum=10)),
                   state_ttl_s=int(_num("FLEET_SERVER_STATE_TTL_S", 86400, minimum=60)),
                   rate_per_min=_num("FLEET_SERVER_RATE_PER_MIN", 60, minimum=1),
                   rate_burst=_num("FLEET_SERVER_RATE_BURST", 30, minimum=1),
                   clock_skew_s=int(_num("FLEET_TEST_SERVER_CLOCK_SKEW_S", 0,
                                         minimum=-10**9)),
                   artifacts=Path(os.environ["FLEET_SERVER_ARTIFACTS"]).expanduser()
                   if os.environ.get("FLEET_SERVER_ARTIFACTS") else None)
