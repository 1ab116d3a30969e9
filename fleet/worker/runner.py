"""``fleet worker --host NAME``: a Celery worker for one farm host's queue.

The worker consumes ``fleet.host.<NAME>`` with a pool of threads (device tasks wait on
transports, not on the CPU; a thread pool also means a SIGKILL takes every task of the
process down at once, so no orphan keeps working while its task is delivered again),
registers itself in the registry's ``workers`` table and beats there every
``heartbeat_s`` (the controller's liveness check and ``fleet worker list`` read it).
SIGTERM or SIGINT is Celery's warm shutdown: running tasks finish, then it stops and
stamps ``stopped_at``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from fleet.core import errors
from fleet.home import FleetHome
from fleet.registry import Registry
from fleet.rollout.deploy import Opener
from fleet.worker import roster
from fleet.worker.app import make_app
from fleet.worker.progress import BytesReporter, redis_writer
from fleet.worker.settings import FarmSettings, check_host_name, queue_for, settings_for
from fleet.worker.tasks import HANDLERS, Handler, WorkerContext, register
from fleet.worker.watch import CancelWatch

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["node_name", "run_worker"]


def node_name(host: str) -> str:
    """The default Celery node name of ``host``'s worker on this machine."""
    return f"{check_host_name(host)}@{socket.gethostname()}"


def _heartbeats(reg: Registry, settings: FarmSettings, node: str, pid: int,
                stop: threading.Event) -> None:
    while not stop.wait(settings.heartbeat_s):
        with contextlib.suppress(errors.FleetError):  # a missed beat; the bound is 4
            roster.beat(reg, node, pid)


def run_worker(home: FleetHome, host: str, *, concurrency: int = 4, name: str | None = None,
               loglevel: str = "WARNING", handlers: Mapping[str, Handler] | None = None,
               opener: Opener | None = None,
               setup: Callable[[Celery], None] | None = None) -> int:
    """Run until stopped; returns the worker's exit code. ``setup(app)`` runs before the
    worker starts (a benchmark registers a bare task of its own). Raises UsageError
    without a broker, and the registry's errors when it cannot be opened."""
    check_host_name(host)
    if concurrency < 1:
        raise errors.UsageError(f"--concurrency must be at least 1, not {concurrency}")
    settings = settings_for(home)
    if settings.broker_url is None:
        raise errors.UsageError("no broker configured: set FLEET_BROKER=redis://... or "
                                "broker.url in $FLEET_HOME/config.toml")
    reg = Registry.open(home)
    app = make_app(settings)
    node = name or node_name(host)
    watch = CancelWatch(lambda keys: app.backend.client.mget(keys)).start()
    wc = WorkerContext(home, reg, settings, node, watch,
                       handlers={**HANDLERS, **(handlers or {})}, opener=opener,
                       progress=BytesReporter(redis_writer(app.backend.client)))
    register(app, wc)
    if setup is not None:
        setup(app)
    pid = os.getpid()
    roster.register(reg, name=node, host=host, queue=queue_for(host),
                    hostname=socket.gethostname(), pid=pid, concurrency=concurrency)
    stop = threading.Event()
    beats = threading.Thread(target=_heartbeats, args=(reg, settings, node, pid, stop),
                             name="worker-heartbeat", daemon=True)
    beats.start()
    try:
        worker = app.Worker(hostname=node, queues=[queue_for(host)], pool="threads",
                            concurrency=concurrency, loglevel=loglevel, quiet=True,
                            without_gossip=True, without_heartbeat=True,
                            without_mingle=False)
        worker.start()
        return int(worker.exitcode or 0)
    finally:
        stop.set()
        watch.stop()
        with contextlib.suppress(errors.FleetError):
            roster.stopped(reg, node, pid)
        reg.close()
