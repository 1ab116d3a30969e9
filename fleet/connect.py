"""Open a registered device: its transport with the home's options, and its agent."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization

from fleet.agent_client import AgentClient
from fleet.core import errors
from fleet.home import FleetHome
from fleet.registry.models import Device
from fleet.transports import Transport, TransportOptions, open_transport

__all__ = ["controller_public_pem", "open_device", "transport_options"]


def transport_options(home: FleetHome, *, accept_host_key: str | None = None
                      ) -> TransportOptions:
    import os
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
    transport = open_transport(device.uri, transport_options(home,
                                                             accept_host_key=accept_host_key))
    return transport, AgentClient(transport, device)


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
