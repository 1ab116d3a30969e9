"""Keys for the lab's app agents (the authenticated mailbox, ``docs/agent-protocol.md``).

A transport opened through the registry gets its mailbox keys from
:func:`fleet.connect.open_device`; tests that open lab transports directly get them here:
the home's signing key (made on first use) and the device key the app made when it was
enrolled (:func:`enroll_app`: the mailbox bootstrap, as ``fleet device add`` does it).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from fleet.agent_client import AgentClient
from fleet.artifacts.keys import init_signing_key, load_signing_key, public_pem
from fleet.core.mailbox import MailboxCredentials
from fleet.home import FleetHome
from fleet.transports.base import Transport, TransportOptions

__all__ = ["controller_pub", "credentials", "enroll_app"]


def controller_pub(home: FleetHome) -> str:
    if not home.signing_key.exists():
        init_signing_key(home)
    return public_pem(load_signing_key(home).public_key())


def credentials(home: FleetHome, agent_root: Path) -> MailboxCredentials:
    """The mailbox keys for the app whose agent root (on this machine) is ``agent_root``:
    its device key if it has one (else the bootstrap: enroll only)."""
    controller_pub(home)
    key_file = agent_root / "identity" / "device_key.pem"
    pem = None
    if key_file.exists():
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        pem = key.public_key().public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return MailboxCredentials.for_device(partial(load_signing_key, home), pem)


def enroll_app(home: FleetHome, agent_root: Path,
               open_: Callable[[TransportOptions], Transport],
               options: TransportOptions) -> None:
    """Enroll the app once (bootstrap over its mailbox), unless it already has a key."""
    if (agent_root / "identity" / "device_key.pem").exists():
        return
    options.mailbox = credentials(home, agent_root)
    with open_(options) as t:
        AgentClient(t).enroll(controller_pub(home), timeout=60)
