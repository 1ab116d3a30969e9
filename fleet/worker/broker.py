"""The controller's view of the broker: send device tasks, read their states, revoke,
cancel, read push progress. :class:`CeleryBroker` is Celery on Redis; tests put a fake
with the same methods behind the dispatcher (``tests/fakes.py``: ``FakeBroker``).

A task's state is Celery's (``PENDING`` queued or unknown, ``STARTED``, ``SUCCESS``,
``FAILURE``, ``REVOKED``), read straight from the result backend's keys with one
``MGET`` per 500 tasks, so following 10,000 tasks costs 20 round trips a poll. A cancel
is a Redis key per fan-out (``fleet:cancel:<token>``) that workers watch
(:mod:`fleet.worker.watch`): a task in flight stops at its next safe point, exactly as a
cancelled in-process task does. A worker reports its pushes' bytes in a Redis hash per
fan-out (``fleet:bytes:<token>``, device -> ``"DONE TOTAL"``, at most twice a second per
device, :class:`fleet.worker.progress.BytesReporter`); the controller reads it with one
``HGETALL`` a second for the progress display.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from fleet.core import errors
from fleet.worker.app import TASK_NAME

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["BYTES_PREFIX", "CANCEL_PREFIX", "Broker", "CeleryBroker", "Send", "TaskState",
           "bytes_key", "cancel_key", "decode_bytes"]

CANCEL_PREFIX = "fleet:cancel:"
BYTES_PREFIX = "fleet:bytes:"
_CHUNK = 500


def cancel_key(token: str) -> str:
    return CANCEL_PREFIX + token


def bytes_key(token: str) -> str:
    """The Redis hash of one fan-out's push progress: device -> ``"DONE TOTAL"``."""
    return BYTES_PREFIX + token


def decode_bytes(raw: dict[Any, Any]) -> dict[str, tuple[int, int]]:
    """A progress hash as read from Redis (bytes or text), malformed fields left out."""
    out: dict[str, tuple[int, int]] = {}
    for key, value in raw.items():
        name = key.decode() if isinstance(key, bytes) else str(key)
        text = value.decode() if isinstance(value, bytes) else str(value)
        done, _, total = text.partition(" ")
        if done.isdigit() and total.isdigit():
            out[name] = (int(done), int(total))
    return out


@dataclass(frozen=True)
class TaskState:
    state: str  #: PENDING | STARTED | SUCCESS | FAILURE | REVOKED | RETRY
    result: Any = None  #: SUCCESS: the task's return value; FAILURE: the exception text


@dataclass(frozen=True)
class Send:
    """One task to send: its id, the queue, the payload and its expiry (seconds from
    now: a worker that receives it later discards it)."""

    task_id: str
    queue: str
    payload: dict[str, Any]
    expires_s: float


class Broker(Protocol):
    def send(self, batch: Sequence[Send]) -> None: ...

    def states(self, task_ids: Sequence[str]) -> dict[str, TaskState]:
        """The state of each task that has one beyond ``PENDING``."""
        ...

    def revoke(self, task_ids: Sequence[str]) -> None: ...

    def cancel(self, token: str) -> None: ...

    def pushed(self, token: str) -> dict[str, tuple[int, int]]:
        """Each device's push progress (bytes done, total) as its worker last reported
        it for the fan-out ``token``."""
        ...


class CeleryBroker:
    """:class:`Broker` over a Celery app whose broker and result backend are Redis; the
    app is made on first use (``make``), so a fan-out with no farm device never imports
    Celery."""

    def __init__(self, make: Callable[[], Celery]) -> None:
        self._make = make
        self._app: Celery | None = None

    @property
    def app(self) -> Celery:
        if self._app is None:
            self._app = self._make()
        return self._app

    @contextmanager
    def _mapped(self, what: str) -> Iterator[None]:
        from kombu.exceptions import OperationalError
        from redis.exceptions import RedisError

        try:
            yield
        except (OperationalError, RedisError, OSError) as exc:
            raise errors.ConnectError(f"the broker ({self.app.conf.broker_url}) cannot "
                                      f"{what}: {exc}", broker=str(self.app.conf.broker_url)
                                      ) from exc

    def send(self, batch: Sequence[Send]) -> None:
        with self._mapped("take tasks"), self.app.producer_or_acquire() as producer:
            for item in batch:  # argsrepr: the device, not a repr of the whole payload
                self.app.send_task(TASK_NAME, args=[item.payload], task_id=item.task_id,
                                   queue=item.queue, expires=item.expires_s,
                                   producer=producer,
                                   argsrepr=f"{item.payload.get('kind')} "
                                            f"{item.payload.get('device')}",
                                   kwargsrepr="{}")

    def states(self, task_ids: Sequence[str]) -> dict[str, TaskState]:
        backend = self.app.backend
        out: dict[str, TaskState] = {}
        with self._mapped("report task states"):
            for i in range(0, len(task_ids), _CHUNK):
                ids = list(task_ids[i:i + _CHUNK])
                values = backend.client.mget([backend.get_key_for_task(t) for t in ids])
                for tid, raw in zip(ids, values, strict=True):
                    if raw is None:
                        continue
                    meta = backend.decode_result(raw)
                    out[tid] = TaskState(str(meta.get("status")), meta.get("result"))
        return out

    def revoke(self, task_ids: Sequence[str]) -> None:
        if task_ids:
            with self._mapped("revoke tasks"):
                self.app.control.revoke(list(task_ids))

    def cancel(self, token: str) -> None:
        with self._mapped("cancel"):
            self.app.backend.client.set(cancel_key(token), b"1", ex=2 * 24 * 3600)

    def pushed(self, token: str) -> dict[str, tuple[int, int]]:
        with self._mapped("report progress"):
            return decode_bytes(self.app.backend.client.hgetall(bytes_key(token)))
