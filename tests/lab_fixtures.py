"""Session-scoped IoT lab for tests: real sshd boards in network namespaces (root only).

Use the fixtures from a test module::

    pytest_plugins = ("tests.lab_fixtures",)

``iot_lab.boards(n)`` returns ``n`` running boards (made on first use, reused by later
tests, torn down once at the end of the session), so deploy tests can ask for 8 or 16.
Tests that inject faults call ``iot_lab.heal(name)`` in a ``finally``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.connect import transport_options
from fleet.home import FleetHome
from fleet.lab import faults, iot
from fleet.lab.base import LabDevice
from fleet.registry import Registry
from fleet.transports import TransportOptions
from fleet.transports.ssh import SshTransport

__all__ = ["IotLab", "iot_lab", "lab_home"]


class IotLab:
    """A handle on the session's boards."""

    def __init__(self, home: FleetHome) -> None:
        self.home = home
        self._boards: list[LabDevice] = []

    def boards(self, n: int) -> list[LabDevice]:
        if len(self._boards) < n:
            more = iot.up(self.home, n - len(self._boards), start_index=len(self._boards))
            self._boards.extend(more)
        return self._boards[:n]

    def options(self, **changes: object) -> TransportOptions:
        opts = transport_options(self.home)
        for k, v in changes.items():
            setattr(opts, k, v)
        return opts

    def transport(self, dev: LabDevice, *, io_timeout: float | None = None,
                  **changes: object) -> SshTransport:
        uri = dev.uri + (f"&io_timeout={io_timeout:g}" if io_timeout else "")
        return SshTransport(uri, self.options(**changes))

    def heal(self, name: str) -> None:
        """Undo every fault on a board: link up, no shaping, no loss, sshd running."""
        faults.apply_fault(self.home, name, clear=True, start_sshd=True)


@pytest.fixture(scope="session")
def lab_home(tmp_path_factory: pytest.TempPathFactory) -> FleetHome:
    if os.geteuid() != 0:
        pytest.fail("the IoT lab tests need root (network namespaces); CI runs as root")
    home = FleetHome(Path(tmp_path_factory.mktemp("labhome")).resolve())
    Registry.init(home).close()
    return home


@pytest.fixture(scope="session")
def iot_lab(lab_home: FleetHome) -> Iterator[IotLab]:
    lab = IotLab(lab_home)
    try:
        yield lab
    finally:
        iot.down(lab_home)
