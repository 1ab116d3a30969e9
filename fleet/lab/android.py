"""``fleet lab up --android N``: emulated phones behind Debian's real ``adb`` server.

What ``up`` makes, under ``home.lab_dir / "android"``::

    phones/<name>/     one sandbox per phone (see fleet.lab.android_sandbox for its layout)
    daemon.pid, daemon.log, control.sock   the background process serving every phone
    adb-home/.android/adbkey{,.pub}        the lab adb server's own RSA key pair

and the lab's own adb server on port 15037 (never the user's 5037; ``FLEET_LAB_ADB_PORT``
or ``adb_port=`` picks another; a free port when another home's lab holds 15037), started
with ``HOME=adb-home`` and connected to each phone
with ``adb connect 127.0.0.1:PORT``. The first connection goes through the real
authorization dance: the server offers its public key and the phone "taps Allow" (the key
lands in the phone's ``/data/misc/adb/adb_keys``); later connections authenticate by
signature. Registry URIs are ``adb://127.0.0.1:PORT?adb_port=15037``.

Each phone runs the shell agent from ``/data/local/tmp/fleet`` with this machine's
``fleet-agent`` (visible read-only inside the phone's namespace), and has the emulated app
``org.mnn.fleet`` installed for the app-agent (mailbox) mode. Faults for tests and demos:
:func:`set_online`, :func:`drop_after`, :func:`set_auth`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fleet.core import errors
from fleet.home import FleetHome
from fleet.lab.android_sandbox import write_layout
from fleet.lab.base import LabDevice, lab_tag, load_state, save_state, shared_agent_cmd

__all__ = ["AGENT_ROOT", "APP_PACKAGE", "DEFAULT_ADB_PORT", "GROUP", "adb", "adb_env",
           "control", "down", "drop_after", "heal", "reconnect", "server_port", "set_auth",
           "set_online", "status", "up"]

KIND = "android"
GROUP = "lab-android"
DEFAULT_ADB_PORT = 15037
AGENT_ROOT = "/data/local/tmp/fleet"
APP_PACKAGE = "org.mnn.fleet"


def _dir(home: FleetHome) -> Path:
    return home.lab_dir / KIND


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _pick_server_port() -> int:
    """``$FLEET_LAB_ADB_PORT``, else 15037 when nothing listens there, else a free port:
    another home's lab server on 15037 is never shared (its ``down`` would kill it)."""
    if os.environ.get("FLEET_LAB_ADB_PORT"):
        return int(os.environ["FLEET_LAB_ADB_PORT"])
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", DEFAULT_ADB_PORT))
            return DEFAULT_ADB_PORT
        except OSError:
            return _free_port()


def server_port(home: FleetHome) -> int:
    """The lab adb server's port for this home."""
    state = load_state(home, KIND)
    return int(state.get("adb_port") or os.environ.get("FLEET_LAB_ADB_PORT")
               or DEFAULT_ADB_PORT)


def adb_env(home: FleetHome) -> dict[str, str]:
    """The environment for the lab's adb: its own key (``HOME``) and log folder."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("ANDROID_SDK_HOME", "ANDROID_USER_HOME", "ADB_VENDOR_KEYS",
                        "ANDROID_SERIAL", "ANDROID_ADB_SERVER_PORT")}
    adb_home = _dir(home) / "adb-home"
    adb_home.mkdir(parents=True, exist_ok=True, mode=0o700)
    env["HOME"] = str(adb_home)
    env["TMPDIR"] = str(_dir(home))  # the server's log: <lab>/android/adb.<uid>.log
    return env


def adb(home: FleetHome, *args: str, timeout: float = 20.0, check: bool = True
        ) -> subprocess.CompletedProcess[str]:
    """Run Debian's ``adb`` against the lab's server (``-P PORT``, the lab's key)."""
    exe = shutil.which("adb")
    if exe is None:
        raise errors.LabError("adb not found: install Debian's adb package (Makefile)")
    argv = [exe, "-P", str(server_port(home)), *args]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              env=adb_env(home), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise errors.LabError(f"{' '.join(argv)} timed out after {timeout}s",
                              argv=argv) from exc
    if check and proc.returncode != 0:
        raise errors.LabError(f"{' '.join(argv)} failed: {proc.stderr.strip() or proc.stdout}",
                              argv=argv, exit_code=proc.returncode)
    return proc


def _adb_states(home: FleetHome) -> dict[str, str]:
    proc = adb(home, "devices", check=False)
    states = {}
    for line in proc.stdout.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2:
            states[parts[0]] = parts[1]
    return states


# -- the daemon ---------------------------------------------------------------------------
def control(home: FleetHome, op: str, **fields: Any) -> dict[str, Any]:
    """Send one order to the lab daemon and return its answer (LabError when it fails)."""
    sock_path = _dir(home) / "control.sock"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(sock_path))
            s.sendall(json.dumps({"op": op, **fields}).encode() + b"\n")
            with s.makefile("rb") as f:
                reply: dict[str, Any] = json.loads(f.readline() or b"{}")
    except (OSError, ValueError) as exc:
        raise errors.LabError(f"android lab daemon not reachable at {sock_path}: {exc}",
                              op=op) from exc
    if not reply.get("ok"):
        raise errors.LabError(f"android lab: {op} failed: {reply.get('error')}", op=op)
    return reply


