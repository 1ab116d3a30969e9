"""Fan-out progress on stderr: one bar per device (bytes) with its current state.

Transient, so only the result table stays; when stderr is not a terminal (CI logs) each
state change is a plain line instead.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TransferSpeedColumn,
)

from fleet.cli._output import err

__all__ = ["FanOutProgress", "fanout_progress"]


class FanOutProgress:
    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.tasks: dict[str, TaskID] = {}
        self.lock = threading.Lock()

    def _task(self, name: str) -> TaskID | None:
        if self.progress is None:
            return None
        with self.lock:
            if name not in self.tasks:
                self.tasks[name] = self.progress.add_task(name, total=None, state="queued")
            return self.tasks[name]

    def on_bytes(self, name: str, done: int, total: int) -> None:
        task = self._task(name)
        if task is not None and self.progress is not None:
            self.progress.update(task, completed=done, total=total)

    def on_state(self, name: str, state: str) -> None:
        task = self._task(name)
        if task is not None and self.progress is not None:
            self.progress.update(task, state=state)
        else:
            err.print(f"{name}: {state}", highlight=False, markup=False)

    def on_done(self, outcome: Any) -> None:
        """``outcome``: a :class:`fleet.rollout.fanout.DeviceOutcome`."""
        status = outcome.status.value if outcome.error is None else \
            f"{outcome.status.value} ({outcome.error.code})"
        task = self._task(outcome.device)
        if task is not None and self.progress is not None:
            self.progress.update(task, state=status)
        else:
            err.print(f"{outcome.device}: {status}", highlight=False, markup=False)


@contextmanager
def fanout_progress(enabled: bool = True) -> Iterator[FanOutProgress]:
    if not enabled or not err.is_terminal:
        yield FanOutProgress(None)
        return
    progress = Progress(TextColumn("{task.description:<16}"), BarColumn(), DownloadColumn(),
                        TransferSpeedColumn(), TextColumn("{task.fields[state]}"),
                        console=err, transient=True)
    with progress:
        yield FanOutProgress(progress)
