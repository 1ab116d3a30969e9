"""Emulated ``com.apple.mobile.house_arrest``: vend one app's sandbox over AFC.

Why it exists: on a real iPhone the only way into an app's files over USB is
house_arrest. The client sends one lockdown-framed plist ``{"Command": "VendContainer" |
"VendDocuments", "Identifier": BUNDLE}``; the phone answers ``{"Status": "Complete"}`` and
the same connection speaks AFC rooted at the app's container (``VendDocuments``: only
``/Documents`` is visible), or ``{"Error": "ApplicationLookupFailed"}`` for a bundle
that is not installed.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

from fleet.lab.afc import AfcServer
from fleet.lab.lockdown import recv_plist, send_plist

__all__ = ["SERVICE_NAME", "serve_house_arrest"]

SERVICE_NAME = "com.apple.mobile.house_arrest"

#: ``container_of(bundle_id) -> Path``, or ``None`` when the app is not installed.
ContainerLookup = Callable[[str], "Path | None"]


def _drain(sock: socket.socket, seconds: float = 10.0) -> None:
    """Read until the client hangs up, so it reads our error instead of a broken pipe
    (tidevice sends its first AFC packet before it reads the vend answer)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass


def serve_house_arrest(sock: socket.socket, container_of: ContainerLookup, *,
                       model: str = "iPhone14,5") -> None:
    try:
        req = recv_plist(sock)
    except (EOFError, OSError, ValueError):
        return
    if not isinstance(req, dict):
        send_plist(sock, {"Error": "InvalidRequest"})
        _drain(sock)
        return
    command, bundle = req.get("Command"), req.get("Identifier")
    if command not in ("VendContainer", "VendDocuments") or not isinstance(bundle, str):
        send_plist(sock, {"Error": "InvalidCommand"})
        _drain(sock)
        return
    container = container_of(bundle)
    if container is None:
        send_plist(sock, {"Error": "ApplicationLookupFailed"})
        _drain(sock)
        return
    send_plist(sock, {"Status": "Complete"})
    visible = "Documents" if command == "VendDocuments" else None
    AfcServer(container, visible=visible, model=model).serve(sock)
