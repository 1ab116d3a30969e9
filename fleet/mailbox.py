"""The mailbox protocol, controller side: run an agent verb where there is no shell.

iOS apps, and Android apps that embed the agent, cannot be exec'ed. The controller writes a
request document into the app's ``fleet/inbox/``, wakes the app where the platform allows
(Android: ``am broadcast``; iOS: the app polls while in the foreground), and waits, with a
deadline, for the answer in ``fleet/outbox/``. Documents (``fleet.mailbox/1``)::

    request  inbox/<id>.json   {"schema", "id", "argv", "stdin_b64"?, "timeout_s"?}
    response outbox/<id>.json  {"schema", "id", "exit_code", "stdout_b64", "stderr_b64",
                                "duration_s"}

Both sides write a dot-named temp file and rename it, so nobody reads half a document.
``argv[0]`` is ``fleet-agent``: the app runs only the agent. An unanswered request is
reported as :class:`fleet.core.errors.MailboxPendingError`, never as success; the request is
withdrawn if the app has not taken it yet (``details["picked_up"]`` says which).

The transport supplies file access through :class:`MailboxIO` (sync on adb, AFC on iOS);
request and response handling below are pure functions over bytes.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fleet.core import errors
from fleet.transports.base import CommandResult

__all__ = ["AGENT_ARGV0", "SCHEMA", "Mailbox", "MailboxIO", "decode_response",
           "encode_request"]

SCHEMA = "fleet.mailbox/1"
AGENT_ARGV0 = "fleet-agent"


class MailboxIO(Protocol):
    """The four file operations a mailbox needs from a transport (device paths)."""

    def write_bytes(self, remote: str, data: bytes) -> None: ...

    def read_bytes(self, remote: str) -> bytes | None:
        """The file's bytes, or ``None`` when it does not exist (yet)."""

    def rename(self, src: str, dst: str) -> None: ...

    def remove(self, remote: str) -> None:
        """Remove a file; a missing file is not an error."""


def encode_request(rid: str, argv: Sequence[str], *, stdin: bytes | None = None,
                   timeout: float | None = None) -> bytes:
    doc: dict[str, Any] = {"schema": SCHEMA, "id": rid, "argv": list(argv)}
    if stdin is not None:
        doc["stdin_b64"] = base64.b64encode(stdin).decode()
    if timeout is not None:
        doc["timeout_s"] = timeout
    return json.dumps(doc, sort_keys=True).encode()


def decode_response(data: bytes, rid: str) -> tuple[int, bytes, bytes]:
    """``(exit_code, stdout, stderr)`` of a response; a malformed one is a transport error."""
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
            raise ValueError(f"not a {SCHEMA} document")
        if doc.get("id") != rid:
            raise ValueError(f"answer to request {doc.get('id')!r}, expected {rid!r}")
        return (int(doc["exit_code"]), base64.b64decode(doc.get("stdout_b64") or ""),
                base64.b64decode(doc.get("stderr_b64") or ""))
    except (ValueError, KeyError, TypeError) as exc:
        raise errors.TransportError(f"malformed mailbox response {rid}: {exc}",
                                    request_id=rid) from exc


@dataclass
class Mailbox:
    """One app's mailbox: ``base`` is the folder that holds ``inbox/`` and ``outbox/``."""

    io: MailboxIO
    base: str
    wake: Callable[[], None] | None = None
    poll_s: float = 0.05
    max_poll_s: float = 1.0

    @property
    def inbox(self) -> str:
        return f"{self.base.rstrip('/')}/inbox"

    @property
    def outbox(self) -> str:
        return f"{self.base.rstrip('/')}/outbox"

    def run(self, argv: Sequence[str], *, timeout: float, stdin: bytes | None = None
            ) -> CommandResult:
        """Post one request and wait for its answer until ``timeout`` seconds have passed."""
        started = time.monotonic()
        deadline = started + timeout
        rid = uuid.uuid4().hex
        request = f"{self.inbox}/{rid}.json"
        temp = f"{self.inbox}/.{rid}.json.tmp"
        self.io.write_bytes(temp, encode_request(rid, argv, stdin=stdin, timeout=timeout))
        self.io.rename(temp, request)
        if self.wake is not None:
            self.wake()
        answer = f"{self.outbox}/{rid}.json"
        delay = self.poll_s
        while True:
            data = self.io.read_bytes(answer)
            if data is not None:
                code, out, err = decode_response(data, rid)
                self.io.remove(answer)
                return CommandResult(tuple(argv), code, out, err, time.monotonic() - started)
            now = time.monotonic()
            if now >= deadline:
                break
            time.sleep(min(delay, deadline - now))
            delay = min(delay * 2, self.max_poll_s)
        picked_up = self.io.read_bytes(request) is None
        if not picked_up:
            self.io.remove(request)  # withdrawn: the app must not run it later
        state = "taken by the app, still running or lost" if picked_up else \
            "never taken; withdrawn"
        raise errors.MailboxPendingError(
            f"no answer in {self.outbox} within {timeout:.0f}s for request {rid} ({state})",
            request_id=rid, inbox=self.inbox, picked_up=picked_up, timeout_s=timeout)
