"""Fan-out progress on stderr: one overall bar and one phase line per device in flight.

The fan-out reports each device's state changes (``on_state``), bytes (``on_bytes``) and
end (``on_done``); :class:`FanOutModel` keeps them (pure, thread-safe, clock injected)
and the functions below turn it into text:

- on a terminal, a transient display redrawn a few times a second::

      ━━━━━━━━━━━━━╺━━━━━━━━━━  3/8 devices · 4.2 MiB of 9.6 MiB · 1.1 MiB/s · ETA 0:05
        pixel1  sending 1.2 MiB of 1.2 MiB
        pixel2  activating 12s
        board3  retrying in 1.5s (connect)

  Unknowns are never drawn as ``?``: a figure not known yet is left out (no bytes sent
  yet: no byte figures; no rate or estimate yet: ``ETA -``).
- otherwise (a log, a pipe) nothing is drawn; each device's change of phase is one plain
  line, ``pixel1: sending → activating``, and its end ``pixel1: activating → done``
  (``failed (connect)``, ``skipped``...). Bytes print nothing.

Phases: ``queued`` (the fan-out has it, not started), ``connecting`` (opening the device
and asking its agent's status), ``sending``, ``staging`` (the agent verifies and stores
it), ``activating`` (the agent decrypts, loads, probes and benchmarks every candidate in
one call: the line shows how long it has been at it), ``retrying``, then ``done``,
``staged``, ``skipped``, ``failed``, ``cancelled``... The states other code reports are
mapped onto these (``pushing`` is ``sending``, the registry's step states too).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from rich.console import Group, RenderableType
from rich.live import Live
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from fleet.cli._output import err, human_bytes

__all__ = ["DeviceProgress", "FanOutModel", "FanOutProgress", "Summary", "byte_progress",
           "device_text", "fanout_progress", "phase_of", "summary_text"]

#: other names for a phase: the fan-out's own words, and the registry's step states (a
#: farm host's progress comes from there)
_ALIASES = {"checking": "connecting", "pushing": "sending", "pending": "queued",
            "pushed": "staging", "not_started": "queued", "rolling_back": "rolling back"}
#: what an outcome's status reads as at the end of a device's line
_END = {"ok": "done", "staged": "staged", "skipped": "skipped"}
#: device lines drawn on a terminal at most (the others are counted)
MAX_LINES = 12


def phase_of(state: str) -> tuple[str, str]:
    """``(phase, detail)`` of a reported state: ``"retry in 1.5s (connect)"`` is
    ``("retrying", "in 1.5s (connect)")``, ``"pushing"`` is ``("sending", "")``."""
    state = state.strip()
    if state.startswith("retry "):
        return "retrying", state[len("retry "):]
    return _ALIASES.get(state, state), ""


@dataclass
class DeviceProgress:
    """One device as the display knows it; ``since``: when its phase began (clock s)."""

    name: str
    phase: str = "queued"
    detail: str = ""
    since: float = 0.0
    sent: int = 0
    total: int | None = None
    finished: bool = False
    failed: bool = False
    started: bool = False


@dataclass(frozen=True)
class Summary:
    """The overall figures: devices ``done`` (finished, any outcome) of ``total``,
    ``failed``, bytes ``sent`` of ``to_send`` (None: no push started yet), ``rate``
    (bytes/s, None: not measurable yet), ``eta_s`` (None: unknown)."""

    done: int
    total: int
    failed: int
    sent: int
    to_send: int | None
    rate: float | None
    eta_s: float | None


class FanOutModel:
    """The state of one fan-out's display; every method may be called from any thread."""

    def __init__(self, expected: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.expected = expected
        self.clock = clock
        self.started_at = clock()
        self.first_byte_at: float | None = None
        self.devices: dict[str, DeviceProgress] = {}
        self.failed = 0
        self._lock = threading.Lock()

    def _device(self, name: str) -> DeviceProgress:
        if name not in self.devices:
            self.devices[name] = DeviceProgress(name, since=self.clock())
        return self.devices[name]

    def state(self, name: str, state: str) -> tuple[str, str] | None:
        """Record ``state``; ``(old phase, new phase with detail)`` when the phase
        changed (what a log line shows), else None. A finished device stays finished."""
        phase, detail = phase_of(state)
        with self._lock:
            d = self._device(name)  # new devices start queued: joining it is no change
            if d.finished:
                return None
            old = d.phase
            if phase != "queued":
                d.started = True
            changed = phase != old or (phase == "retrying" and detail != d.detail)
            d.detail = detail
            if not changed:
                return None
            d.phase, d.since = phase, self.clock()
            return old, f"{phase} {detail}".strip()

    def bytes(self, name: str, done: int, total: int) -> None:
        with self._lock:
            d = self._device(name)
            d.started = True
            if self.first_byte_at is None and done > 0:
                self.first_byte_at = self.clock()
            d.sent = max(0, done)
            d.total = total if total and total > 0 else None

    def finish(self, name: str, status: str, code: str | None = None
               ) -> tuple[str, str] | None:
        """The device ended with ``status`` (a :class:`DeviceStatus` value): ``(old phase,
        end word)``, e.g. ``("activating", "done")`` or ``("connecting", "failed
        (connect)")``; None when it had ended so already (a wave's rollback after it)."""
        failed = status not in _END
        end = _END.get(status, status.replace("_", " "))
        if code and failed:
            end = f"{end} ({code})"
        with self._lock:
            d = self._device(name)
            old = d.phase
            if d.finished and old == end:
                return None
            self.failed += int(failed) - int(d.finished and d.failed)
            if not failed and d.total is not None:
                d.sent = d.total  # what it was sent arrived
            d.phase, d.detail, d.finished, d.failed = end, "", True, failed
            d.since = self.clock()
            return old, end

    def summary(self) -> Summary:
        with self._lock:
            now = self.clock()
            devices = list(self.devices.values())
            total = max(self.expected or 0, len(devices))
            done = sum(1 for d in devices if d.finished)
            sent = sum(d.sent for d in devices)
            totals = [d.total for d in devices if d.total is not None]
            to_send = sum(totals) if totals else None
            rate = None
            if self.first_byte_at is not None and now - self.first_byte_at >= 0.5 and sent:
                rate = sent / (now - self.first_byte_at)
            eta = None
            if to_send is not None and rate and to_send > sent:
                eta = (to_send - sent) / rate
            elif 0 < done < total:
                eta = (now - self.started_at) / done * (total - done)
            return Summary(done, total, self.failed, sent, to_send, rate, eta)

    def in_flight(self) -> list[DeviceProgress]:
        """Devices started and not finished, in the order they appeared."""
        with self._lock:
            return [DeviceProgress(**vars(d)) for d in self.devices.values()
                    if d.started and not d.finished]


def _clock_text(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 \
        else f"{s // 60}:{s % 60:02d}"


def summary_text(s: Summary) -> str:
    """``3/8 devices · 1 failed · 4.2 MiB of 9.6 MiB · 1.1 MiB/s · ETA 0:05``; a figure not
    known yet is left out, an unknown estimate is ``ETA -``."""
    parts = [f"{s.done}/{s.total} devices"]
    if s.failed:
        parts.append(f"{s.failed} failed")
    if s.to_send is not None:
        parts.append(f"{human_bytes(s.sent)} of {human_bytes(s.to_send)}")
    if s.rate is not None:
        parts.append(f"{human_bytes(s.rate)}/s")
    parts.append(f"ETA {_clock_text(s.eta_s)}" if s.eta_s is not None else "ETA -")
    return " · ".join(parts)


def device_text(d: DeviceProgress, now: float) -> str:
    """One device's line after its name: ``sending 1.2 MiB of 4.0 MiB``, ``activating
    12s``, ``retrying in 1.5s (connect)``."""
    if d.phase == "sending":
        if d.total is not None:
            return f"sending {human_bytes(d.sent)} of {human_bytes(d.total)}"
        return f"sending {human_bytes(d.sent)}" if d.sent else "sending"
    if d.detail:
        return f"{d.phase} {d.detail}"
    waited = now - d.since
    return f"{d.phase} {waited:.0f}s" if waited >= 1 else d.phase


def render(model: FanOutModel, width: int = 24) -> RenderableType:
    """The terminal display of ``model`` (see the module docstring)."""
    s = model.summary()
    head = Table.grid(padding=(0, 2))
    head.add_row(ProgressBar(total=max(1, s.total), completed=s.done, width=width),
                 Text(summary_text(s)))
    lines = Table.grid(padding=(0, 2))
    flying = model.in_flight()
    now = model.clock()
    for d in flying[:MAX_LINES]:
        lines.add_row(Text(f"  {d.name}"), Text(device_text(d, now)))
    if len(flying) > MAX_LINES:
        lines.add_row(Text(f"  … and {len(flying) - MAX_LINES} more"), Text(""))
    return Group(head, lines)


class FanOutProgress:
    """The fan-out's hooks (``on_bytes``, ``on_state``, ``on_done``) feeding a
    :class:`FanOutModel`; without a live display each change is a line on stderr."""

    def __init__(self, model: FanOutModel, live: bool,
                 write: Callable[[str], None] | None = None) -> None:
        self.model = model
        self.live = live
        self.write = write or (lambda line: err.print(line, highlight=False, markup=False))
        self.arrow = "→" if "utf" in (err.encoding or "").lower() else "->"

    def _line(self, name: str, change: tuple[str, str] | None) -> None:
        if change is not None and not self.live:
            self.write(f"{name}: {change[0]} {self.arrow} {change[1]}")

    def on_bytes(self, name: str, done: int, total: int) -> None:
        self.model.bytes(name, done, total)

    def on_state(self, name: str, state: str) -> None:
        self._line(name, self.model.state(name, state))

    def on_done(self, outcome: Any) -> None:
        """``outcome``: a :class:`fleet.rollout.fanout.DeviceOutcome`."""
        code = outcome.error.code if outcome.error is not None else None
        self._line(outcome.device, self.model.finish(outcome.device, outcome.status.value,
                                                     code))


@contextmanager
def fanout_progress(expected: int | None = None, enabled: bool = True
                    ) -> Iterator[FanOutProgress]:
    """Hooks for one fan-out of ``expected`` devices (None: as many as report in): a
    live display on a terminal, plain lines otherwise; nothing at all if not
    ``enabled``."""
    model = FanOutModel(expected)
    if not enabled:
        yield FanOutProgress(model, live=True)  # live without a display: silent
        return
    if not err.is_terminal:
        yield FanOutProgress(model, live=False)
        return
    with Live(console=err, transient=True, refresh_per_second=8,
              get_renderable=lambda: render(model)):
        yield FanOutProgress(model, live=True)


class _BytesColumn(ProgressColumn):
    """``12.0 MiB of 40.0 MiB · 8.1 MiB/s · ETA 0:03``, binary units, unknowns left out."""

    def render(self, task: Task) -> Text:
        parts = [f"{human_bytes(task.completed)} of {human_bytes(task.total)}"
                 if task.total is not None else human_bytes(task.completed)]
        if task.speed is not None:
            parts.append(f"{human_bytes(task.speed)}/s")
        left = task.time_remaining
        parts.append(f"ETA {_clock_text(left)}" if left is not None else "ETA -")
        return Text(" · ".join(parts))


@contextmanager
def byte_progress(total: int, label: str, *, minimum: int = 0
                  ) -> Iterator[Callable[[int], None] | None]:
    """A transient bar for work over ``total`` bytes (``advance(n)`` as it goes), on a
    terminal and from ``minimum`` bytes; otherwise None and nothing is drawn."""
    if total < minimum or not err.is_terminal:
        yield None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), _BytesColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)
