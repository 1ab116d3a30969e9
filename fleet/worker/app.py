"""The Celery application of a fleet: Redis as broker and result backend.

Delivery guarantees (Celery's own options, set here and nowhere else):

- ``task_acks_late``: a task is acknowledged when it ends, not when it is received, so a
  worker that dies mid-task leaves it unacknowledged; Redis gives it to a worker again
  after the visibility timeout (:attr:`FarmSettings.visibility_timeout_s`, derived from
  the per-device deadline) and kombu looks for such tasks every
  ``restore_interval_s`` (``unacked_restore_throttle = 1``: every look scans);
- ``task_reject_on_worker_lost``: a task whose pool process died is requeued, not failed;
- ``worker_prefetch_multiplier = 1``: a worker holds no more tasks than it runs, so none
  waits unacknowledged behind others until its visibility timeout runs out;
- ``task_track_started``: the controller tells a queued task from a started one (a cancel
  revokes the first and waits for the second);
- JSON only, both ways;
- no subscription per sent task: Celery's Redis result backend subscribes the sender to
  each task's result channel (for ``AsyncResult.get``), one ``SUBSCRIBE`` per task and a
  growing unread buffer; the controller reads results with ``MGET`` instead
  (:mod:`fleet.worker.broker`), so its app skips that (:func:`make_app`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fleet.worker.settings import FarmSettings

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["TASK_NAME", "make_app"]

#: the one Celery task: run one device's part of a fan-out (fleet.worker.tasks)
TASK_NAME = "fleet.device"


def celery_conf(settings: FarmSettings) -> dict[str, Any]:
    """The Celery configuration for ``settings`` (a plain mapping; tests read it)."""
    return {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "task_track_started": True,
        "worker_prefetch_multiplier": 1,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "result_expires": 24 * 3600,
        "result_extended": False,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": settings.restore_interval_s,
            "unacked_restore_throttle": 1,
        },
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "worker_enable_remote_control": True,
        "task_default_queue": "fleet.host.default",
    }


def make_app(settings: FarmSettings) -> Celery:
    """A Celery app on the settings' broker; the worker side registers the task on it
    (:func:`fleet.worker.tasks.register`), the controller sends by name."""
    from celery import Celery

    if settings.broker_url is None:
        raise ValueError("no broker configured")
    class FleetCelery(Celery):
        def _get_backend(self) -> Any:
            backend = super()._get_backend()
            backend.on_task_call = _no_subscription  # results are polled (MGET)
            return backend

    app = FleetCelery("fleet", broker=settings.broker_url, backend=settings.broker_url,
                      set_as_current=False)
    app.conf.update(celery_conf(settings))
    return app


def _no_subscription(producer: Any, task_id: str) -> None:
    """Stands in for the Redis backend's ``on_task_call`` (module docstring)."""
