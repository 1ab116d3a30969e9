"""The emulated iPhones against independent clients: libimobiledevice's tools and tidevice.

If these pass, the lab speaks usbmuxd, lockdownd (with a real TLS session from the pair
record), house_arrest and AFC closely enough for two unrelated client implementations.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tidevice
from tidevice.exceptions import MuxServiceError

from fleet.home import FleetHome
from fleet.lab import ios
from fleet.lab.ios import DEFAULT_BUNDLE
from fleet.registry import Registry
from tests.ios_fixtures import IosLab, idevice, ios_home, ios_lab

_FIXTURES = (ios_home, ios_lab)  # pytest finds fixtures among module attributes

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def tidevice_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tidevice keeps its TLS key file under ~/.tidevice: keep it in the test's tmp."""
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def _tidevice_cli(lab: IosLab, home: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HOME=str(home))
    return subprocess.run([sys.executable, "-m", "tidevice", "--socket", str(lab.socket),
                           *argv], env=env, capture_output=True, text=True, timeout=60,
                          check=False)


def test_idevice_id_lists_the_emulated_udids(ios_lab: IosLab) -> None:
    phones = ios_lab.phones(2)
    proc = idevice(ios_lab, "idevice_id", "-l")
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.split()) == sorted(p.extra["udid"] for p in phones)


def test_ideviceinfo_reads_values_inside_a_tls_session(ios_lab: IosLab) -> None:
    phone = ios_lab.phones(1)[0]
    udid = phone.extra["udid"]
    proc = idevice(ios_lab, "ideviceinfo", "-u", udid)
    assert proc.returncode == 0, proc.stderr
    values = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    assert values["UniqueDeviceID"] == udid
    assert values["DeviceName"] == phone.name
    assert values["ProductVersion"].startswith("16.")
    assert values["ProductType"] == "iPhone14,5"
    # a domain query is refused without a session: this answer proves TLS worked
    disk = idevice(ios_lab, "ideviceinfo", "-u", udid, "-q", "com.apple.disk_usage")
    assert disk.returncode == 0, disk.stderr
    assert "TotalDataAvailable:" in disk.stdout


