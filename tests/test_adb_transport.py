"""AdbTransport (adbutils) against emulated phones through Debian's real adb server.

Faults are caused for real: the lab daemon cuts a phone's connections after N pushed bytes
(a phone leaving Wi-Fi mid-push), revokes authorizations (unauthorized phone), force-stops
the app (mailbox never answered). Nothing is mocked.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from fleet.core import errors
from fleet.lab import android
from fleet.transports import TransportOptions, open_transport
from fleet.transports.adb import AdbTransport
from tests.android_fixtures import AndroidLab, android_home, android_lab, free_port

_FIXTURES = (android_home, android_lab)  # pytest finds fixtures among module attributes


def _agent_argv(t: AdbTransport, agent_cmd: list[str], verb: str) -> list[str]:
    return [*agent_cmd, "--root", t.agent_root(), verb]


def test_open_transport_parses_mode_package_and_server_port(android_lab: AndroidLab) -> None:
    dev = android_lab.phones(1)[0]
    t = open_transport(dev.extra["app_uri"])
    assert isinstance(t, AdbTransport)
    assert (t.mode, t.package, t.server_port) == ("app", android.APP_PACKAGE,
                                                  android_lab.adb_port)
    assert t.agent_root() == f"/sdcard/Android/data/{android.APP_PACKAGE}/files/fleet/agent"
    with pytest.raises(errors.MalformedUriError):
        AdbTransport("adb://127.0.0.1:5555?mode=app")  # app mode without a package
    with pytest.raises(errors.MalformedUriError):
        AdbTransport("adb://127.0.0.1:5555?mode=root")


def test_run_reports_exit_code_stdout_stderr_and_takes_stdin(android_lab: AndroidLab) -> None:
    t = android_lab.transport(android_lab.phones(1)[0])
    assert "shell_v2" in t.features()
    res = t.run(["sh", "-c", "echo out; echo err >&2; exit 7"], timeout=30)
    assert (res.exit_code, res.stdout, res.stderr) == (7, b"out\n", b"err\n")
    data = os.urandom(200_000)  # several shell v2 stdin packets
    piped = t.run(["sha256sum"], timeout=30, stdin=data)
    assert piped.ok and piped.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    quoted = t.run(["echo", "it's a $HOME; `x`"], timeout=30)  # argv survives the shell
    assert quoted.stdout == b"it's a $HOME; `x`\n"


def test_shell_v1_fallback_keeps_exit_codes_and_stdin(android_lab: AndroidLab) -> None:
    t = android_lab.transport(android_lab.phones(1)[0])
    t._features = {"stat_v2"}  # as an old phone without shell_v2 would report
    res = t.run(["sh", "-c", "cat; exit 3"], timeout=30, stdin=b"via a temp file")
    assert res.exit_code == 3 and res.stdout == b"via a temp file"
    assert t.run(["ls", "/data/local/tmp"], timeout=30).stdout.count(b".fleet-stdin") == 0


def test_run_deadline_raises_transport_timeout(android_lab: AndroidLab) -> None:
    t = android_lab.transport(android_lab.phones(1)[0])
    with pytest.raises(errors.TransportTimeout):
        t.run(["sleep", "5"], timeout=0.5)


def test_properties_from_getprop(android_lab: AndroidLab) -> None:
    t = android_lab.transport(android_lab.phones(2)[1])
    props = t.properties()
    assert props["ro.product.model"] == "Lab Phone 1"
    assert props["ro.build.version.sdk"] == "34"
    assert t.getprop("ro.product.cpu.abi") == "x86_64"


def test_push_few_mib_is_verified_and_a_repeat_is_skipped(android_lab: AndroidLab,
                                                          tmp_path: Path) -> None:
    dev = android_lab.phones(1)[0]
    t = android_lab.transport(dev)
    src = tmp_path / "model.fpkg"
    src.write_bytes(os.urandom((4 << 20) + 777))
    seen: list[tuple[int, int]] = []
    res = t.push(src, "/data/local/tmp/fleet/incoming/model.fpkg",
                 progress=lambda done, total: seen.append((done, total)))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    assert (res.size, res.bytes_sent, res.sha256) == (src.stat().st_size, src.stat().st_size,
                                                     digest)
    assert seen[-1] == (res.size, res.size)
    on_phone = android_lab.sandbox(dev) / "data/local/tmp/fleet/incoming/model.fpkg"
    assert hashlib.sha256(on_phone.read_bytes()).hexdigest() == digest
    again = t.push(src, "/data/local/tmp/fleet/incoming/model.fpkg")
    assert again.bytes_sent == 0 and again.resumed_from == res.size
    forced = t.push(src, "/data/local/tmp/fleet/incoming/model.fpkg", resume=False)
    assert forced.bytes_sent == res.size


def test_push_into_a_folder_and_pull_back(android_lab: AndroidLab, tmp_path: Path) -> None:
    t = android_lab.transport(android_lab.phones(1)[0])
    src = tmp_path / "weights.bin"
    src.write_bytes(os.urandom(100_000))
    t.run(["mkdir", "-p", "/sdcard/models"], timeout=30)
    res = t.push(src, "/sdcard/models/")
    assert res.remote == "/sdcard/models/weights.bin"
    back = t.pull("/storage/emulated/0/models/weights.bin", tmp_path / "back" / "w.bin")
    assert (tmp_path / "back" / "w.bin").read_bytes() == src.read_bytes()
    assert back.sha256 == res.sha256
    with pytest.raises(errors.RemoteFileError):
        t.pull("/sdcard/models/missing.bin", tmp_path / "nothing.bin")
    assert not (tmp_path / "nothing.bin").exists()


def test_stat_file_folder_and_missing(android_lab: AndroidLab) -> None:
    t = android_lab.transport(android_lab.phones(1)[0])
    t.run(["sh", "-c", "printf 12345 > /data/local/tmp/five"], timeout=30)
    st = t.stat("/data/local/tmp/five")
    assert st is not None and st.size == 5 and not st.is_dir
    folder = t.stat("/data/local/tmp")
    assert folder is not None and folder.is_dir
    assert t.stat("/data/local/tmp/does-not-exist") is None


def test_push_to_read_only_path_is_a_remote_file_error(android_lab: AndroidLab,
                                                       tmp_path: Path) -> None:
    t = android_lab.transport(android_lab.phones(1)[0])
    src = tmp_path / "f"
    src.write_bytes(b"data")
    with pytest.raises(errors.RemoteFileError, match="permission denied"):
        t.push(src, "/system/bin/f")


def test_shell_agent_answers_through_adb_shell(android_lab: AndroidLab) -> None:
    dev = android_lab.phones(1)[0]
    t = android_lab.transport(dev)
    res = t.run(_agent_argv(t, dev.agent_cmd, "status"), timeout=60)
    doc = json.loads(res.stdout)
    assert res.ok and doc["ok"] and doc["root"] == "/data/local/tmp/fleet"
    assert doc["schema"] == "fleet.agent/1"


def test_app_agent_answers_through_the_mailbox(android_lab: AndroidLab) -> None:
    dev = android_lab.phones(1)[0]
    t = android_lab.app_transport(dev)
    res = t.run(_agent_argv(t, t.agent_cmd(), "status"), timeout=60)
    doc = json.loads(res.stdout)
    assert doc["ok"] and doc["root"] == t.agent_root()
    box = android_lab.sandbox(dev) / f"sdcard/Android/data/{android.APP_PACKAGE}/files/fleet"
    assert list((box / "inbox").iterdir()) == [] and list((box / "outbox").iterdir()) == []
    # an agent path from the registry still means the app's agent, not a shell command
    via_path = t.run([*dev.agent_cmd, "--root", t.agent_root(), "status"], timeout=60)
    assert json.loads(via_path.stdout)["root"] == t.agent_root()
    # commands that are not the agent still run through adb shell in app mode
    assert t.run(["getprop", "ro.fleet.lab"], timeout=30).stdout == b"1\n"


def test_stopped_app_leaves_the_request_pending_and_withdrawn(android_lab: AndroidLab) -> None:
    dev = android_lab.phones(1)[0]
    t = android_lab.app_transport(dev)
    t.run(["am", "force-stop", android.APP_PACKAGE], timeout=30)
    try:
        with pytest.raises(errors.MailboxPendingError) as caught:
            t.run(_agent_argv(t, t.agent_cmd(), "status"), timeout=1.5)
        assert caught.value.details["picked_up"] is False
        inbox = (android_lab.sandbox(dev)
                 / f"sdcard/Android/data/{android.APP_PACKAGE}/files/fleet/inbox")
        assert list(inbox.iterdir()) == []  # withdrawn: it will not run later
    finally:
        t.run(["am", "start", "-n", f"{android.APP_PACKAGE}/.MainActivity"], timeout=30)
    assert t.run(_agent_argv(t, t.agent_cmd(), "status"), timeout=60).ok


def test_app_not_installed(android_lab: AndroidLab) -> None:
    dev = android_lab.phones(1)[0]
    uri = f"adb://{dev.extra['serial']}?mode=app&package=com.example.absent"
    t = android_lab.transport(dev, uri=uri)
    with pytest.raises(errors.AppNotInstalledError, match=r"com\.example\.absent"):
        t.run(["fleet-agent", "status"], timeout=10)


def test_phone_offline_mid_push_then_retry_completes(android_lab: AndroidLab,
                                                     tmp_path: Path) -> None:
    dev = android_lab.phones(2)[1]
    t = android_lab.transport(dev, connect_timeout=2.0)
    src = tmp_path / "big.fpkg"
    src.write_bytes(os.urandom(6 << 20))
    remote = "/data/local/tmp/fleet/incoming/big.fpkg"
    on_phone = android_lab.sandbox(dev) / remote.lstrip("/")
    try:
        android.drop_after(android_lab.home, dev.name, 2 << 20)
        with pytest.raises((errors.ConnectionLostError, errors.DeviceOfflineError)) as caught:
            t.push(src, remote)
        assert caught.value.retryable
        assert not on_phone.exists()  # the phone removed the partial file, as adbd does
        with pytest.raises(errors.DeviceOfflineError):  # still away: a clear, fast error
            t.run(["true"], timeout=10)
    finally:
        android.set_online(android_lab.home, dev.name, True)
        android.drop_after(android_lab.home, dev.name, None)
    # back on the network: the transport reconnects it (adb disconnect + connect) itself
    retry = android_lab.transport(dev, connect_timeout=20.0).push(src, remote)
    assert retry.bytes_sent == src.stat().st_size
    assert hashlib.sha256(on_phone.read_bytes()).hexdigest() == retry.sha256


def test_unauthorized_phone_is_an_auth_error(android_lab: AndroidLab) -> None:
    dev = android_lab.phones(3)[2]
    t = android_lab.transport(dev, connect_timeout=3.0)
    try:
        android.set_auth(android_lab.home, dev.name, "unauthorized")
        android.reconnect(android_lab.home, dev.name, wait=False)
        with pytest.raises(errors.AuthError, match="authorized"):
            t.run(["true"], timeout=10)
    finally:
        android_lab.heal(dev.name)
    assert t.run(["true"], timeout=10).ok


def test_no_adb_server_is_a_connect_error() -> None:
    t = AdbTransport(f"adb://127.0.0.1:5555?adb_port={free_port()}",
                     TransportOptions(connect_timeout=1.0))
    with pytest.raises(errors.ConnectError, match="start-server"):
        t.run(["true"], timeout=5)


def test_unknown_phone_is_offline(android_lab: AndroidLab) -> None:
    android_lab.phones(1)
    t = AdbTransport(f"adb://127.0.0.1:{free_port()}",
                     TransportOptions(adb_port=android_lab.adb_port, connect_timeout=1.0))
    with pytest.raises(errors.DeviceOfflineError):
        t.stat("/data/local/tmp")
    usb = AdbTransport("adb://R58M12345XYZ",
                       TransportOptions(adb_port=android_lab.adb_port, connect_timeout=1.0))
    with pytest.raises(errors.DeviceOfflineError, match="not connected"):
        usb.run(["true"], timeout=5)


def test_fleet_probe_runs_on_the_phone_without_python(android_lab: AndroidLab) -> None:
    t = android_lab.transport(android_lab.phones(1)[0])
    doc = t.run_probe()
    assert doc["schema"] == "fleet.probe/1"
    # it ran inside the phone: it read the phone's property table, not the host's
    assert doc["os"]["name"] == "android"
    assert doc["os"]["android"]["model"] == "Lab Phone 0"
    assert t.stat("/data/local/tmp/fleet-probe") is not None
