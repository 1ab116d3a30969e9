"""The emulated iOS app that embeds the fleet agent and answers its mailbox.

Why it exists: iOS gives no shell, so the controller runs agent verbs by dropping a
signed request into the app's ``Documents/fleet/inbox/`` over AFC; the app (on a real
phone: the host app linking the agent and the MNN runtime) checks it, runs the verb and
writes the device-signed answer to ``Documents/fleet/outbox/``. The documents
(``fleet.mailbox/2``) and every check are ``docs/agent-protocol.md`` ("Mailbox"): this app
only moves files; each request's bytes go to the agent's own mailbox handler
(:mod:`fleet_agent.mailbox_auth`, the code a real app embeds, run here as
``python -m fleet_agent.mailbox_auth`` with the container as working directory), which
refuses unsigned, forged, replayed, expired and misaddressed requests and verbs the
mailbox does not run, and signs what it answers. The app runs only the agent, never
arbitrary programs: the mailbox is not a shell.

Both sides write to a dot-named temp file and rename, so nobody reads half a document.
One request at a time per phone. ``mute`` emulates an app that iOS keeps suspended:
requests stay unanswered; ``slow`` takes each request at once but answers only after
:data:`SLOW_S` seconds (a long benchmark).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

from fleet.core.mailbox import MAX_TTL_S, SCHEMA

__all__ = ["AGENT_ROOT", "INBOX", "MAILBOX_SCHEMA", "OUTBOX", "EmulatedApp",
           "handle_request"]

MAILBOX_SCHEMA = SCHEMA
INBOX = "Documents/fleet/inbox"
OUTBOX = "Documents/fleet/outbox"
AGENT_ROOT = "Documents/fleet/agent"
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MAX_REQUEST = 4 << 20
SLOW_S = 3.0


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def handle_request(container: Path, data: bytes, rid: str, *, root: str = AGENT_ROOT,
                   python: str = sys.executable) -> bytes | None:
    """Hand one request's bytes to the agent's mailbox handler; the answer's bytes, or
    ``None`` when the handler itself failed (logged; the controller sees no answer)."""
    try:
        proc = subprocess.run([python, "-m", "fleet_agent.mailbox_auth", "--container",
                               str(container), "--root", root, "--id", rid],
                              input=data[:_MAX_REQUEST], capture_output=True,
                              timeout=MAX_TTL_S + 60, check=False)
    except subprocess.TimeoutExpired:
        print(f"mailbox handler for {rid} did not finish", file=sys.stderr, flush=True)
        return None
    if proc.returncode != 0 or not proc.stdout:
        print(f"mailbox handler for {rid} failed ({proc.returncode}): "
              f"{proc.stderr.decode(errors='replace')[-2000:]}", file=sys.stderr, flush=True)
        return None
    return proc.stdout


class EmulatedApp(threading.Thread):
    """Watches one container's inbox; one request at a time, stops with :meth:`stop`."""

    def __init__(self, container: Path, *, mode: str = "ok", poll_s: float = 0.05,
                 python: str = sys.executable) -> None:
        super().__init__(name=f"ios-app:{container.name}", daemon=True)
        self.container = container
        self.mode = mode
        self.poll_s = poll_s
        self.python = python
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        inbox, outbox = self.container / INBOX, self.container / OUTBOX
        while not self._stop_event.wait(self.poll_s):
            if self.mode not in ("ok", "slow"):
                continue
            with contextlib.suppress(FileNotFoundError):
                for entry in sorted(os.scandir(inbox), key=lambda e: e.name):
                    if self._stop_event.is_set():
                        return
                    self._one(Path(entry.path), outbox)

    def _one(self, path: Path, outbox: Path) -> None:
        name = path.name
        if name.startswith(".") or not name.endswith(".json"):
            return  # a temp file still being written
        rid = name[:-5]
        if not _ID.fullmatch(rid):
            path.unlink(missing_ok=True)
            return
        taken = path.with_name(f".{rid}.json.taken")
        try:  # take it out of the inbox first: the controller may withdraw what is left
            os.replace(path, taken)
        except FileNotFoundError:
            return
        try:
            data = taken.read_bytes()
        except OSError:
            data = b""
        if self.mode == "slow" and self._stop_event.wait(SLOW_S):
            return
        answer = handle_request(self.container, data, rid, python=self.python)
        if answer is not None:
            outbox.mkdir(parents=True, exist_ok=True)
            _write_atomic(outbox / f"{rid}.json", answer)
        taken.unlink(missing_ok=True)
