"""The app side of the authenticated mailbox: what an app that embeds the agent does with
each file it takes from its ``inbox/`` (``docs/agent-protocol.md``, "Mailbox").

An app (iOS; Android in app mode) cannot be exec'ed, so the controller drops requests
into a folder that others may be able to write too (a paired host, adb, shared storage).
Before anything runs, :func:`handle` checks the request with :mod:`fleet.core.mailbox`
against this device root: signed by a controller key the store trusts (the root
of trust, read as :class:`fleet_agent.store.Store` reads it), addressed to this device's key,
not expired, its nonce not seen before (a small window persisted under the root, taken
under a lock before the verb runs), and a verb the mailbox may run with arguments that
stay inside the app (``stage`` only of a file in the root's ``incoming/``). The verb then
runs in a child process, with arguments this module re-encodes (never the argv it got),
and the answer is signed with the device key, bound to the exact request bytes. Refusals
are answered too, as agent error documents with the ``mailbox_*`` codes, so the
controller sees why; an app with no device key yet can only answer them unsigned.

Bootstrap: an app that trusts no controller key yet accepts exactly one kind of request,
``enroll`` signed by a key it asks the device to pin (its ``controller_pub``, or an online
key of the root chain in its ``trust``): trust on first use, so enroll the app before
others can write its inbox. The answer is signed by the device key that enroll made and
carries its public half, which the controller pins.

Run by the app for one request: ``python -m fleet_agent.mailbox_auth --container DIR
--root ROOT --id ID < request > answer`` (``ROOT`` relative to ``DIR`` or absolute).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fleet.core import errors
from fleet.core import mailbox as mb
from fleet.core.filelock import exclusive
from fleet.core.fsutil import atomic_write
from fleet.core.package.keyid import fingerprint_public_key, load_trusted_public_key
from fleet.core.package.trust import online_keys, parse_root
from fleet.core.protocol import encode_args, fail
from fleet_agent.context import AgentContext
from fleet_agent.identity import load_device_key

__all__ = ["MAILBOX_VERBS", "NONCE_FILE", "AppMailbox", "handle", "main"]

#: the verbs an app runs from its mailbox; ``serve`` (a foreground daemon) is not one
MAILBOX_VERBS = frozenset({
    "status", "enroll", "rekey", "probe", "stage", "activate", "rollback", "bench", "audit",
    "gc", "lora add", "lora swap", "lora remove", "lora list", "lora serve", "lora generate"})
#: arguments naming a host path the requester would choose: never over the mailbox
_PATH_ARGS = ("socket", "state_file", "model_dir")
#: verbs whose ``path`` argument is a pushed file: it must lie in the root's ``incoming/``
_PUSHED_PATH_VERBS = frozenset({"stage", "lora add"})
NONCE_FILE = "mailbox-nonces.json"
_LOCK_FILE = ".mailbox.lock"
_DEFAULT_TIMEOUT_S = 600

#: ``run(argv, cwd, timeout_s) -> (exit_code, stdout, stderr)``
Runner = Callable[[Sequence[str], Path, float], tuple[int, bytes, bytes]]


def _run_agent(argv: Sequence[str], cwd: Path, timeout_s: float) -> tuple[int, bytes, bytes]:
    try:
        proc = subprocess.run([sys.executable, "-m", "fleet_agent", *argv], cwd=cwd,
                              stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        return 124, exc.stdout or b"", (exc.stderr or b"") + b"\ntimed out\n"
    return proc.returncode, proc.stdout, proc.stderr


@dataclass(frozen=True)
class AppMailbox:
    """One app: its working directory (the iOS container, the Android files folder) and
    its agent root there (``root`` as the controller names it: relative to ``container``
    or absolute)."""

    container: Path
    root: str
    run: Runner = _run_agent

    @property
    def ctx(self) -> AgentContext:
        return AgentContext(self.container / self.root)

    # -- keys ------------------------------------------------------------------------------
    def device_key(self) -> ec.EllipticCurvePrivateKey | None:
        return load_device_key(self.ctx.device_key) if self.ctx.device_key.exists() else None

    def trusted(self) -> list[ed25519.Ed25519PublicKey]:
        """The controller keys the store trusts now (the online keys of its root of trust,
        or the key pinned before roots); none before enrollment."""
        from fleet_agent.store import Store  # the store's own reading of its trust

        try:
            ring = Store(self.ctx).trusted_signer
        except errors.KeyMaterialError:
            return []
        return list(ring.values()) if isinstance(ring, Mapping) else [ring]

    # -- checks ----------------------------------------------------------------------------
    def _bootstrap_trust(self, data: bytes) -> list[ed25519.Ed25519PublicKey]:
        """No pinned key: the only acceptable request is an ``enroll`` signed by a key it
        asks the device to pin (``controller_pub``, or an online key of a root in its
        ``trust`` chain, which the verb then verifies). Anything else verifies against no
        key at all."""
        try:
            doc = json.loads(data)
            argv = doc.get("argv") if isinstance(doc, dict) else None
            call = mb.parse_agent_argv(argv if isinstance(argv, list) else [])
        except (ValueError, errors.FleetError):
            return []
        if call.verb != mb.BOOTSTRAP_VERB:
            return []
        keys: list[ed25519.Ed25519PublicKey] = []
        pem = call.args.get("controller_pub")
        if isinstance(pem, str):
            with contextlib.suppress(errors.FleetError):
                keys.append(load_trusted_public_key(pem))
        chain = call.args.get("trust")
        for root in chain if isinstance(chain, list) else []:
            with contextlib.suppress(errors.FleetError):
                keys.extend(online_keys(parse_root(root)).values())
        return keys

    def _check_call(self, req: mb.Request, call: mb.AgentCall, bootstrap: bool) -> str:
        """The verb and arguments the mailbox may run; returns the root to pass."""
        def forbid(reason: str, message: str) -> errors.MailboxForbiddenError:
            return errors.MailboxForbiddenError(f"mailbox request {req.id}: {message}",
                                                request_id=req.id, verb=call.verb,
                                                reason=reason)

        mb.check_addressed(req, call.verb)
        if call.verb not in MAILBOX_VERBS:
            raise forbid("verb", f"{call.verb!r} is not run over the mailbox")
        app_root = (self.container / self.root).resolve()
        root = call.root if call.root is not None else self.root
        if (self.container / root).resolve() != app_root:
            raise forbid("root", f"--root {root!r} is not this app's agent root")
        for key in _PATH_ARGS:
            if call.args.get(key) is not None:
                raise forbid("path_argument", f"argument {key!r} is not accepted over the "
                                              "mailbox")
        if bootstrap and call.args.get("replace_trust"):
            raise forbid("replace_trust", "replace_trust cannot come with a first enrollment")
        if call.verb in _PUSHED_PATH_VERBS:
            self._check_incoming(req, call, forbid)
        return root

    def _check_incoming(self, req: mb.Request, call: mb.AgentCall,
                        forbid: Callable[[str, str], errors.MailboxForbiddenError]) -> None:
        path = call.args.get("path")
        if not isinstance(path, str) or not path:
            return  # the verb itself refuses a missing path
        incoming = (self.container / self.root / "incoming").resolve()
        target = self.container / path
        if target.parent.resolve() != incoming or target.name.startswith(".") \
                or target.is_symlink():
            raise forbid("path", f"{call.verb} takes only a file pushed into the app's "
                                 f"incoming/ folder, not {path!r}")

    def _take_nonce(self, req: mb.Request, now: float) -> None:
        root = self.container / self.root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        store = root / NONCE_FILE
        with exclusive(root / _LOCK_FILE, timeout=30):
            try:
                seen = json.loads(store.read_bytes())
            except FileNotFoundError:
                seen = {}
            except ValueError:
                seen = {}  # a damaged window: requests already refused stay refused by
                #            expiry; the ones still alive are few and signed
            if not isinstance(seen, dict):
                seen = {}
            window = mb.check_replay(req, {str(k): int(v) for k, v in seen.items()
                                           if isinstance(v, int)}, now)
            atomic_write(store, json.dumps(window, sort_keys=True).encode())

    # -- one request -----------------------------------------------------------------------
    def handle(self, data: bytes, rid: str, *, now: float | None = None) -> bytes:
        """The answer bytes for one request's bytes (``rid``: the id from its file name)."""
        started = time.monotonic()
        now = time.time() if now is None else now
        key_before: ec.EllipticCurvePrivateKey | None = None
        verb = "mailbox"
        try:
            key_before = self.device_key()
            trusted = self.trusted()
            bootstrap = not trusted
            if bootstrap:
                trusted = self._bootstrap_trust(data)
            own = fingerprint_public_key(key_before.public_key()) if key_before else None
            req = mb.verify_request(data, trusted=trusted, device=own, now=now)
            if req.id != rid:
                raise errors.MailboxMalformedError(
                    f"mailbox request file {rid} holds request {req.id}", request_id=rid)
            call = mb.parse_agent_argv(req.argv, req.stdin, req.id)
            verb = call.verb
            root = self._check_call(req, call, bootstrap)
            self._take_nonce(req, now)
        except Exception as exc:  # every refusal is answered, as data
            details = exc.details if isinstance(exc, errors.FleetError) else {}
            code = 127 if details.get("reason") == "not_agent" else 1
            doc = fail(verb, exc)
            return self._answer(rid, data, code, json.dumps(doc, sort_keys=True).encode()
                                + b"\n", f"{doc['error']['message']}\n".encode(), started,
                                key_before)
        argv = ["--root", root, *call.verb.split(), "--args-b64", encode_args(call.args)]
        code, out, err = self.run(argv, self.container, float(req.timeout_s))
        key = key_before
        if key is None:  # enrollment made it: the answer is self-signed by the new key
            with contextlib.suppress(errors.FleetError, ValueError, OSError):
                key = self.device_key()
        return self._answer(rid, data, code, out, err, started, key)

    def _answer(self, rid: str, request: bytes, code: int, out: bytes, err: bytes,
                started: float, key: ec.EllipticCurvePrivateKey | None) -> bytes:
        duration = time.monotonic() - started
        if key is None:  # no device key to sign with: the controller will refuse it
            doc: dict[str, Any] = {
                "schema": mb.SCHEMA, "id": rid, "request_sha256": mb.request_sha256(request),
                "exit_code": code, "stdout_b64": base64.b64encode(out).decode(),
                "stderr_b64": base64.b64encode(err).decode(),
                "duration_ms": int(duration * 1000)}
            return json.dumps(doc, sort_keys=True).encode()
        return mb.sign_answer(key, rid=rid, request=request, exit_code=code, stdout=out,
                              stderr=err, duration_s=duration, with_public_key=True)


def handle(container: Path, root: str, data: bytes, rid: str, *,
           now: float | None = None, run: Runner = _run_agent) -> bytes:
    return AppMailbox(container, root, run).handle(data, rid, now=now)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fleet_agent.mailbox_auth")
    p.add_argument("--container", required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--id", required=True)
    ns = p.parse_args(argv)
    data = sys.stdin.buffer.read(4 << 20)
    answer = handle(Path(ns.container), ns.root, data, ns.id)
    sys.stdout.buffer.write(answer)
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    os.umask(0o077)
    sys.exit(main())
