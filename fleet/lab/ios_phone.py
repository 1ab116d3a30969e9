"""The emulated iPhones behind the lab's usbmuxd: lockdownd, services and the app.

Why it exists: it ties the protocol pieces (:mod:`fleet.lab.lockdown`,
:mod:`fleet.lab.house_arrest`, :mod:`fleet.lab.afc`, :mod:`fleet.lab.ios_app`) to the
lab's on-disk state, and re-reads that state when it changes, so ``fleet lab up --ios``
can add phones and tests can inject faults (app missing, app mute) while the daemon runs.

On-disk layout under ``<lab_dir>/ios/``:
``host.json`` (the controller host's pairing identity, 0600), ``pair_records/<UDID>.plist``
(the host's records, served by ``ReadPairRecord``, 0600), ``phones/<UDID>/device.pem``
(the phone's key and certificate, 0600), ``phones/<UDID>/trusted_hosts.json``
(``HostID -> RootCertificate``: what the phone accepted when it was paired) and
``phones/<UDID>/apps/<bundle>/`` (the app container: ``Documents``, ``Library``, ``tmp``).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet.lab.afc import AfcServer
from fleet.lab.house_arrest import SERVICE_NAME as HOUSE_ARREST
from fleet.lab.house_arrest import serve_house_arrest
from fleet.lab.ios_app import EmulatedApp
from fleet.lab.lockdown import LOCKDOWN_PORT, DeviceFacts, LockdownServer
from fleet.lab.usbmux import PortHandler

__all__ = ["LabPhone", "LabPhoneTable", "PhoneSpec"]

AFC_SERVICE = "com.apple.afc"
_SERVICE_TTL_S = 30.0


@dataclass(frozen=True)
class PhoneSpec:
    """One phone as the lab state file lists it."""

    name: str
    udid: str
    device_id: int
    bundle: str
    app: str = "ok"  #: "ok" | "mute" (never answers) | "slow" | "missing" (not installed)
    product_type: str = "iPhone14,5"
    product_version: str = "16.7.2"
    build_version: str = "20H115"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PhoneSpec:
        keys = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in keys})


@dataclass
class LabPhone:
    spec: PhoneSpec
    dir: Path
    _ports: dict[int, tuple[str, float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def udid(self) -> str:
        return self.spec.udid

    @property
    def device_id(self) -> int:
        return self.spec.device_id

    def container(self) -> Path:
        return self.dir / "apps" / self.spec.bundle

    def container_of(self, bundle: str) -> Path | None:
        if bundle != self.spec.bundle or self.spec.app == "missing":
            return None
        root = self.container()
        for sub in ("Documents", "Library", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        return root

    def facts(self) -> DeviceFacts:
        s = self.spec
        trusted = json.loads((self.dir / "trusted_hosts.json").read_text())
        pub = (self.dir / "device_public.pem").read_bytes()
        values: dict[str, Any] = {
            "ActivationState": "Activated", "BuildVersion": s.build_version,
            "CPUArchitecture": "arm64e", "DeviceClass": "iPhone", "DeviceColor": "1",
            "DeviceName": s.name, "DevicePublicKey": pub, "HardwareModel": "D17AP",
            "HardwarePlatform": "t8110", "ModelNumber": "MLPF3", "PasswordProtected": False,
            "ProductName": "iPhone OS", "ProductType": s.product_type,
            "ProductVersion": s.product_version, "ProtocolVersion": "2",
            "RegionInfo": "LL/A", "SerialNumber": f"FLEETLAB{s.device_id:04d}",
            "TimeZone": "UTC", "UniqueChipID": 0x1000 + s.device_id,
            "UniqueDeviceID": s.udid, "WiFiAddress": f"02:00:00:00:00:{s.device_id:02x}",
        }
        domains = {
            "com.apple.disk_usage": {"TotalDiskCapacity": 128_000_000_000,
                                     "TotalDataCapacity": 110_000_000_000,
                                     "TotalDataAvailable": 60_000_000_000},
            "com.apple.mobile.battery": {"BatteryCurrentCapacity": 87,
                                         "BatteryIsCharging": False},
        }
        return DeviceFacts(values=values, domains=domains,
                           trusted_hosts={k: v.encode() for k, v in trusted.items()},
                           cert_file=self.dir / "device.pem")

    # -- ports ---------------------------------------------------------------------------
    def start_service(self, name: str) -> int | None:
        if name not in (HOUSE_ARREST, AFC_SERVICE):
            return None
        with self._lock:
            now = time.monotonic()
            for port, (_, at) in list(self._ports.items()):
                if now - at > _SERVICE_TTL_S:
                    del self._ports[port]
            while True:
                port = random.randint(49152, 65000)
                if port not in self._ports and port != LOCKDOWN_PORT:
                    break
            self._ports[port] = (name, now)
        return port

    def open_port(self, port: int) -> PortHandler | None:
        if port == LOCKDOWN_PORT:
            return lambda sock: LockdownServer(self.facts(), self.start_service).serve(sock)
        with self._lock:
            entry = self._ports.pop(port, None)  # one connection per StartService
        if entry is None:
            return None
        if entry[0] == HOUSE_ARREST:
            return lambda sock: serve_house_arrest(sock, self.container_of,
                                                   model=self.spec.product_type)
        media = self.dir / "media"
        media.mkdir(exist_ok=True)
        return lambda sock: AfcServer(media, model=self.spec.product_type).serve(sock)


class LabPhoneTable:
    """All phones of one lab, re-read from the state file when it changes."""

    def __init__(self, state_file: Path, ios_dir: Path) -> None:
        self.state_file = state_file
        self.ios_dir = ios_dir
        self.buid = ""
        self._phones: dict[str, LabPhone] = {}
        self._apps: dict[str, EmulatedApp] = {}
        self._mtime = -1
        self._lock = threading.Lock()
        self.refresh()

    def refresh(self) -> None:
        try:
            mtime = self.state_file.stat().st_mtime_ns
        except FileNotFoundError:
            return
        with self._lock:
            if mtime == self._mtime:
                return
            state = json.loads(self.state_file.read_text())
            self._mtime = mtime
            self.buid = str(state.get("buid", ""))
            specs = [PhoneSpec.from_dict(p) for p in state.get("phones", [])]
            self._phones = {s.udid: LabPhone(s, self.ios_dir / "phones" / s.udid)
                            for s in specs}
            self._sync_apps()
            # tell the lab tools which state is live, so a fault is in force when they return
            tmp = self.ios_dir / ".applied.tmp"
            tmp.write_text(str(mtime))
            os.replace(tmp, self.ios_dir / "applied")

    def _sync_apps(self) -> None:
        for udid in list(self._apps):
            if udid not in self._phones or self._phones[udid].spec.app == "missing":
                self._apps.pop(udid).stop()
        for udid, phone in self._phones.items():
            if phone.spec.app == "missing":
                continue
            app = self._apps.get(udid)
            if app is None:
                phone.container_of(phone.spec.bundle)
                app = EmulatedApp(phone.container(), mode=phone.spec.app)
                self._apps[udid] = app
                app.start()
            app.mode = phone.spec.app

    def stop(self) -> None:
        with self._lock:
            for app in self._apps.values():
                app.stop()
            self._apps.clear()

    # -- PhoneTable ------------------------------------------------------------------------
    def phones(self) -> Sequence[LabPhone]:
        self.refresh()
        return list(self._phones.values())

    def _record(self, udid: str) -> Path | None:
        if not udid or "/" in udid or udid.startswith("."):
            return None
        return self.ios_dir / "pair_records" / f"{udid}.plist"

    def read_pair_record(self, udid: str) -> bytes | None:
        path = self._record(udid)
        if path is None:
            return None
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    def save_pair_record(self, udid: str, data: bytes) -> None:
        path = self._record(udid)
        if path is None:
            return
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def delete_pair_record(self, udid: str) -> bool:
        path = self._record(udid)
        if path is None:
            return False
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            return True
        return False