def test_tidevice_cli_lists_and_reads_info(ios_lab: IosLab, tmp_path: Path) -> None:
    phones = ios_lab.phones(2)
    listed = _tidevice_cli(ios_lab, tmp_path, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    udids = {d["udid"] for d in json.loads(listed.stdout)}
    assert udids == {p.extra["udid"] for p in phones}
    info = _tidevice_cli(ios_lab, tmp_path, "-u", phones[0].extra["udid"], "info")
    assert info.returncode == 0, info.stderr
    assert "16.7.2" in info.stdout and phones[0].extra["udid"] in info.stdout


def test_tidevice_cli_fsync_push_lands_in_the_app_container(ios_lab: IosLab,
                                                            tmp_path: Path) -> None:
    phone = ios_lab.phones(1)[0]
    src = tmp_path / "hello.txt"
    src.write_bytes(b"hello from tidevice\n")
    proc = _tidevice_cli(ios_lab, tmp_path, "-u", phone.extra["udid"], "fsync", "-B",
                         DEFAULT_BUNDLE, "push", str(src), "/Documents/hello.txt")
    assert proc.returncode == 0, proc.stderr
    on_phone = ios_lab.container(phone) / "Documents" / "hello.txt"
    assert on_phone.read_bytes() == b"hello from tidevice\n"


def test_unknown_bundle_is_application_lookup_failed(ios_lab: IosLab,
                                                     tidevice_home: Path) -> None:
    phone = ios_lab.phones(1)[0]
    dev = tidevice.Device(phone.extra["udid"], str(ios_lab.socket))
    sync = dev.app_sync("com.example.not.installed")
    with pytest.raises(MuxServiceError, match="ApplicationLookupFailed"):
        sync.listdir("/Documents")


def test_vend_documents_shows_only_documents(ios_lab: IosLab, tidevice_home: Path) -> None:
    phone = ios_lab.phones(1)[0]
    dev = tidevice.Device(phone.extra["udid"], str(ios_lab.socket))
    docs = dev.app_sync(DEFAULT_BUNDLE, command="VendDocuments")
    assert docs.listdir("/") == ["Documents"]
    _, err = docs.stat("/Library", with_error=True)
    assert err is not None and err.name == "ST_PERM_DENIED"
    whole = dev.app_sync(DEFAULT_BUNDLE, command="VendContainer")
    assert {"Documents", "Library", "tmp"} <= set(whole.listdir("/"))


def test_lockdown_refuses_domains_without_a_session_and_offers_no_disk_image(
        ios_lab: IosLab, tidevice_home: Path) -> None:
    phone = ios_lab.phones(1)[0]
    dev = tidevice.Device(phone.extra["udid"], str(ios_lab.socket))
    assert dev.get_value("DeviceName", no_session=True) == phone.name
    with dev.create_inner_connection() as conn:
        answer = conn.send_recv_packet({"Request": "GetValue",
                                        "Domain": "com.apple.disk_usage"})
    assert answer.get("Error") == "NoRunningSession"
    # the lab never offers what would make tidevice fetch a DeveloperDiskImage
    with pytest.raises(MuxServiceError, match="InvalidService"):
        dev._unsafe_start_service("com.apple.mobile.mobile_image_mounter")


def test_ideviceinfo_is_refused_with_a_foreign_pair_record(ios_lab: IosLab) -> None:
    phone = ios_lab.phones(2)[1]
    try:
        ios.make_foreign_pair_record(ios_lab.home, phone.name, same_host_id=False)
        proc = idevice(ios_lab, "ideviceinfo", "-u", phone.extra["udid"], "-k",
                       "DeviceName")
        assert proc.returncode != 0
        assert phone.name not in proc.stdout
    finally:
        ios_lab.heal(phone.name)
    healed = idevice(ios_lab, "ideviceinfo", "-u", phone.extra["udid"], "-k", "DeviceName")
    assert healed.stdout.strip() == phone.name


def test_lab_up_adds_phones_and_down_removes_them(home: FleetHome) -> None:
    Registry.init(home).close()
    first = ios.up(home, 2)
    try:
        more = ios.up(home, 1, start_index=2)
        again = ios.up(home, 2)  # already there: same phones, no new ones
        assert [d.uri for d in again] == [d.uri for d in first]
        assert [d.name for d in first + more] == ["iphone-0", "iphone-1", "iphone-2"]
        assert all(d.platform == "ios" and d.agent_root == "Documents/fleet/agent"
                   for d in first + more)
        ios.set_app(home, "iphone-1", "mute")
        rows = {r["name"]: r for r in ios.status(home)}
        assert len(rows) == 3 and all(r["state"] == "running" for r in rows.values())
        assert rows["iphone-1"]["faults"] == {"app": "mute"}
        lab = IosLab(home)
        listed = idevice(lab, "idevice_id", "-l").stdout.split()
        assert sorted(listed) == sorted(d.extra["udid"] for d in first + more)
    finally:
        stopped = ios.down(home)
    assert sorted(stopped) == ["iphone-0", "iphone-1", "iphone-2"]
    assert not ios.socket_path(home).exists() and not ios.ios_dir(home).exists()
    assert ios.status(home) == [] and ios.down(home) == []


def test_afc_file_operations_through_tidevice_sync(ios_lab: IosLab,
                                                   tidevice_home: Path) -> None:
    phone = ios_lab.phones(1)[0]
    dev = tidevice.Device(phone.extra["udid"], str(ios_lab.socket))
    sync = dev.app_sync(DEFAULT_BUNDLE, command="VendContainer")
    if sync.exists("/tmp/afc"):
        sync.rmtree("/tmp/afc")
    assert sync.mkdir("/tmp/afc/a/b") == 0  # AFC MakeDir creates parents
    sync.push_content("/tmp/afc/a/b/f.bin", b"0123456789")
    assert bytes(sync.pull_content("/tmp/afc/a/b/f.bin")) == b"0123456789"
    assert sync.stat("/tmp/afc/a/b/f.bin").st_size == 10
    assert sync.rename("/tmp/afc/a/b/f.bin", "/tmp/afc/g.bin") == 0
    assert sorted(sync.listdir("/tmp/afc")) == ["a", "g.bin"]
    assert sync.remove("/tmp/afc/a").name == "ST_DIR_NOT_EMPTY"
    assert sync.remove("/tmp/afc/missing").name == "ST_OBJECT_NOT_FOUND"
    removed = sync.rmtree("/tmp/afc")
    assert "/tmp/afc/g.bin" in removed and not sync.exists("/tmp/afc")
    assert not (ios_lab.container(phone) / "tmp" / "afc").exists()


def test_usbmuxd_listen_announces_attached_phones(ios_lab: IosLab) -> None:
    phones = ios_lab.phones(2)
    events = tidevice.Usbmux(str(ios_lab.socket)).watch_device()
    seen = {next(events)["Properties"]["SerialNumber"] for _ in phones}
    events.close()
    assert seen == {p.extra["udid"] for p in phones}
