"""Open a registered device: its transport with the home's options, and its agent.

:func:`device_session` is the one place that opens a device, registers its transport's
close with the fan-out (so a device past its deadline is unblocked) and hands out the
agent client; every fan-out task starts with it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives import serialization

from fleet.agent_client import AgentClient
from fleet.artifacts.keys import load_signing_key
from fleet.artifacts.trust import chain_docs
from fleet.core import errors
from fleet.core.mailbox import MailboxCredentials
from fleet.home import FleetHome
from fleet.registry.models import Device
from fleet.transports import Transport, TransportOptions, open_transport

__all__ = ["Closers", "controller_public_pem", "device_session", "open_device",
           "transport_options"]


class Closers(Protocol):
    """What a session registers its transport's close with (the fan-out's TaskContext)."""

    def add_closer(self, fn: Callable[[], None]) -> None: ...


def transport_options(home: FleetHome, *, accept_host_key: str | None = None
                      ) -> TransportOptions:
    opts = TransportOptions(home=home.path, known_hosts=home.known_hosts, ssh_key=home.ssh_key,
                            accept_host_key=accept_host_key)
    # Lab devices carry their adb server port / usbmuxd socket in the URI; real devices use
    # the system defaults unless these variables say otherwise.
    if os.environ.get("FLEET_ADB_PORT"):
        opts.adb_port = int(os.environ["FLEET_ADB_PORT"])
    if os.environ.get("FLEET_USBMUX_SOCKET"):
        opts.usbmux_socket = os.environ["FLEET_USBMUX_SOCKET"]
    if os.environ.get("FLEET_MAILBOX_TIMEOUT"):
        opts.mailbox_timeout = float(os.environ["FLEET_MAILBOX_TIMEOUT"])
    return opts


def open_device(home: FleetHome, device: Device, *, accept_host_key: str | None = None
                ) -> tuple[Transport, AgentClient]:
    opts = transport_options(home, accept_host_key=accept_host_key)
    # app agents (mailbox): requests signed by the online key, answers checked against
    # the device's registered key (none yet: enrollment only)
    opts.mailbox = MailboxCredentials.for_device(partial(load_signing_key, home),
                                                 device.public_key)
    transport = open_transport(device.uri, opts)
    agent = AgentClient(transport, device)
    agent.trust = chain_docs(home)  # trust changes travel with every push and enroll
    return transport, agent


@contextmanager
def device_session(home: FleetHome, device: Device, ctx: Closers | None = None, *,
                   accept_host_key: str | None = None) -> Iterator[AgentClient]:
    """``with device_session(home, dev, ctx) as agent:``: the device's agent client, its
    transport closed on exit and, given ``ctx``, closed by the fan-out's watchdog past the
    device's deadline. Opening raises the transport's errors (``ConnectError``, ...)."""
    transport, agent = open_device(home, device, accept_host_key=accept_host_key)
    if ctx is not None:
        ctx.add_closer(transport.close)
    with transport:
        yield agent


def controller_public_pem(home: FleetHome) -> str | None:
    """The controller's Ed25519 public key (PEM), or None before `fleet keys init`."""
    path: Path = home.signing_key
    if not path.exists():
        return None
    if path.stat().st_mode & 0o077:
        raise errors.KeyMaterialError(
            f"signing key {path} is readable by others; chmod 600 it", path=str(path))
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
