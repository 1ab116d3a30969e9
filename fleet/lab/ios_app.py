"""The emulated iOS app that embeds the fleet agent and answers its mailbox.

Why it exists: iOS gives no shell, so the controller runs agent verbs by dropping a
request into the app's ``Documents/fleet/inbox/`` over AFC; the app (on a real phone:
the host app linking the agent and the MNN runtime) runs the verb and writes the answer
to ``Documents/fleet/outbox/``. The mailbox documents (``fleet.mailbox/1``):

    request  inbox/<id>.json   {"schema", "id", "argv", "stdin_b64"?, "timeout_s"?}
    response outbox/<id>.json  {"schema", "id", "exit_code", "stdout_b64", "stderr_b64",
                                "duration_s"}

Both sides write to a dot-named temp file and rename, so nobody reads half a document.
The app runs only the agent (``argv[0] == "fleet-agent"``), never arbitrary programs: the
mailbox is not a shell. Here the agent runs as ``python -m fleet_agent`` with the app
container as working directory, one request at a time per phone. ``mute`` emulates an
app that iOS keeps suspended: requests stay unanswered; ``slow`` takes each request at
once but answers only after :data:`SLOW_S` seconds (a long benchmark).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fleet.mailbox import AGENT_ARGV0, SCHEMA

__all__ = ["INBOX", "MAILBOX_SCHEMA", "OUTBOX", "EmulatedApp", "handle_request"]

MAILBOX_SCHEMA = SCHEMA
INBOX = "Documents/fleet/inbox"
OUTBOX = "Documents/fleet/outbox"
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_AGENT = AGENT_ARGV0
_DEFAULT_TIMEOUT = 600.0
SLOW_S = 3.0


def _write_atomic(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def handle_request(container: Path, request: dict[str, Any], *,
                   python: str = sys.executable) -> dict[str, Any]:
    """Run one mailbox request and build its response document."""
    rid = str(request.get("id", ""))
    argv = request.get("argv")
    started = time.monotonic()
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        code, out, err = 2, b"", b"mailbox request without a valid argv\n"
    elif argv[0] != _AGENT:
        code, out, err = 127, b"", f"this app runs only {_AGENT}, not {argv[0]!r}\n".encode()
    else:
        stdin = base64.b64decode(request["stdin_b64"]) if request.get("stdin_b64") else None
        timeout = float(request.get("timeout_s") or _DEFAULT_TIMEOUT)
        try:
            proc = subprocess.run([python, "-m", "fleet_agent", *argv[1:]], cwd=container,
                                  input=stdin, capture_output=True, timeout=timeout,
                                  stdin=None if stdin is not None else subprocess.DEVNULL)
            code, out, err = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as exc:
            code, out, err = 124, exc.stdout or b"", (exc.stderr or b"") + b"\ntimed out\n"
    return {"schema": MAILBOX_SCHEMA, "id": rid, "exit_code": code,
            "stdout_b64": base64.b64encode(out).decode(),
            "stderr_b64": base64.b64encode(err).decode(),
            "duration_s": round(time.monotonic() - started, 3)}


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
        if not _ID.match(rid):
            path.unlink(missing_ok=True)
            return
        taken = path.with_name(f".{rid}.json.taken")
        try:  # take it out of the inbox first: the controller may withdraw what is left
            os.replace(path, taken)
        except FileNotFoundError:
            return
        try:
            request = json.loads(taken.read_text())
            if not isinstance(request, dict):
                raise ValueError("not an object")
        except (OSError, ValueError) as exc:
            request = {"id": rid, "argv": None, "_error": str(exc)}
        request["id"] = rid
        if self.mode == "slow" and self._stop_event.wait(SLOW_S):
            return
        response = handle_request(self.container, request, python=self.python)
        outbox.mkdir(parents=True, exist_ok=True)
        _write_atomic(outbox / f"{rid}.json", response)
        taken.unlink(missing_ok=True)
