"""Transports: one contract (:class:`Transport`), one opener (:func:`open_transport`)."""

from __future__ import annotations

import importlib

from fleet.transports.base import (
    CommandResult,
    ProgressCallback,
    RemoteStat,
    TransferResult,
    Transport,
    TransportOptions,
)
from fleet.transports.uri import DeviceUri, parse_uri

__all__ = [
    "CommandResult",
    "DeviceUri",
    "ProgressCallback",
    "RemoteStat",
    "TransferResult",
    "Transport",
    "TransportOptions",
    "open_transport",
    "parse_uri",
]

#: scheme -> "module:Class"; imported lazily so a controller without paramiko still runs.
_IMPLEMENTATIONS = {
    "local": "fleet.transports.local:LocalTransport",
    "ssh": "fleet.transports.ssh:SshTransport",
    "adb": "fleet.transports.adb:AdbTransport",
    "ios": "fleet.transports.ios:IosTransport",
}


def open_transport(uri: str, options: TransportOptions | None = None) -> Transport:
    parsed = parse_uri(uri)
    if parsed.scheme == "pull":
        from fleet.core import errors

        raise errors.UsageError(
            f"{uri}: a pull device is not reached by the controller; it polls `fleet "
            "server` (deploy to it with `fleet deploy`, which writes its desired state)",
            uri=uri)
    module, _, cls = _IMPLEMENTATIONS[parsed.scheme].partition(":")
    impl = getattr(importlib.import_module(module), cls)
    transport: Transport = impl(uri, options)
    return transport
