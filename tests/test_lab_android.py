"""The Android lab against an independent client: Debian's ``adb`` command line.

Every assertion here is about what the real adb server and client see of the emulated
phones (handshake and banner, sync push/pull, shell v2 exit codes, authorization), so the
emulation is checked against the reference implementation of the host side, not against
our own transport.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

from fleet.lab import android
from tests.android_fixtures import AndroidLab, android_home, android_lab

_FIXTURES = (android_home, android_lab)  # pytest finds fixtures among module attributes


def test_adb_devices_lists_every_phone_with_its_model(android_lab: AndroidLab) -> None:
    phones = android_lab.phones(3)
    out = android_lab.adb("devices", "-l").stdout.decode()
    for index, dev in enumerate(phones):
        line = next((ln for ln in out.splitlines() if ln.startswith(dev.extra["serial"])), "")
        assert re.search(r"\sdevice\s", line), out
        assert f"model:Lab_Phone_{index}" in line  # adb sanitizes the banner's spaces
        assert "product:fleetlab_x86_64" in line and "device:fleetlab" in line


def test_adb_push_pull_round_trip_gives_identical_bytes(android_lab: AndroidLab,
                                                        tmp_path: Path) -> None:
    dev = android_lab.phones(1)[0]
    data = os.urandom(3 * 65536 + 12345)  # not a multiple of the 64 KiB sync block
    src, back = tmp_path / "src.bin", tmp_path / "back.bin"
    src.write_bytes(data)
    serial = dev.extra["serial"]
    push = android_lab.adb("-s", serial, "push", str(src), "/data/local/tmp/rt/src.bin")
    assert push.returncode == 0, push.stderr
    pull = android_lab.adb("-s", serial, "pull", "/data/local/tmp/rt/src.bin", str(back))
    assert pull.returncode == 0, pull.stderr
    assert back.read_bytes() == data
    # the bytes landed in the phone's sandbox, not on the host's /data
    assert (android_lab.sandbox(dev) / "data/local/tmp/rt/src.bin").read_bytes() == data
    assert not Path("/data/local/tmp/rt/src.bin").exists()


def test_adb_push_outside_writable_storage_is_refused(android_lab: AndroidLab,
                                                      tmp_path: Path) -> None:
    dev = android_lab.phones(1)[0]
    src = tmp_path / "x"
    src.write_bytes(b"x")
    res = android_lab.adb("-s", dev.extra["serial"], "push", str(src), "/system/x")
    assert res.returncode != 0
    assert b"Read-only file system or permission denied" in res.stderr + res.stdout


def test_adb_shell_echo_exit_code_and_stderr(android_lab: AndroidLab) -> None:
    serial = android_lab.phones(1)[0].extra["serial"]
    echo = android_lab.adb("-s", serial, "shell", "echo", "hello from the phone")
    assert echo.returncode == 0 and echo.stdout == b"hello from the phone\n"
    fail = android_lab.adb("-s", serial, "shell", "echo oops >&2; exit 42")
    assert fail.returncode == 42
    assert fail.stderr == b"oops\n" and fail.stdout == b""


def test_shell_sees_the_phone_layout_and_properties(android_lab: AndroidLab) -> None:
    dev = android_lab.phones(2)[1]
    serial = dev.extra["serial"]
    model = android_lab.adb("-s", serial, "shell", "getprop", "ro.product.model")
    assert model.stdout.decode().strip() == "Lab Phone 1"
    # /sdcard and /storage/emulated/0 are the same folder, the phone's own
    android_lab.adb("-s", serial, "shell", "echo hi > /storage/emulated/0/Download/note")
    assert (android_lab.sandbox(dev) / "sdcard/Download/note").read_text() == "hi\n"
    listing = android_lab.adb("-s", serial, "shell", "ls", "/data/data").stdout.decode()
    assert android.APP_PACKAGE in listing.split()


def test_reconnect_authenticates_by_signature_with_the_key_the_phone_stored(
        android_lab: AndroidLab) -> None:
    dev = android_lab.phones(1)[0]
    keys_dir = android_lab.sandbox(dev) / "data/misc/adb"
    server_key = (Path(android.adb_env(android_lab.home)["HOME"]) / ".android/adbkey.pub")
    stored = (keys_dir / "adb_keys").read_text().split()
    assert stored[0] == server_key.read_text().split()[0]
    offered_before = (keys_dir / "offered_keys").read_text().count("\n")
    android.reconnect(android_lab.home, dev.name)
    res = android_lab.adb("-s", dev.extra["serial"], "shell", "true")
    assert res.returncode == 0
    # no new RSAPUBLICKEY step: the signature over the phone's token was accepted
    assert (keys_dir / "offered_keys").read_text().count("\n") == offered_before


def test_unauthorized_phone_shows_as_unauthorized_in_adb(android_lab: AndroidLab) -> None:
    dev = android_lab.phones(3)[2]
    try:
        android.set_auth(android_lab.home, dev.name, "unauthorized")
        android_lab.adb("disconnect", dev.extra["serial"])
        android_lab.adb("connect", dev.extra["serial"])
        res = android_lab.adb("-s", dev.extra["serial"], "shell", "true")
        assert res.returncode != 0
        assert b"unauthorized" in res.stderr
        # the phone recorded the key it was offered, but did not accept it
        keys_dir = android_lab.sandbox(dev) / "data/misc/adb"
        assert not (keys_dir / "adb_keys").exists()
        assert (keys_dir / "offered_keys").read_text().strip()
    finally:
        android_lab.heal(dev.name)
    assert android_lab.adb("-s", dev.extra["serial"], "shell", "true").returncode == 0


def test_status_and_the_adb_port_file_the_controller_reads(android_lab: AndroidLab) -> None:
    phones = android_lab.phones(3)
    rows = {r["name"]: r for r in android.status(android_lab.home)}
    for dev in phones:
        assert rows[dev.name]["running"] is True
        assert rows[dev.name]["adb_state"] == "device"
        assert rows[dev.name]["uri"] == dev.uri
    port_file = android_lab.home.lab_dir / "android" / "adb_port"
    assert int(port_file.read_text()) == android_lab.adb_port


def test_large_push_checksum_matches_on_both_sides(android_lab: AndroidLab,
                                                   tmp_path: Path) -> None:
    dev = android_lab.phones(1)[0]
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(3 << 20))
    serial = dev.extra["serial"]
    assert android_lab.adb("-s", serial, "push", str(src), "/sdcard/big.bin").returncode == 0
    out = android_lab.adb("-s", serial, "shell", "sha256sum", "/sdcard/big.bin").stdout
    assert out.split()[0].decode() == hashlib.sha256(src.read_bytes()).hexdigest()


def test_adb_exec_out_and_shell_stdin(android_lab: AndroidLab, tmp_path: Path) -> None:
    serial = android_lab.phones(1)[0].extra["serial"]
    blob = os.urandom(150_000)
    src = tmp_path / "blob"
    src.write_bytes(blob)
    assert android_lab.adb("-s", serial, "push", str(src), "/sdcard/blob").returncode == 0
    raw = android_lab.adb("-s", serial, "exec-out", "cat", "/sdcard/blob")  # exec: service
    assert raw.returncode == 0 and raw.stdout == blob
    with open(src, "rb") as stdin:  # shell v2 stdin packets, then close-stdin at EOF
        piped = subprocess.run(["adb", "-P", str(android_lab.adb_port), "-s", serial,
                                "shell", "sha256sum"], stdin=stdin, capture_output=True,
                               timeout=60, env=android.adb_env(android_lab.home), check=False)
    assert piped.stdout.split()[0].decode() == hashlib.sha256(blob).hexdigest()
