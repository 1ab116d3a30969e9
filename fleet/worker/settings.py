"""What the controller and the farm workers agree on: the broker, deadlines, liveness.

Read from the environment first, then the controller home's ``config.toml``
(:mod:`fleet.config`):

=========================  ===========================  ==================================
environment                config.toml                  meaning (default)
=========================  ===========================  ==================================
``FLEET_BROKER``           ``broker.url``               Redis URL of broker and result
                                                        backend (none: everything runs in
                                                        the controller's process)
``FLEET_BROKER_DEADLINE``  ``broker.deadline_s``        longest per-device deadline a
                                                        farm task may have (900 s)
``FLEET_ARTIFACTS``        ``artifacts.location``       a directory controller and workers
                                                        share (``$FLEET_HOME/artifacts``)
``FLEET_ARTIFACTS_URL``    ``artifacts.url``            on a worker: fetch packages from
                                                        this ``http(s)://`` base URL (the
                                                        location served with Range) into
                                                        ``$FLEET_HOME/cache/artifacts``
                                                        (none: open them in the location)
``FLEET_ARTIFACTS_CA``     ``artifacts.ca_file``        CA bundle (PEM) for that URL
                                                        (none: the system's)
(none)                     ``worker.heartbeat_s``       heartbeat period (5 s); a worker
                                                        is live for 4 periods after one
=========================  ===========================  ==================================

The broker's visibility timeout (how long a delivered, unacknowledged task waits before
Redis hands it to another worker: a worker that died mid-task) follows the deadline:
``deadline + grace + margin``, never Celery's one-hour default, and never shorter than a
task may legally run (the worker's fan-out ends every task by its deadline plus grace),
so a task is delivered twice only when its first worker is gone.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fleet.core import errors
from fleet.home import FleetHome

__all__ = ["BROKER_ENV", "QUEUE_PREFIX", "FarmSettings", "check_artifacts_url",
           "check_host_name", "queue_for", "settings_for"]

BROKER_ENV = "FLEET_BROKER"
DEADLINE_ENV = "FLEET_BROKER_DEADLINE"
ARTIFACTS_ENV = "FLEET_ARTIFACTS"
ARTIFACTS_URL_ENV = "FLEET_ARTIFACTS_URL"
ARTIFACTS_CA_ENV = "FLEET_ARTIFACTS_CA"
QUEUE_PREFIX = "fleet.host."
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def check_host_name(name: str) -> str:
    """A farm host's name (``--via``, ``--host``): letters, digits, ``_.-``; UsageError
    otherwise (it becomes part of a queue name)."""
    if not _HOST.fullmatch(name):
        raise errors.UsageError(f"invalid farm host name {name!r}: letters, digits and "
                                "_.- only, at most 63", host=name)
    return name


def queue_for(host: str) -> str:
    """The Celery queue of farm host ``host``."""
    return QUEUE_PREFIX + check_host_name(host)


@dataclass(frozen=True)
class FarmSettings:
    broker_url: str | None
    artifacts: Path
    deadline_s: float = 900.0
    grace_s: float = 5.0
    heartbeat_s: float = 5.0
    #: how often a worker returns expired unacknowledged tasks to their queue (kombu's
    #: ``unacked_restore_interval``; every scan, not every tenth)
    restore_interval_s: float = 5.0
    #: a worker fetches packages from this base URL instead of opening the location
    artifacts_url: str | None = None
    #: CA bundle (PEM path) for an ``https://`` artifacts URL (None: the system's)
    artifacts_ca: Path | None = None
    #: where a worker keeps the packages it fetched (None: a temporary directory)
    cache_dir: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.broker_url is not None

    @property
    def visibility_timeout_s(self) -> int:
        """Seconds before a delivered, unacknowledged task is delivered again."""
        return math.ceil(self.deadline_s + 2 * self.grace_s + 10.0)

    @property
    def stale_s(self) -> float:
        """A worker is live while its last heartbeat is younger than this."""
        return 4 * self.heartbeat_s

    @property
    def redelivery_bound_s(self) -> float:
        """At most this long after its first delivery, a task whose worker died is running
        again somewhere (given a live worker for its queue)."""
        return self.visibility_timeout_s + self.restore_interval_s

    def task_bound_s(self, deadline_s: float) -> float:
        """How long the controller waits for one device's farm task, from its sending:
        one redelivery after a worker's death and a full deadline after it."""
        return self.redelivery_bound_s + deadline_s + self.grace_s


def _number(raw: Any, what: str) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError) as exc:
        raise errors.UsageError(f"{what}={raw!r} is not a number of seconds") from exc
    if not value > 0:
        raise errors.UsageError(f"{what} must be positive, not {raw!r}")
    return value


def settings_for(home: FleetHome, env: Mapping[str, str] | None = None) -> FarmSettings:
    """The farm settings of ``home``: environment over ``config.toml`` over defaults."""
    environ = os.environ if env is None else env
    cfg = home.config
    url = environ.get(BROKER_ENV) or cfg.broker_url
    deadline = environ.get(DEADLINE_ENV) or cfg.get("broker.deadline_s", 900.0)
    location = environ.get(ARTIFACTS_ENV) or cfg.artifacts_location
    beat = cfg.get("worker.heartbeat_s", 5.0)
    base = environ.get(ARTIFACTS_URL_ENV) or cfg.artifacts_url
    ca = environ.get(ARTIFACTS_CA_ENV) or cfg.get("artifacts.ca_file")
    return FarmSettings(
        broker_url=str(url) if url else None,
        artifacts=Path(str(location)).expanduser() if location else home.artifacts_dir,
        deadline_s=_number(deadline, "broker.deadline_s"),
        heartbeat_s=_number(beat, "worker.heartbeat_s"),
        artifacts_url=check_artifacts_url(str(base)) if base else None,
        artifacts_ca=Path(str(ca)).expanduser() if ca else None,
        cache_dir=home.path / "cache" / "artifacts")


def check_artifacts_url(url: str) -> str:
    """An artifacts base URL (``http://`` or ``https://`` with a host), ending in ``/``;
    UsageError otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise errors.UsageError(f"artifacts.url {url!r} is not an http:// or https:// URL",
                                url=url)
    return url if url.endswith("/") else url + "/"
