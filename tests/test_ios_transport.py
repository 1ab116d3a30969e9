"""``IosTransport`` against the emulated iPhones: files through house_arrest + AFC,
commands through the mailbox, and every refusal mapped to the right error."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from fleet.connect import open_device
from fleet.core import errors
from fleet.core.package.keyid import fingerprint_public_key
from fleet.enrollment import enroll
from fleet.lab import ios, ios_app
from fleet.registry import Registry
from fleet.transports import open_transport
from fleet.transports.ios import IosTransport
from tests.ios_fixtures import IosLab, ios_home, ios_lab

_FIXTURES = (ios_home, ios_lab)  # pytest finds fixtures among module attributes

pytestmark = pytest.mark.timeout(120)

STATUS = ["fleet-agent", "--root", "Documents/fleet/agent", "status"]


def test_push_pull_round_trip_keeps_bytes(ios_lab: IosLab, tmp_path: Path) -> None:
    phone = ios_lab.phones(1)[0]
    blob = os.urandom((2 << 20) + 12345)
    src, back = tmp_path / "model.fpkg", tmp_path / "back" / "model.fpkg"
    src.write_bytes(blob)
    with ios_lab.transport(phone) as t:
        sent = t.push(src, "Documents/fleet/agent/incoming/model.fpkg")
        assert sent.size == len(blob) and sent.bytes_sent == len(blob)
        assert sent.sha256 == hashlib.sha256(blob).hexdigest()
        st = t.stat("Documents/fleet/agent/incoming/model.fpkg")
        assert st is not None and st.size == len(blob) and not st.is_dir
        assert t.stat("Documents/fleet/agent/incoming/model.fpkg.part") is None
        got = t.pull("Documents/fleet/agent/incoming/model.fpkg", back)
    assert back.read_bytes() == blob and got.sha256 == sent.sha256
    on_phone = ios_lab.container(phone) / "Documents/fleet/agent/incoming/model.fpkg"
    assert on_phone.read_bytes() == blob


def test_push_of_an_empty_file_and_stat_of_a_folder(ios_lab: IosLab, tmp_path: Path) -> None:
    phone = ios_lab.phones(1)[0]
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with ios_lab.transport(phone) as t:
        assert t.push(empty, "Documents/fleet/empty").size == 0
        st = t.stat("Documents/fleet/empty")
        assert st is not None and st.size == 0
        folder = t.stat("Documents/fleet")
        assert folder is not None and folder.is_dir
        assert t.stat("Documents/fleet/no-such-file") is None


def test_push_resumes_a_partial_file_of_the_same_source(ios_lab: IosLab,
                                                        tmp_path: Path) -> None:
    phone = ios_lab.phones(1)[0]
    blob = os.urandom(3 << 20)
    src = tmp_path / "big"
    src.write_bytes(blob)
    digest = hashlib.sha256(blob).hexdigest()
    docs = ios_lab.container(phone) / "Documents" / "resume"
    docs.mkdir(parents=True, exist_ok=True)
    # an interrupted push left a prefix and the sidecar naming its source
    (docs / "big.part").write_bytes(blob[: 1 << 20])
    (docs / "big.part.sha256").write_text(digest)
    with ios_lab.transport(phone) as t:
        r = t.push(src, "Documents/resume/big")
        assert r.resumed_from == 1 << 20 and r.bytes_sent == len(blob) - (1 << 20)
        assert (docs / "big").read_bytes() == blob
        # a partial file of another source is not trusted: start over
        (docs / "big2.part").write_bytes(b"x" * 1000)
        (docs / "big2.part.sha256").write_text("0" * 64)
        r2 = t.push(src, "Documents/resume/big2")
        assert r2.resumed_from == 0 and (docs / "big2").read_bytes() == blob
    assert not (docs / "big.part").exists() and not (docs / "big.part.sha256").exists()


def test_paths_cannot_leave_the_container(ios_lab: IosLab, tmp_path: Path) -> None:
    phone = ios_lab.phones(1)[0]
    link = ios_lab.container(phone) / "Documents" / "etc-link"
    if not link.is_symlink():
        link.symlink_to("/etc")
    with ios_lab.transport(phone) as t:
        with pytest.raises(errors.RemoteFileError):
            t.stat("../../../../etc/passwd")
        with pytest.raises(errors.RemoteFileError, match="PERM_DENIED"):
            t.stat("Documents/etc-link/passwd")


def test_mailbox_run_returns_the_agents_json(ios_lab: IosLab) -> None:
    phone = ios_lab.phones(1)[0]
    with ios_lab.transport(phone) as t:
        assert t.agent_root() == "Documents/fleet/agent" and t.agent_cmd() == ["fleet-agent"]
        res = t.run(STATUS, timeout=60)
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["schema"] == "fleet.agent/1" and doc["ok"] is True and doc["verb"] == "status"
    assert doc["root"] == "Documents/fleet/agent"
    box = ios_lab.container(phone) / "Documents" / "fleet"
    assert list((box / "inbox").iterdir()) == [] and list((box / "outbox").iterdir()) == []


def test_taken_request_may_run_longer_than_the_pickup_deadline(ios_lab: IosLab) -> None:
    phone = ios_lab.phones(1)[0]
    # The peer decides the timing, not the machine's speed: in ``slow`` mode the app takes
    # the request at once and answers only after SLOW_S (3 s), far past the 0.2 s pickup
    # deadline; a taken request must be waited for up to the run timeout.
    try:
        ios.set_app(ios_lab.home, phone.name, "slow")
        with ios_lab.transport(phone, mailbox_timeout=0.2) as t:
            res = t.run(STATUS, timeout=60)
    finally:
        ios_lab.heal(phone.name)
    assert res.exit_code == 0 and res.duration_s >= ios_app.SLOW_S
    assert json.loads(res.stdout)["ok"] is True


def test_answer_later_than_the_run_timeout_is_pending(ios_lab: IosLab) -> None:
    phone = ios_lab.phones(2)[1]
    outbox = ios_lab.container(phone) / "Documents" / "fleet" / "outbox"
    try:
        ios.set_app(ios_lab.home, phone.name, "slow")  # takes at once, answers 3 s later
        with ios_lab.transport(phone, mailbox_timeout=30) as t:
            started = time.monotonic()
            with pytest.raises(errors.MailboxPendingError, match="took request") as info:
                t.run(STATUS, timeout=1.0)
            assert 1.0 <= time.monotonic() - started < 2.5
        assert info.value.details["picked_up"] is True
        late = outbox / f"{info.value.details['request_id']}.json"
        deadline = time.monotonic() + 30
        while not late.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert json.loads(late.read_text())["exit_code"] == 0  # it did run, later
        late.unlink()
    finally:
        ios_lab.heal(phone.name)


def test_mailbox_is_not_a_shell(ios_lab: IosLab) -> None:
    phone = ios_lab.phones(1)[0]
    with ios_lab.transport(phone) as t:
        res = t.run(["sh", "-c", "echo pwned"], timeout=60)
    assert res.exit_code == 127 and b"pwned" not in res.stdout
    assert b"runs only fleet-agent" in res.stderr
    assert json.loads(res.stdout)["error"]["code"] == "mailbox_forbidden"


def test_registered_phone_answers_through_the_agent_client(ios_lab: IosLab) -> None:
    phones = ios_lab.phones(2)
    ios_lab.register(phones, group="phones")
    reg = Registry.open(ios_lab.home)
    try:
        members = reg.resolve_targets(groups=("phones",))
        device = reg.get_device(phones[1].name)
        if not device.public_key:  # the mailbox bootstrap: enroll pins the app's key
            with pytest.raises(errors.KeyMaterialError, match="enroll it first"):
                open_device(ios_lab.home, device)[1].call("status", {}, timeout=60)
            enroll(ios_lab.home, reg, device)
            device = reg.get_device(phones[1].name)
    finally:
        reg.close()
    assert {d.name for d in members} >= {p.name for p in phones}
    key = ios_lab.transport(phones[1]).options.mailbox
    assert key is not None and key.device_key is not None
    assert device.fingerprint == fingerprint_public_key(key.device_key)
    transport, client = open_device(ios_lab.home, device)
    with transport:
        doc = client.call("status", {}, timeout=60)
    assert doc["ok"] is True and doc["verb"] == "status"


def test_app_not_installed_is_a_clear_error(ios_lab: IosLab, tmp_path: Path) -> None:
    phone = ios_lab.phones(2)[1]
    src = tmp_path / "f"
    src.write_bytes(b"x")
    try:
        ios.set_app(ios_lab.home, phone.name, "missing")
        with ios_lab.transport(phone) as t:
            with pytest.raises(errors.AppNotInstalledError, match="not installed") as info:
                t.push(src, "Documents/f")
            assert info.value.details["bundle"] == ios.DEFAULT_BUNDLE
            with pytest.raises(errors.AppNotInstalledError):
                t.run(STATUS, timeout=10)
    finally:
        ios_lab.heal(phone.name)


def test_unanswered_mailbox_is_pending_within_the_deadline(ios_lab: IosLab) -> None:
    phone = ios_lab.phones(2)[1]
    try:
        ios.set_app(ios_lab.home, phone.name, "mute")
        with ios_lab.transport(phone, mailbox_timeout=1.5) as t:
            started = time.monotonic()
            with pytest.raises(errors.MailboxPendingError) as info:
                t.run(STATUS, timeout=60)
            elapsed = time.monotonic() - started
    finally:
        ios_lab.heal(phone.name)
    assert 1.5 <= elapsed < 6
    assert info.value.details["picked_up"] is False
    inbox = ios_lab.container(phone) / "Documents" / "fleet" / "inbox"
    assert [p.name for p in inbox.iterdir()] == []  # withdrawn: the app never runs it late


@pytest.mark.parametrize("same_host_id", [False, True], ids=["unknown-host", "wrong-certs"])
def test_wrong_pair_record_is_refused(ios_lab: IosLab, same_host_id: bool) -> None:
    phone = ios_lab.phones(2)[1]
    try:
        ios.make_foreign_pair_record(ios_lab.home, phone.name, same_host_id=same_host_id)
        with ios_lab.transport(phone) as t, pytest.raises(errors.AuthError, match="re-pair"):
            t.stat("Documents")
    finally:
        ios_lab.heal(phone.name)
    with ios_lab.transport(phone) as t:
        assert t.stat("Documents") is not None


def test_detached_phone_and_missing_usbmuxd_are_connect_errors(ios_lab: IosLab,
                                                               tmp_path: Path) -> None:
    ios_lab.phones(1)
    uri = f"ios://00008110-0000000000000000?bundle={ios.DEFAULT_BUNDLE}"
    with IosTransport(uri, ios_lab.options()) as t, \
            pytest.raises(errors.ConnectError, match="not attached"):
        t.stat("Documents")
    with IosTransport(uri + f"&usbmux={tmp_path / 'nope.sock'}") as t, \
            pytest.raises(errors.ConnectError, match="cannot reach usbmuxd"):
        t.stat("Documents")


def test_uri_options(ios_lab: IosLab) -> None:
    phone = ios_lab.phones(1)[0]
    t = open_transport(phone.uri + "&vend=container")
    assert isinstance(t, IosTransport)
    assert t.udid == phone.extra["udid"] and t.vend == "VendContainer"
    with t:
        assert t.stat("Library") is not None  # the whole container is vended
    with pytest.raises(errors.MalformedUriError):
        IosTransport(phone.uri + "&vend=everything")


def test_tls_key_file_is_private_and_removed_on_close(ios_lab: IosLab) -> None:
    phone = ios_lab.phones(1)[0]
    t = ios_lab.transport(phone)
    assert t.stat("Documents") is not None
    assert t._device is not None
    pem = t._device._pem_dir / "host.pem"
    assert pem.stat().st_mode & 0o777 == 0o600
    t.close()
    assert not pem.exists()
    record = ios.ios_dir(ios_lab.home) / "pair_records" / f"{phone.extra['udid']}.plist"
    assert record.stat().st_mode & 0o777 == 0o600


def test_usbmuxd_restart_is_a_retryable_loss_then_recovers(ios_lab: IosLab) -> None:
    phone = ios_lab.phones(1)[0]
    with ios_lab.transport(phone) as t:
        assert t.stat("Documents") is not None
        ios.restart_usbmuxd(ios_lab.home)
        with pytest.raises(errors.ConnectionLostError) as info:
            t.stat("Documents")
        assert info.value.retryable
        assert t.stat("Documents") is not None  # the next call opens a fresh connection
