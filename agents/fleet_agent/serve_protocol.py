"""The serve daemon's wire protocol: newline-delimited JSON over a Unix socket.

One request is one JSON object on one line; the daemon answers each with one JSON object
on one line, in order, on the same connection (a client may keep the connection open and
send many). ``docs/serve-protocol.md`` is the reference; in short::

    {"op": "generate", "ids": [1, 2, 3], "max_new_tokens": 8}
    -> {"ok": true, "ids": [...], "adapter": "adapter_a@3"}      ("base" when none)
    {"op": "generate", "text": "Hello", "max_new_tokens": 8}
    -> {"ok": true, "ids": [...], "text": "...", "adapter": ...}  (needs a tokenizer)
    {"op": "swap", "name": "adapter_a", "version": 3}              (from the device store)
    {"op": "swap", "name": "adapter_a@3"}                          (the same)
    {"op": "swap", "path": "/x/lora.mnn", "reference": {...}}      (a plain file: only a
                                                                    --model-dir daemon; a
                                                                    store daemon refuses it)
    {"op": "swap", "name": null}                                   (serve the base alone)
    {"op": "swap", "rollback": true}                               (the adapter served before)
    -> {"ok": true, "adapter": "adapter_a@3", "previous": "...", "swap_ms": ..., ...}
    {"op": "status"} -> {"ok": true, "adapter": ..., "base": {...}, "served": n, ...}

Bounds (:class:`fleet.core.limits.ServeLimits`): at most 64 connections at once (the next
is answered ``request_limit`` and closed), a connection silent for 30 s is closed, a prompt
holds at most 4096 tokens, every id below the model's vocabulary size (``request_limit``).

Errors are data, as in the agent protocol: ``{"ok": false, "error": {"code", "type",
"message", "details"}}``; the codes are ``fleet.core.errors`` codes, so :func:`call` raises the
same class on the client side.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from fleet.core import errors

__all__ = ["MAX_LINE", "OPS", "ServeClient", "call", "decode", "encode", "error_doc"]

#: A request or response line longer than this is refused (a guard, not a limit in use).
MAX_LINE = 4 << 20
OPS = ("generate", "swap", "status", "ping")


def encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    if len(line) > MAX_LINE:
        raise errors.UsageError("request line too long", limit=MAX_LINE)
    try:
        doc = json.loads(line)
    except ValueError as exc:
        raise errors.UsageError(f"request is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise errors.UsageError("a request must be a JSON object")
    return doc


def error_doc(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, errors.FleetError):
        return {"ok": False, "error": exc.to_dict()}
    return {"ok": False, "error": {"code": "internal", "type": type(exc).__name__,
                                   "message": str(exc), "details": {}}}


class ServeClient:
    """One connection to the daemon; requests go one after another (thread-confined)."""

    def __init__(self, path: str | Path, *, timeout: float = 60.0) -> None:
        self.path = str(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(self.path)
        except FileNotFoundError as exc:
            sock.close()
            raise errors.NotFoundError(f"no serve daemon at {self.path}",
                                       socket=self.path) from exc
        except (ConnectionRefusedError, OSError) as exc:
            sock.close()
            raise errors.ConnectError(f"serve daemon at {self.path} refused: {exc}",
                                      socket=self.path) from exc
        self._sock = sock
        self._file = sock.makefile("rb")

    def request(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Send one request; return the raw answer (``ok`` may be false)."""
        try:
            self._sock.sendall(encode(doc))
            line = self._file.readline(MAX_LINE + 1)
        except TimeoutError as exc:
            raise errors.TransportTimeout("serve daemon did not answer in time",
                                          socket=self.path) from exc
        except OSError as exc:
            raise errors.ConnectionLostError(f"serve daemon connection lost: {exc}",
                                             socket=self.path) from exc
        if not line:
            raise errors.ConnectionLostError("serve daemon closed the connection",
                                             socket=self.path)
        return decode(line)

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one request; return the answer or raise the error it carries."""
        doc = self.request({"op": op, **args})
        if not doc.get("ok"):
            e = doc.get("error") or {}
            raise errors.error_from_code(str(e.get("code", "agent")),
                                         str(e.get("message", "serve daemon error")),
                                         e.get("details") or {})
        return doc

    def close(self) -> None:
        try:
            self._file.close()
        finally:
            self._sock.close()

    def __enter__(self) -> ServeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def call(path: str | Path, op: str, *, timeout: float = 60.0, **args: Any) -> dict[str, Any]:
    """One request on a fresh connection."""
    with ServeClient(path, timeout=timeout) as c:
        return c.call(op, **args)