def _daemon_alive(home: FleetHome) -> bool:
    try:
        control(home, "ping")
        return True
    except errors.LabError:
        return False


def _start_daemon(home: FleetHome) -> None:
    d = _dir(home)
    log = open(d / "daemon.log", "ab")  # noqa: SIM115 - handed to the child
    with log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fleet.lab.android_daemon", "--state",
             str(home.lab_dir / f"{KIND}.json"), "--control", str(d / "control.sock")],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    (d / "daemon.pid").write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise errors.LabError(f"android lab daemon exited ({proc.returncode}); "
                                  f"see {d / 'daemon.log'}")
        if _daemon_alive(home):
            return
        time.sleep(0.05)
    raise errors.LabError(f"android lab daemon did not answer; see {d / 'daemon.log'}")


def _stop_daemon(home: FleetHome) -> None:
    pid_file = _dir(home) / "daemon.pid"
    with contextlib.suppress(errors.LabError):
        control(home, "stop")
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap it when this process started it
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)


# -- phones -------------------------------------------------------------------------------
def _phone_config(home: FleetHome, index: int) -> tuple[str, dict[str, Any]]:
    name = f"android-{index}"
    serial = f"FLAB{lab_tag(home).upper()}{index:03d}"
    model = f"Lab Phone {index}"
    props = {
        "ro.product.model": model, "ro.product.name": "fleetlab_x86_64",
        "ro.product.device": "fleetlab", "ro.product.brand": "fleetlab",
        "ro.product.manufacturer": "mnn-fleet lab", "ro.serialno": serial,
        "ro.build.version.sdk": "34", "ro.build.version.release": "14",
        # the phone runs this host's binaries, so it states the host's ABI honestly
        "ro.product.cpu.abi": "x86_64", "ro.product.cpu.abilist": "x86_64",
        "ro.hardware": "fleetlab", "ro.board.platform": "fleetlab",
        "ro.fleet.lab": "1", "ro.adb.secure": "1", "sys.boot_completed": "1",
    }
    sandbox = _dir(home) / "phones" / name
    return name, {"port": _free_port(), "sandbox": str(sandbox), "serial": serial,
                  "model": model, "product": "fleetlab_x86_64", "device": "fleetlab",
                  "auth": "allow", "props": props, "index": index}


def _lab_device(home: FleetHome, name: str, data: dict[str, Any]) -> LabDevice:
    port = server_port(home)
    serial = f"127.0.0.1:{data['port']}"
    return LabDevice(name=name, uri=f"adb://{serial}?adb_port={port}", platform="android",
                     group=GROUP, agent_root=AGENT_ROOT, agent_cmd=shared_agent_cmd(),
                     extra={"serial": serial, "adb_port": port, "sandbox": data["sandbox"],
                            "model": data["model"], "app_package": APP_PACKAGE,
                            "app_uri": f"adb://{serial}?adb_port={port}&mode=app"
                                       f"&package={APP_PACKAGE}"})


