"""Session-scoped Android lab for tests: emulated phones behind Debian's real adb server.

Import the fixtures into a test module::

    from tests.android_fixtures import android_home, android_lab  # noqa: F401

``android_lab.phones(n)`` returns ``n`` running phones (made on first use, reused by later
tests, stopped once at the end of the session); ``android_lab.register(devs,
group="phones")`` puts them into the home's registry. A deploy test that mixes them with
iOS and IoT devices builds ``AndroidLab(shared_home)`` on its own home instead (and calls
``fleet.lab.android.down(shared_home)`` at the end). Tests that inject faults call
``android_lab.heal(name)`` in a ``finally``. The lab's adb server listens on a free port,
never 5037 or the interactive lab's 15037.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from fleet.home import FleetHome
from fleet.lab import android
from fleet.lab.base import LabDevice, register_devices
from fleet.registry import Registry
from fleet.transports import TransportOptions
from fleet.transports.adb import AdbTransport
from tests.lab_mailbox import credentials, enroll_app

__all__ = ["AndroidLab", "android_home", "android_lab", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class AndroidLab:
    """A handle on the session's phones."""

    def __init__(self, home: FleetHome, adb_port: int | None = None) -> None:
        self.home = home
        self.adb_port = adb_port or free_port()
        self._phones: list[LabDevice] = []

    def phones(self, n: int) -> list[LabDevice]:
        if len(self._phones) < n:
            more = android.up(self.home, n - len(self._phones), start_index=len(self._phones),
                              adb_port=self.adb_port)
            for dev in more:  # the app agent's mailbox bootstrap, as `fleet device add` does
                opts = TransportOptions(adb_port=self.adb_port, connect_timeout=10.0)
                enroll_app(self.home, self.app_agent_root(dev),
                           lambda o, dev=dev: AdbTransport(str(dev.extra["app_uri"]), o), opts)
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

    def transport(self, dev: LabDevice, *, uri: str | None = None, **changes: object
                  ) -> AdbTransport:
        opts = TransportOptions(adb_port=self.adb_port, connect_timeout=10.0)
        for key, value in changes.items():
            setattr(opts, key, value)
        return AdbTransport(uri or dev.uri, opts)

    def app_transport(self, dev: LabDevice, **changes: object) -> AdbTransport:
        """App mode, with the app's mailbox keys (the home's signing key, the device's)."""
        changes.setdefault("mailbox", credentials(self.home, self.app_agent_root(dev)))
        return self.transport(dev, uri=str(dev.extra["app_uri"]), **changes)

    def app_agent_root(self, dev: LabDevice) -> Path:
        """The app agent's root in the phone's sandbox, on this machine."""
        return self.sandbox(dev) / f"sdcard/Android/data/{android.APP_PACKAGE}/files/fleet/agent"

    def sandbox(self, dev: LabDevice) -> Path:
        return Path(dev.extra["sandbox"])

    def adb(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        """Debian's adb command line against the lab's server (never the system's)."""
        return subprocess.run(["adb", "-P", str(self.adb_port), *args], capture_output=True,
                              timeout=timeout, check=False, stdin=subprocess.DEVNULL,
                              env=android.adb_env(self.home))

    def heal(self, name: str) -> None:
        android.heal(self.home, name)


@pytest.fixture(scope="session")
def android_home(tmp_path_factory: pytest.TempPathFactory) -> FleetHome:
    home = FleetHome(Path(tmp_path_factory.mktemp("androidhome")).resolve())
    Registry.init(home).close()
    return home


@pytest.fixture(scope="session")
def android_lab(android_home: FleetHome) -> Iterator[AndroidLab]:
    lab = AndroidLab(android_home)
    try:
        yield lab
    finally:
        android.down(android_home)
