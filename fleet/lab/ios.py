"""``fleet lab up --ios N``: emulated iPhones behind one emulated usbmuxd.

Why it exists: so the iOS transport, tidevice and libimobiledevice can be run for real on
a machine without phones. ``up`` makes the pairing material (a host identity shared by
the lab's phones, one device key and certificate per phone, a pair record per phone),
the app containers, and starts one daemon process (pidfile, log) that serves usbmuxd on
a Unix socket and runs every phone's app. The daemon re-reads the state file, so ``up``
can add phones and :func:`set_app` can inject faults while it runs. ``down`` stops the
daemon and removes everything the lab made.

Nothing here or in the daemon makes tidevice download anything: the phones offer only
lockdownd, house_arrest and AFC (no DeveloperDiskImage, no WebDriverAgent).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import plistlib
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from fleet.core import errors
from fleet.home import FleetHome
from fleet.lab.base import LabDevice, load_state, save_state
from fleet.lab.lockdown import HostIdentity, make_device_key, make_host_identity, make_pair_record

__all__ = [
    "DEFAULT_BUNDLE",
    "GROUP",
    "down",
    "heal",
    "ios_dir",
    "make_foreign_pair_record",
    "restart_usbmuxd",
    "set_app",
    "socket_path",
    "status",
    "up",
]

KIND = "ios"
GROUP = "lab-ios"
DEFAULT_BUNDLE = "org.mnnfleet.agent"
AGENT_ROOT = "Documents/fleet/agent"
AGENT_CMD = ["fleet-agent"]  #: the app embeds the agent; the mailbox names it by this word
_START_TIMEOUT_S = 20.0


def ios_dir(home: FleetHome) -> Path:
    return home.lab_dir / "ios"


def socket_path(home: FleetHome) -> Path:
    """The usbmuxd socket; under /tmp when the home path is too long for AF_UNIX."""
    path = ios_dir(home) / "usbmuxd.sock"
    if len(str(path)) > 100:
        digest = hashlib.sha256(str(home.path).encode()).hexdigest()[:12]
        path = Path("/tmp") / f"fleet-usbmuxd-{digest}.sock"
    return path


def _pidfile(home: FleetHome) -> Path:
    return ios_dir(home) / "usbmuxd.pid"


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _host(home: FleetHome, state: dict[str, Any]) -> HostIdentity:
    path = ios_dir(home) / "host.json"
    if path.exists():
        return HostIdentity.from_dict(json.loads(path.read_text()))
    host = make_host_identity(state["buid"])
    _write_private(path, json.dumps(host.to_dict()).encode())
    return host


def _make_phone(home: FleetHome, host: HostIdentity, index: int, device_id: int,
                bundle: str) -> dict[str, Any]:
    udid = f"00008110-{secrets.token_hex(8).upper()}"
    phone_dir = ios_dir(home) / "phones" / udid
    key = make_device_key()
    record, cert_pem = make_pair_record(host, key, wifi_mac=f"02:00:00:00:00:{device_id:02x}")
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    _write_private(phone_dir / "device.pem", key_pem + cert_pem)
    (phone_dir / "device_public.pem").write_bytes(record["DevicePublicKey"])
    (phone_dir / "trusted_hosts.json").write_text(
        json.dumps({host.host_id: host.root_cert_pem.decode()}))
    _write_private(ios_dir(home) / "pair_records" / f"{udid}.plist", plistlib.dumps(record))
    for sub in ("Documents", "Library", "tmp"):
        (phone_dir / "apps" / bundle / sub).mkdir(parents=True, exist_ok=True)
    return {"name": f"iphone-{index}", "index": index, "udid": udid,
            "device_id": device_id, "bundle": bundle, "app": "ok"}


def _uri(home: FleetHome, phone: dict[str, Any]) -> str:
    return f"ios://{phone['udid']}?bundle={phone['bundle']}&usbmux={socket_path(home)}"


def _lab_device(home: FleetHome, phone: dict[str, Any]) -> LabDevice:
    container = ios_dir(home) / "phones" / phone["udid"] / "apps" / phone["bundle"]
    return LabDevice(name=phone["name"], uri=_uri(home, phone), platform="ios", group=GROUP,
                     agent_root=AGENT_ROOT, agent_cmd=list(AGENT_CMD),
                     extra={"udid": phone["udid"], "bundle": phone["bundle"],
                            "usbmux_socket": str(socket_path(home)),
                            "container": str(container)})


# -- daemon control ----------------------------------------------------------------------
def _daemon_pid(home: FleetHome) -> int | None:
    try:
        pid = int(_pidfile(home).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"fleet.lab.ios" in cmdline else None


def _socket_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


def _start_daemon(home: FleetHome) -> None:
    if _daemon_pid(home) is not None:
        return
    sock = socket_path(home)
    log = open(ios_dir(home) / "usbmuxd.log", "ab")  # noqa: SIM115 - handed to the child
    with log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fleet.lab.ios", "serve", str(home.path)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    _pidfile(home).write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (ios_dir(home) / "usbmuxd.log").read_text(errors="replace")[-2000:]
            raise errors.LabError(f"emulated usbmuxd exited with {proc.returncode}: {tail}",
                                  socket=str(sock))
        if sock.exists() and _socket_answers(sock):
            return
        time.sleep(0.05)
    raise errors.LabError(f"emulated usbmuxd did not answer on {sock} within "
                          f"{_START_TIMEOUT_S:.0f}s", socket=str(sock))


def up(home: FleetHome, count: int, *, start_index: int = 0,
       bundle: str = DEFAULT_BUNDLE) -> list[LabDevice]:
    """Make (or keep) phones ``iphone-<start_index>`` ... and serve them."""
    if count < 0:
        raise errors.UsageError("phone count must be >= 0", count=count)
    ios_dir(home).mkdir(parents=True, exist_ok=True, mode=0o700)
    state = load_state(home, KIND) or {"buid": secrets.token_hex(16).upper(), "phones": []}
    state["socket"] = str(socket_path(home))
    host = _host(home, state)
    by_index = {p["index"]: p for p in state["phones"]}
    next_id = max((p["device_id"] for p in state["phones"]), default=0) + 1
    wanted = []
    for index in range(start_index, start_index + count):
        phone = by_index.get(index)
        if phone is None:
            phone = _make_phone(home, host, index, next_id, bundle)
            next_id += 1
            state["phones"].append(phone)
        wanted.append(phone)
    save_state(home, KIND, state)
    _start_daemon(home)
    _wait_applied(home)
    return [_lab_device(home, p) for p in wanted]


def _stop_daemon(home: FleetHome) -> bool:
    pid = _daemon_pid(home)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    break
            time.sleep(0.05)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    _pidfile(home).unlink(missing_ok=True)
    with contextlib.suppress(FileNotFoundError):
        socket_path(home).unlink()
    return pid is not None


def restart_usbmuxd(home: FleetHome) -> None:
    """Fault injection: usbmuxd restarts (every open connection to a phone drops)."""
    _stop_daemon(home)
    _start_daemon(home)
    _wait_applied(home)


def down(home: FleetHome) -> list[str]:
    """Stop the daemon and remove every phone the lab made (keys, pair records,
    containers); returns their names."""
    state = load_state(home, KIND)
    _stop_daemon(home)
    shutil.rmtree(ios_dir(home), ignore_errors=True)
    save_state(home, KIND, {})
    return [p["name"] for p in state.get("phones", [])]


def status(home: FleetHome) -> list[dict[str, Any]]:
    state = load_state(home, KIND)
    running = _daemon_pid(home) is not None
    rows = []
    for p in state.get("phones", []):
        faults = {} if p["app"] == "ok" else {"app": p["app"]}
        record = ios_dir(home) / "pair_records" / f"{p['udid']}.plist.orig"
        if record.exists():
            faults["pair_record"] = "foreign"
        rows.append({"name": p["name"], "platform": "ios", "udid": p["udid"],
                     "uri": _uri(home, p), "bundle": p["bundle"], "app": p["app"],
                     "running": running, "state": "running" if running else "stopped",
                     "faults": faults, "socket": str(socket_path(home))})
    return rows


def _wait_applied(home: FleetHome, timeout: float = 10.0) -> None:
    """Return once the running daemon has loaded the current state file."""
    if _daemon_pid(home) is None:
        return
    state_file = home.lab_dir / f"{KIND}.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if int((ios_dir(home) / "applied").read_text()) == state_file.stat().st_mtime_ns:
                return
        time.sleep(0.02)
    raise errors.LabError(f"the iOS lab daemon did not load {state_file} within {timeout}s")


def set_app(home: FleetHome, name: str, mode: str) -> None:
    """Fault injection: ``ok``, ``mute`` (the app never answers its mailbox), ``slow``
    (it takes requests at once, answers seconds later) or ``missing`` (the app is not
    installed: house_arrest says ApplicationLookupFailed)."""
    if mode not in ("ok", "mute", "slow", "missing"):
        raise errors.UsageError(f"unknown app mode {mode!r}", mode=mode)
    state = load_state(home, KIND)
    for phone in state.get("phones", []):
        if name in (phone["name"], phone["udid"]):
            phone["app"] = mode
            save_state(home, KIND, state)
            _wait_applied(home)
            return
    raise errors.NotFoundError(f"no lab iPhone named {name!r}", name=name)


def make_foreign_pair_record(home: FleetHome, name: str, *, same_host_id: bool) -> None:
    """Fault injection: replace the host's pair record for one phone with one from another
    host. ``same_host_id`` keeps the HostID the phone trusts but changes every certificate
    (the TLS handshake is refused); otherwise StartSession says InvalidHostID."""
    state = load_state(home, KIND)
    phone = next((p for p in state.get("phones", []) if name in (p["name"], p["udid"])), None)
    if phone is None:
        raise errors.NotFoundError(f"no lab iPhone named {name!r}", name=name)
    mine = _host(home, state)
    other = make_host_identity(state["buid"], mine.host_id if same_host_id else None)
    record, _ = make_pair_record(other, make_device_key())
    path = ios_dir(home) / "pair_records" / f"{phone['udid']}.plist"
    backup = path.with_name(path.name + ".orig")
    if not backup.exists():
        _write_private(backup, path.read_bytes())
    _write_private(path, plistlib.dumps(record))


def heal(home: FleetHome, name: str) -> None:
    """Undo every fault on one phone: app installed and answering, own pair record back."""
    set_app(home, name, "ok")
    state = load_state(home, KIND)
    phone = next(p for p in state["phones"] if name in (p["name"], p["udid"]))
    path = ios_dir(home) / "pair_records" / f"{phone['udid']}.plist"
    backup = path.with_name(path.name + ".orig")
    if backup.exists():
        os.replace(backup, path)


# -- the daemon ----------------------------------------------------------------------------
def _serve(home_path: str) -> int:
    from fleet.lab.ios_phone import LabPhoneTable
    from fleet.lab.usbmux import UsbmuxServer

    home = FleetHome.from_env(home_path)
    table = LabPhoneTable(home.lab_dir / f"{KIND}.json", ios_dir(home))
    server = UsbmuxServer(socket_path(home), table)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server.start()
    print(f"usbmuxd: serving {len(table.phones())} phone(s) on {server.path}", flush=True)
    while not stop.wait(0.3):
        table.refresh()
    server.stop()
    table.stop()
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        sys.exit(_serve(sys.argv[2]))
    print("usage: python -m fleet.lab.ios serve FLEET_HOME", file=sys.stderr)
    sys.exit(2)