def _wait_device(home: FleetHome, serial: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    state = "absent"
    while time.monotonic() < deadline:
        state = _adb_states(home).get(serial, "absent")
        if state == "device":
            return
        if state == "absent":
            adb(home, "connect", serial, check=False)
        time.sleep(0.1)
    raise errors.LabError(f"phone {serial} did not come up in adb (state: {state})",
                          serial=serial, state=state)


def reconnect(home: FleetHome, name: str, *, wait: bool = True) -> None:
    """``adb connect`` one phone again (after :func:`set_online` brought it back)."""
    data = load_state(home, KIND)["phones"][name]
    serial = f"127.0.0.1:{data['port']}"
    adb(home, "disconnect", serial, check=False)
    adb(home, "connect", serial, check=False)
    if wait:
        _wait_device(home, serial)


def up(home: FleetHome, count: int, *, start_index: int = 0, adb_port: int | None = None
       ) -> list[LabDevice]:
    """Start ``count`` phones (``android-<start_index>`` ...) and connect the lab adb
    server to them; phones that already run are kept and returned as they are."""
    for tool in ("adb", "bwrap"):
        if shutil.which(tool) is None:
            raise errors.LabError(f"{tool} not found: the Android lab needs Debian's adb and "
                                  f"bubblewrap packages (see APT_PACKAGES in the Makefile)")
    _dir(home).mkdir(parents=True, exist_ok=True, mode=0o700)
    state = load_state(home, KIND)
    if "adb_port" not in state:
        state["adb_port"] = adb_port or _pick_server_port()
    phones: dict[str, Any] = state.setdefault("phones", {})
    wanted = []
    for index in range(start_index, start_index + count):
        name, data = _phone_config(home, index)
        data = phones.setdefault(name, data)
        write_layout(Path(data["sandbox"]), data["props"], (APP_PACKAGE,))
        wanted.append(name)
    save_state(home, KIND, state)
    # fleet.connect.transport_options reads this: the lab's server for every adb device
    (_dir(home) / "adb_port").write_text(f"{state['adb_port']}\n")
    if _daemon_alive(home):
        for name in wanted:
            control(home, "add", name=name, config=phones[name])
    else:
        _start_daemon(home)
    adb(home, "start-server", timeout=30)
    for name in wanted:
        _wait_device(home, f"127.0.0.1:{phones[name]['port']}")
    return [_lab_device(home, name, phones[name]) for name in wanted]


def down(home: FleetHome) -> list[str]:
    """Stop every phone and the lab adb server; sandboxes are deleted."""
    state = load_state(home, KIND)
    names = sorted(state.get("phones", {}))
    if shutil.which("adb") and state:
        for data in state.get("phones", {}).values():
            adb(home, "disconnect", f"127.0.0.1:{data['port']}", check=False)
        adb(home, "kill-server", check=False)
    _stop_daemon(home)
    for name in names:
        sandbox = Path(state["phones"][name]["sandbox"])
        if _dir(home) in sandbox.parents:
            shutil.rmtree(sandbox, ignore_errors=True)
    save_state(home, KIND, {})
    (_dir(home) / "adb_port").unlink(missing_ok=True)
    return names


def status(home: FleetHome) -> list[dict[str, Any]]:
    state = load_state(home, KIND)
    phones = state.get("phones", {})
    if not phones:
        return []
    try:
        live = {p["name"]: p for p in control(home, "status")["phones"]}
    except errors.LabError:
        live = {}
    states = _adb_states(home) if live and shutil.which("adb") else {}
    out = []
    for name, data in sorted(phones.items()):
        serial = f"127.0.0.1:{data['port']}"
        info = live.get(name, {})
        faults: dict[str, Any] = {}
        if info and not info.get("online"):
            faults["network"] = "down"
        if info.get("auth") not in (None, "allow"):
            faults["auth"] = info["auth"]
        if info.get("drop_after") is not None:
            faults["drop_after"] = info["drop_after"]
        out.append({"name": name, "platform": "android", "serial": serial,
                    "address": serial, "uri": _lab_device(home, name, data).uri,
                    "model": data["model"], "running": bool(info.get("online")),
                    "link": "up" if info.get("online") else "down",
                    "auth": info.get("auth"), "adb_state": states.get(serial, "absent"),
                    "state": f"adb:{states.get(serial, 'absent')}", "faults": faults,
                    "sandbox": data["sandbox"]})
    return out


# -- faults -------------------------------------------------------------------------------
def set_online(home: FleetHome, name: str, online: bool) -> None:
    """Offline: the phone stops listening and drops its connections (a phone off Wi-Fi)."""
    control(home, "online" if online else "offline", name=name)


def drop_after(home: FleetHome, name: str, nbytes: int | None) -> None:
    """The phone goes offline once ``nbytes`` more bytes were pushed to it."""
    control(home, "drop_after", name=name, bytes=nbytes)


def heal(home: FleetHome, name: str) -> None:
    """Undo every fault on one phone (online, no pending drop, ``allow``) and reconnect."""
    control(home, "drop_after", name=name, bytes=None)
    control(home, "auth", name=name, mode="allow")
    control(home, "online", name=name)
    reconnect(home, name)


def set_auth(home: FleetHome, name: str, mode: str) -> None:
    """``allow`` (tap Allow), ``unauthorized`` (authorizations revoked, the prompt never
    answered; current connections drop, so the server meets the new mode) or ``off``."""
    if not re.fullmatch(r"allow|unauthorized|off", mode):
        raise errors.UsageError(f"auth mode must be allow, unauthorized or off, not {mode!r}")
    control(home, "auth", name=name, mode=mode)
