"""The mailbox protocol, controller side: run an agent verb where there is no shell.

iOS apps, and Android apps that embed the agent, cannot be exec'ed. The controller writes a
signed request into the app's ``fleet/inbox/``, wakes the app where the platform allows
(Android: ``am broadcast``; iOS: the app polls while in the foreground), and waits, with a
deadline, for the device-signed answer in ``fleet/outbox/``. The documents
(``fleet.mailbox/2``, field by field in ``docs/agent-protocol.md``, "Mailbox")::

    request  inbox/<id>.json   {"schema", "id", "argv", "stdin_b64"?, "timeout_s", "device",
                                "nonce", "expires", "signer", "sig"}      Ed25519, controller
    answer   outbox/<id>.json  {"schema", "id", "request_sha256", "exit_code", "stdout_b64",
                                "stderr_b64", "duration_ms", "signer", "signer_pub"?,
                                "sig"}                                    ECDSA P-256, device

Both sides write a dot-named temp file and rename it, so nobody reads half a document.
Checks over bytes live in :mod:`fleet.core.mailbox` (shared with the app side,
:mod:`fleet_agent.mailbox_auth`); here: the I/O. An answer that is unsigned, not signed by
the device's registered key, bound to another request or missing a field is refused with
its :class:`~fleet.core.errors.MailboxAuthError` subclass, never taken as the device's.
A device with no registered key yet can be sent ``enroll`` only (the bootstrap: its answer
is signed by the key it reports, which the registry then pins). An unanswered request is
:class:`~fleet.core.errors.MailboxPendingError`, never success; the request is withdrawn if
the app has not taken it yet (``details["picked_up"]`` says which).

The transport supplies file access through :class:`MailboxIO` (sync on adb, AFC on iOS)
and the keys through ``TransportOptions.mailbox``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from fleet.core import errors
from fleet.core import mailbox as mb
from fleet.core.mailbox import AGENT_ARGV0, SCHEMA, MailboxCredentials
from fleet.core.package.keyid import fingerprint_public_key
from fleet.transports.base import CommandResult

__all__ = ["AGENT_ARGV0", "SCHEMA", "Mailbox", "MailboxCredentials", "MailboxIO", "Posted"]


class MailboxIO(Protocol):
    """The four file operations a mailbox needs from a transport (device paths)."""

    def write_bytes(self, remote: str, data: bytes) -> None: ...

    def read_bytes(self, remote: str) -> bytes | None:
        """The file's bytes, or ``None`` when it does not exist (yet)."""

    def rename(self, src: str, dst: str) -> None: ...

    def remove(self, remote: str) -> None:
        """Remove a file; a missing file is not an error."""


@dataclass(frozen=True)
class Posted:
    """A request written into the inbox, awaiting its answer."""

    rid: str
    argv: tuple[str, ...]
    request: bytes  #: the exact bytes written: the answer is bound to their digest
    request_path: str
    answer_path: str
    bootstrap: bool
    started: float


@dataclass
class Mailbox:
    """One app's mailbox: ``base`` is the folder that holds ``inbox/`` and ``outbox/``."""

    io: MailboxIO
    base: str
    credentials: MailboxCredentials | None = None
    wake: Callable[[], None] | None = None
    poll_s: float = 0.05
    max_poll_s: float = 1.0
    where: str = "the app"

    @property
    def inbox(self) -> str:
        return f"{self.base.rstrip('/')}/inbox"

    @property
    def outbox(self) -> str:
        return f"{self.base.rstrip('/')}/outbox"

    def post(self, argv: Sequence[str], *, timeout: float, stdin: bytes | None = None
             ) -> Posted:
        """Sign and write one request (temp file, then rename), then wake the app."""
        creds = self.credentials
        if creds is None:
            raise errors.KeyMaterialError(
                f"{self.where}: mailbox requests are signed with the controller's key, and "
                "this transport was opened without it (open the device through the "
                "registry, or pass TransportOptions.mailbox)")
        bootstrap = creds.device_key is None
        if bootstrap and mb.parse_agent_argv(argv).verb != mb.BOOTSTRAP_VERB:
            raise errors.KeyMaterialError(
                f"{self.where}: the registry has no key for this device, so only "
                f"{mb.BOOTSTRAP_VERB} may be sent to its app (enroll it first)")
        device = None if creds.device_key is None else \
            fingerprint_public_key(creds.device_key)
        started = time.monotonic()
        rid = mb.new_request_id()
        data = mb.sign_request(creds.signing_key(), rid=rid, argv=argv, device=device,
                               now=time.time(), ttl_s=creds.ttl_s, timeout_s=timeout,
                               stdin=stdin)
        request, temp = f"{self.inbox}/{rid}.json", f"{self.inbox}/.{rid}.json.tmp"
        self.io.write_bytes(temp, data)
        self.io.rename(temp, request)
        if self.wake is not None:
            self.wake()
        return Posted(rid, tuple(argv), data, request, f"{self.outbox}/{rid}.json",
                      bootstrap, started)

    def accept(self, posted: Posted, data: bytes) -> CommandResult:
        """Verify an answer found in the outbox, remove it, return what it says. A refused
        answer is removed too and raised as its :class:`MailboxAuthError` subclass."""
        assert self.credentials is not None
        try:
            answer = mb.verify_answer(data, rid=posted.rid, request=posted.request,
                                      device_key=self.credentials.device_key)
            if posted.bootstrap:
                mb.check_enroll_answer(answer, posted.rid)
        except errors.MailboxAuthError as exc:
            exc.details.setdefault("outbox", self.outbox)
            raise
        finally:
            self.io.remove(posted.answer_path)
        return CommandResult(posted.argv, answer.exit_code, answer.stdout, answer.stderr,
                             time.monotonic() - posted.started)

    def pending(self, posted: Posted, timeout: float, picked_up: bool) -> errors.FleetError:
        state = "taken by the app, still running or lost" if picked_up else \
            "never taken; withdrawn"
        return errors.MailboxPendingError(
            f"no answer in {self.outbox} within {timeout:.0f}s for request {posted.rid} "
            f"({state})", request_id=posted.rid, inbox=self.inbox, picked_up=picked_up,
            timeout_s=timeout)

    def run(self, argv: Sequence[str], *, timeout: float, stdin: bytes | None = None
            ) -> CommandResult:
        """Post one request and wait for its answer until ``timeout`` seconds have passed."""
        posted = self.post(argv, timeout=timeout, stdin=stdin)
        deadline = posted.started + timeout
        delay = self.poll_s
        while True:
            data = self.io.read_bytes(posted.answer_path)
            if data is not None:
                return self.accept(posted, data)
            now = time.monotonic()
            if now >= deadline:
                break
            time.sleep(min(delay, deadline - now))
            delay = min(delay * 2, self.max_poll_s)
        picked_up = self.io.read_bytes(posted.request_path) is None
        if not picked_up:
            self.io.remove(posted.request_path)  # withdrawn: the app must not run it later
        raise self.pending(posted, timeout, picked_up)
