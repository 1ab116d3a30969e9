"""Session-scoped iOS lab for tests: emulated iPhones behind one emulated usbmuxd.

Import the fixtures into a test module::

    from tests.ios_fixtures import ios_home, ios_lab  # noqa: F401

``ios_lab.phones(n)`` returns ``n`` running phones (made on first use, reused by later
tests, stopped once at the end of the session); ``ios_lab.register(devs, group="phones")``
puts them into the home's registry. A deploy test that mixes them with Android and IoT
devices builds ``IosLab(lab_home)`` on its shared home instead (and calls
``fleet.lab.ios.down(lab_home)`` at the end). Tests that inject faults call
``ios_lab.heal(name)`` in a ``finally``. Phones are enrolled when made (the mailbox
bootstrap), and ``ios_lab.transport(phone)`` carries the app's mailbox keys.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from fleet.connect import transport_options
from fleet.home import FleetHome
from fleet.lab import ios
from fleet.lab.base import LabDevice, register_devices
from fleet.registry import Registry
from fleet.transports import TransportOptions
from fleet.transports.ios import IosTransport
from tests.lab_mailbox import credentials, enroll_app

__all__ = ["IosLab", "idevice", "ios_home", "ios_lab"]


class IosLab:
    """A handle on the session's phones."""

    def __init__(self, home: FleetHome) -> None:
        self.home = home
        self._phones: list[LabDevice] = []

    @property
    def socket(self) -> Path:
        return ios.socket_path(self.home)

    def phones(self, n: int) -> list[LabDevice]:
        if len(self._phones) < n:
            more = ios.up(self.home, n - len(self._phones), start_index=len(self._phones))
            for dev in more:  # the mailbox bootstrap, as `fleet device add` does it
                enroll_app(self.home, self.agent_root(dev),
                           lambda opts, dev=dev: IosTransport(dev.uri, opts), self.options())
            self._phones.extend(more)
        return self._phones[:n]

    def register(self, devs: Sequence[LabDevice], *, group: str | None = None) -> None:
        register_devices(self.home, devs)
        if group:
            reg = Registry.open(self.home)
            try:
                reg.ensure_group(group)
                reg.add_to_group(group, [d.name for d in devs])
            finally:
                reg.close()

    def options(self, **changes: object) -> TransportOptions:
        opts = transport_options(self.home)
        opts.usbmux_socket = str(ios.socket_path(self.home))  # this lab's usbmuxd
        for k, v in changes.items():
            setattr(opts, k, v)
        return opts

    def transport(self, dev: LabDevice, **changes: object) -> IosTransport:
        """A transport with the app's mailbox keys (the home's signing key, the device's)."""
        return IosTransport(dev.uri, self.options(
            **{"mailbox": credentials(self.home, self.agent_root(dev)), **changes}))

    def container(self, dev: LabDevice) -> Path:
        return Path(dev.extra["container"])

    def agent_root(self, dev: LabDevice) -> Path:
        return self.container(dev) / ios.AGENT_ROOT

    def heal(self, name: str) -> None:
        ios.heal(self.home, name)


def idevice(lab: IosLab, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a libimobiledevice tool against the lab's usbmuxd (never the system one)."""
    env = dict(os.environ, USBMUXD_SOCKET_ADDRESS=f"UNIX:{lab.socket}")
    return subprocess.run(list(argv), env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="session")
def ios_home(tmp_path_factory: pytest.TempPathFactory) -> FleetHome:
    home = FleetHome(Path(tmp_path_factory.mktemp("ioshome")).resolve())
    Registry.init(home).close()
    return home


@pytest.fixture(scope="session")
def ios_lab(ios_home: FleetHome) -> Iterator[IosLab]:
    lab = IosLab(ios_home)
    try:
        yield lab
    finally:
        ios.down(ios_home)
