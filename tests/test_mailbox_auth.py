"""The authenticated mailbox: one attack per test, exact error class.

Pure checks (:mod:`fleet.core.mailbox`), the app side (:mod:`fleet_agent.mailbox_auth`,
the code an app embeds) with the verb runner recorded instead of run, the controller side
(:class:`fleet.mailbox.Mailbox`) over a local folder, and, last, the real emulated iOS app
behind the lab's usbmuxd/AFC: an unsigned request, a replayed one and a forged answer."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from fleet_agent.identity import load_or_create_device_key
from fleet_agent.mailbox_auth import NONCE_FILE, AppMailbox

from fleet.artifacts.keys import public_pem
from fleet.core import errors
from fleet.core import mailbox as mb
from fleet.core.package.keyid import fingerprint_public_key
from fleet.core.protocol import decode_args, encode_args
from fleet.lab import ios
from fleet.mailbox import Mailbox
from fleet.transports.ios import MAILBOX_BASE, IosTransport
from tests.ios_fixtures import IosLab, ios_home, ios_lab

_FIXTURES = (ios_home, ios_lab)  # pytest finds fixtures among module attributes

NOW = 1_800_000_000.0
ROOT = "Documents/fleet/agent"


def _status_argv(root: str = ROOT, verb: str = "status", **args: Any) -> list[str]:
    return ["fleet-agent", "--root", root, *verb.split(), "--args-b64", encode_args(args)]


@pytest.fixture
def controller() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture
def device() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _fp(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> str:
    return fingerprint_public_key(key.public_key())


def _request(controller: ed25519.Ed25519PrivateKey, device: ec.EllipticCurvePrivateKey | None,
             argv: Sequence[str] | None = None, *, now: float = NOW, rid: str = "a" * 32,
             **kw: Any) -> bytes:
    return mb.sign_request(controller, rid=rid, argv=argv or _status_argv(),
                           device=None if device is None else _fp(device), now=now, **kw)


def _verify(data: bytes, controller: ed25519.Ed25519PrivateKey,
            device: ec.EllipticCurvePrivateKey, now: float = NOW) -> mb.Request:
    return mb.verify_request(data, trusted=[controller.public_key()], device=_fp(device),
                             now=now)


def _resign(doc: dict[str, Any], key: ed25519.Ed25519PrivateKey) -> bytes:
    doc = {k: v for k, v in doc.items() if k != "sig"}
    doc["sig"] = base64.b64encode(key.sign(mb.REQUEST_DOMAIN + json.dumps(
        doc, sort_keys=True, separators=(",", ":")).encode())).decode()
    return json.dumps(doc).encode()


# -- requests, pure ---------------------------------------------------------------------------
def test_signed_request_verifies(controller: ed25519.Ed25519PrivateKey,
                                 device: ec.EllipticCurvePrivateKey) -> None:
    req = _verify(_request(controller, device, stdin=b"{}"), controller, device)
    assert req.argv == tuple(_status_argv()) and req.stdin == b"{}"
    assert req.device == _fp(device) and req.expires == int(NOW) + mb.DEFAULT_TTL_S
    assert req.signer == _fp(controller) and len(req.nonce) >= 32


def test_unsigned_request_is_refused(controller: ed25519.Ed25519PrivateKey,
                                     device: ec.EllipticCurvePrivateKey) -> None:
    doc = json.loads(_request(controller, device))
    del doc["sig"]
    with pytest.raises(errors.MailboxUnsignedError):
        _verify(json.dumps(doc).encode(), controller, device)


def test_old_unsigned_format_is_refused_as_unsigned(controller: ed25519.Ed25519PrivateKey,
                                                     device: ec.EllipticCurvePrivateKey) -> None:
    old = {"schema": "fleet.mailbox/1", "id": "a" * 32, "argv": _status_argv()}
    with pytest.raises(errors.MailboxUnsignedError):
        _verify(json.dumps(old).encode(), controller, device)


def test_request_changed_after_signing_is_refused(controller: ed25519.Ed25519PrivateKey,
                                                  device: ec.EllipticCurvePrivateKey) -> None:
    doc = json.loads(_request(controller, device))
    doc["argv"] = _status_argv(verb="enroll", controller_pub="x", replace_trust=True)
    with pytest.raises(errors.MailboxBadSignatureError, match="does not verify"):
        _verify(json.dumps(doc).encode(), controller, device)


def test_request_signed_by_another_key_is_refused(controller: ed25519.Ed25519PrivateKey,
                                                  device: ec.EllipticCurvePrivateKey) -> None:
    attacker = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(errors.MailboxBadSignatureError, match="trusts") as info:
        _verify(_request(attacker, device), controller, device)
    assert info.value.details["signer"] == _fp(attacker)


def test_request_naming_the_trusted_signer_but_signed_by_another_is_refused(
        controller: ed25519.Ed25519PrivateKey, device: ec.EllipticCurvePrivateKey) -> None:
    doc = json.loads(_request(controller, device))
    forged = _resign(doc, ed25519.Ed25519PrivateKey.generate())  # signer field unchanged
    with pytest.raises(errors.MailboxBadSignatureError, match="does not verify"):
        _verify(forged, controller, device)


def test_manifest_signature_is_no_request_signature(controller: ed25519.Ed25519PrivateKey,
                                                    device: ec.EllipticCurvePrivateKey) -> None:
    """The same key signs packages: without the domain tag its signatures would pass."""
    doc = json.loads(_request(controller, device))
    body = {k: v for k, v in doc.items() if k != "sig"}
    doc["sig"] = base64.b64encode(controller.sign(json.dumps(
        body, sort_keys=True, separators=(",", ":")).encode())).decode()
    with pytest.raises(errors.MailboxBadSignatureError):
        _verify(json.dumps(doc).encode(), controller, device)


def test_expired_request_is_refused(controller: ed25519.Ed25519PrivateKey,
                                    device: ec.EllipticCurvePrivateKey) -> None:
    data = _request(controller, device)
    late = NOW + mb.DEFAULT_TTL_S + mb.CLOCK_TOLERANCE_S + 1
    with pytest.raises(errors.MailboxExpiredError, match="expired") as info:
        _verify(data, controller, device, now=late)
    assert info.value.details["device_time"] == int(late)
    # within the stated tolerance it still passes (clocks differ a little)
    _verify(data, controller, device, now=late - 2)


def test_request_living_too_long_is_refused(controller: ed25519.Ed25519PrivateKey,
                                            device: ec.EllipticCurvePrivateKey) -> None:
    data = _request(controller, device, ttl_s=mb.MAX_TTL_S * 24)
    with pytest.raises(errors.MailboxExpiredError, match="more than"):
        _verify(data, controller, device)


def test_request_for_another_device_is_refused(controller: ed25519.Ed25519PrivateKey,
                                               device: ec.EllipticCurvePrivateKey) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(errors.MailboxMisaddressedError) as info:
        _verify(_request(controller, other), controller, device)
    assert info.value.details["addressed"] == _fp(other)


def test_request_for_no_device_may_only_enroll(controller: ed25519.Ed25519PrivateKey,
                                               device: ec.EllipticCurvePrivateKey) -> None:
    req = _verify(_request(controller, None), controller, device)
    with pytest.raises(errors.MailboxMisaddressedError, match="only enroll"):
        mb.check_addressed(req, "status")
    mb.check_addressed(req, "enroll")


def test_replayed_nonce_is_refused_and_the_window_forgets_expired_ones(
        controller: ed25519.Ed25519PrivateKey, device: ec.EllipticCurvePrivateKey) -> None:
    req = _verify(_request(controller, device), controller, device)
    window = mb.check_replay(req, {"0" * 32: int(NOW) - 10_000}, NOW)
    assert window == {req.nonce: req.expires}  # the long-expired entry is gone
    with pytest.raises(errors.MailboxReplayError):
        mb.check_replay(req, window, NOW + 1)


def test_argv_is_parsed_strictly() -> None:
    call = mb.parse_agent_argv(_status_argv(verb="lora add", path="x"))
    assert (call.root, call.verb, call.args) == (ROOT, "lora add", {"path": "x"})
    with pytest.raises(errors.MailboxForbiddenError, match="runs only fleet-agent"):
        mb.parse_agent_argv(["sh", "-c", "id"])
    for bad in (["fleet-agent", "--version"], ["fleet-agent", "status", "--root"],
                ["fleet-agent", "status", "probe"], ["fleet-agent"]):
        with pytest.raises(errors.MailboxMalformedError):
            mb.parse_agent_argv(bad)


# -- answers, pure ----------------------------------------------------------------------------
def _answer(device: ec.EllipticCurvePrivateKey, request: bytes, rid: str = "a" * 32,
            stdout: bytes = b'{"ok": true}\n', **kw: Any) -> bytes:
    return mb.sign_answer(device, rid=rid, request=request, exit_code=0, stdout=stdout,
                          stderr=b"", duration_s=0.25, **kw)


def test_signed_answer_verifies(controller: ed25519.Ed25519PrivateKey,
                                device: ec.EllipticCurvePrivateKey) -> None:
    request = _request(controller, device)
    ans = mb.verify_answer(_answer(device, request), rid="a" * 32, request=request,
                           device_key=device.public_key())
    assert (ans.exit_code, ans.stdout, ans.duration_s) == (0, b'{"ok": true}\n', 0.25)
    assert ans.signer == _fp(device)


def test_forged_unsigned_answer_is_refused(controller: ed25519.Ed25519PrivateKey,
                                           device: ec.EllipticCurvePrivateKey) -> None:
    request = _request(controller, device)
    doc = json.loads(_answer(device, request))
    del doc["sig"]
    with pytest.raises(errors.MailboxUnsignedError):
        mb.verify_answer(json.dumps(doc).encode(), rid="a" * 32, request=request,
                         device_key=device.public_key())


def test_answer_signed_by_another_key_is_refused(controller: ed25519.Ed25519PrivateKey,
                                                 device: ec.EllipticCurvePrivateKey) -> None:
    request = _request(controller, device)
    forger = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(errors.MailboxBadSignatureError, match="device's key"):
        mb.verify_answer(_answer(forger, request), rid="a" * 32, request=request,
                         device_key=device.public_key())


def test_answer_changed_after_signing_is_refused(controller: ed25519.Ed25519PrivateKey,
                                                 device: ec.EllipticCurvePrivateKey) -> None:
    request = _request(controller, device)
    doc = json.loads(_answer(device, request))
    doc["stdout_b64"] = base64.b64encode(b'{"installed": {"tiny": 99}}').decode()
    with pytest.raises(errors.MailboxBadSignatureError, match="does not verify"):
        mb.verify_answer(json.dumps(doc).encode(), rid="a" * 32, request=request,
                         device_key=device.public_key())


def test_answer_bound_to_another_request_is_refused(controller: ed25519.Ed25519PrivateKey,
                                                    device: ec.EllipticCurvePrivateKey) -> None:
    """A genuine, device-signed answer to an earlier request, put back for a new one."""
    earlier = _request(controller, device, rid="b" * 32)
    now = _request(controller, device, rid="b" * 32)  # same id, another nonce
    with pytest.raises(errors.MailboxUnboundAnswerError):
        mb.verify_answer(_answer(device, earlier, rid="b" * 32), rid="b" * 32, request=now,
                         device_key=device.public_key())
    with pytest.raises(errors.MailboxUnboundAnswerError):
        mb.verify_answer(_answer(device, now, rid="c" * 32), rid="b" * 32, request=now,
                         device_key=device.public_key())


@pytest.mark.parametrize("field", ["stdout_b64", "exit_code", "request_sha256"])
def test_answer_missing_a_field_is_refused(controller: ed25519.Ed25519PrivateKey,
                                           device: ec.EllipticCurvePrivateKey,
                                           field: str) -> None:
    """An app built from an outdated document (``stdout`` for ``stdout_b64``): signed, but
    never taken as an empty success."""
    request = _request(controller, device)
    doc = {k: v for k, v in json.loads(_answer(device, request)).items()
           if k not in (field, "sig")}
    doc["sig"] = "x"
    data = _resign_answer(doc, device)
    with pytest.raises(errors.MailboxMalformedError, match=field) as info:
        mb.verify_answer(data, rid="a" * 32, request=request, device_key=device.public_key())
    assert info.value.details["missing"] == [field]


def _resign_answer(doc: dict[str, Any], key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import hashes

    body = {k: v for k, v in doc.items() if k != "sig"}
    sig = key.sign(mb.ANSWER_DOMAIN + json.dumps(body, sort_keys=True,
                                                 separators=(",", ":")).encode(),
                   ec.ECDSA(hashes.SHA256()))
    return json.dumps({**body, "sig": base64.b64encode(sig).decode()}).encode()


def test_enrollment_answer_must_report_the_key_that_signed_it(
        controller: ed25519.Ed25519PrivateKey, device: ec.EllipticCurvePrivateKey) -> None:
    request = _request(controller, None, _status_argv(verb="enroll"))
    other = ec.generate_private_key(ec.SECP256R1())
    doc = {"schema": "fleet.agent/1", "ok": True, "verb": "enroll",
           "fingerprint": _fp(other), "public_key": public_pem_ec(other)}
    data = _answer(device, request, stdout=json.dumps(doc).encode(), with_public_key=True)
    ans = mb.verify_answer(data, rid="a" * 32, request=request, device_key=None)
    assert ans.signer == _fp(device)  # self-signed by the key it carries
    with pytest.raises(errors.MailboxBadSignatureError, match="reports key"):
        mb.check_enroll_answer(ans, "a" * 32)


def public_pem_ec(key: ec.EllipticCurvePrivateKey) -> str:
    from cryptography.hazmat.primitives import serialization

    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


# -- the app side ------------------------------------------------------------------------------
class Recorder:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str], cwd: Path, timeout_s: float
                 ) -> tuple[int, bytes, bytes]:
        self.calls.append(list(argv))
        return 0, b'{"schema": "fleet.agent/1", "ok": true, "verb": "status"}\n', b""


@pytest.fixture
def app(tmp_path: Path, controller: ed25519.Ed25519PrivateKey) -> AppMailbox:
    """An enrolled app: its device key made, the controller key pinned."""
    agent = tmp_path / ROOT
    (agent / "identity").mkdir(parents=True, mode=0o700)
    load_or_create_device_key(agent / "identity" / "device_key.pem")
    (agent / "identity" / "controller.pub").write_text(public_pem(controller.public_key()))
    return AppMailbox(tmp_path, ROOT, Recorder())


def _app_device(app: AppMailbox) -> ec.EllipticCurvePrivateKey:
    key = app.device_key()
    assert key is not None
    return key


def _refusal(app: AppMailbox, answer: bytes, request: bytes, rid: str = "a" * 32) -> str:
    """The error code of a device-signed refusal (the answer itself verifies)."""
    ans = mb.verify_answer(answer, rid=rid, request=request,
                           device_key=_app_device(app).public_key())
    doc = json.loads(ans.stdout)
    assert doc["ok"] is False and ans.exit_code != 0
    return str(doc["error"]["code"])


def test_app_runs_a_signed_request_with_arguments_it_encodes_itself(
        app: AppMailbox, controller: ed25519.Ed25519PrivateKey) -> None:
    request = _request(controller, _app_device(app), _status_argv(verb="bench", name="tiny"))
    answer = app.handle(request, "a" * 32, now=NOW)
    ans = mb.verify_answer(answer, rid="a" * 32, request=request,
                           device_key=_app_device(app).public_key())
    assert ans.exit_code == 0 and json.loads(ans.stdout)["ok"] is True
    assert isinstance(app.run, Recorder)
    [argv] = app.run.calls
    assert argv[:3] == ["--root", ROOT, "bench"] and decode_args(argv[-1]) == {"name": "tiny"}


def test_app_refuses_an_unsigned_request_and_runs_nothing(
        app: AppMailbox, controller: ed25519.Ed25519PrivateKey) -> None:
    doc = json.loads(_request(controller, _app_device(app), _status_argv(
        verb="enroll", controller_pub="evil", replace_trust=True)))
    del doc["sig"]
    request = json.dumps(doc).encode()
    assert _refusal(app, app.handle(request, "a" * 32, now=NOW), request) == "mailbox_unsigned"
    assert isinstance(app.run, Recorder) and app.run.calls == []


def test_app_refuses_a_replayed_request_across_restarts(
        app: AppMailbox, controller: ed25519.Ed25519PrivateKey) -> None:
    request = _request(controller, _app_device(app))
    app.handle(request, "a" * 32, now=NOW)
    again = AppMailbox(app.container, app.root, app.run)  # the app restarted
    code = _refusal(app, again.handle(request, "a" * 32, now=NOW + 5), request)
    assert code == "mailbox_replay"
    assert isinstance(app.run, Recorder) and len(app.run.calls) == 1
    assert (app.container / ROOT / NONCE_FILE).stat().st_mode & 0o077 == 0


def test_app_refuses_an_expired_request(app: AppMailbox,
                                        controller: ed25519.Ed25519PrivateKey) -> None:
    request = _request(controller, _app_device(app), now=NOW - 3600)
    assert _refusal(app, app.handle(request, "a" * 32, now=NOW), request) == "mailbox_expired"


def test_app_refuses_a_request_for_another_device(app: AppMailbox,
                                                  controller: ed25519.Ed25519PrivateKey) -> None:
    request = _request(controller, ec.generate_private_key(ec.SECP256R1()))
    code = _refusal(app, app.handle(request, "a" * 32, now=NOW), request)
    assert code == "mailbox_misaddressed"


def test_app_refuses_a_request_signed_by_another_controller(app: AppMailbox) -> None:
    request = _request(ed25519.Ed25519PrivateKey.generate(), _app_device(app))
    code = _refusal(app, app.handle(request, "a" * 32, now=NOW), request)
    assert code == "mailbox_bad_signature"


@pytest.mark.parametrize("path", ["/etc/passwd", "Documents/elsewhere.fpkg",
                                  f"{ROOT}/incoming/../store/x.fpkg", f"{ROOT}/incoming/.x"])
def test_stage_over_the_mailbox_takes_only_files_in_incoming(
        app: AppMailbox, controller: ed25519.Ed25519PrivateKey, path: str) -> None:
    request = _request(controller, _app_device(app), _status_argv(verb="stage", path=path))
    code = _refusal(app, app.handle(request, "a" * 32, now=NOW), request)
    assert code == "mailbox_forbidden"
    ok = _request(controller, _app_device(app), _status_argv(
        verb="stage", path=f"{ROOT}/incoming/{'0' * 64}.fpkg"), rid="b" * 32)
    ans = mb.verify_answer(app.handle(ok, "b" * 32, now=NOW), rid="b" * 32, request=ok,
                           device_key=_app_device(app).public_key())
    assert ans.exit_code == 0


def test_stage_of_a_link_in_incoming_is_refused(app: AppMailbox,
                                                controller: ed25519.Ed25519PrivateKey) -> None:
    incoming = app.container / ROOT / "incoming"
    incoming.mkdir()
    (incoming / "evil.fpkg").symlink_to("/etc/passwd")
    request = _request(controller, _app_device(app), _status_argv(
        verb="stage", path=f"{ROOT}/incoming/evil.fpkg"))
    assert _refusal(app, app.handle(request, "a" * 32, now=NOW), request) == \
        "mailbox_forbidden"


@pytest.mark.parametrize("argv", [
    _status_argv(verb="serve"), _status_argv(root="/tmp/other-root"),
    _status_argv(verb="lora generate", socket="/tmp/evil.sock", prompts=["x"])],
    ids=["serve", "foreign-root", "socket-path"])
def test_verbs_and_arguments_the_mailbox_never_runs(
        app: AppMailbox, controller: ed25519.Ed25519PrivateKey, argv: list[str]) -> None:
    request = _request(controller, _app_device(app), argv)
    assert _refusal(app, app.handle(request, "a" * 32, now=NOW), request) == \
        "mailbox_forbidden"


def test_bootstrap_enroll_pins_the_key_that_signed_it(tmp_path: Path) -> None:
    """No pinned key yet: an enroll signed by the key it asks to pin runs (the real agent),
    and the answer is signed by the new device key, which it reports."""
    controller = ed25519.Ed25519PrivateKey.generate()
    app = AppMailbox(tmp_path, ROOT)
    argv = _status_argv(verb="enroll", controller_pub=public_pem(controller.public_key()))
    request = mb.sign_request(controller, rid="a" * 32, argv=argv, device=None, now=time.time())
    ans = mb.verify_answer(app.handle(request, "a" * 32), rid="a" * 32, request=request,
                           device_key=None)
    mb.check_enroll_answer(ans, "a" * 32)
    assert json.loads(ans.stdout)["ok"] is True
    assert app.trusted()[0].public_bytes_raw() == controller.public_key().public_bytes_raw()


def test_bootstrap_enroll_signed_by_another_key_is_refused(tmp_path: Path) -> None:
    app = AppMailbox(tmp_path, ROOT, Recorder())
    victim_pub = public_pem(ed25519.Ed25519PrivateKey.generate().public_key())
    argv = _status_argv(verb="enroll", controller_pub=victim_pub)
    request = mb.sign_request(ed25519.Ed25519PrivateKey.generate(), rid="a" * 32, argv=argv,
                              device=None, now=time.time())
    answer = json.loads(app.handle(request, "a" * 32))
    assert "sig" not in answer  # no device key yet: an unsigned refusal
    doc = json.loads(base64.b64decode(answer["stdout_b64"]))
    assert doc["error"]["code"] == "mailbox_bad_signature"
    assert not (tmp_path / ROOT / "identity" / "controller.pub").exists()


def test_unenrolled_app_runs_nothing_but_enroll(tmp_path: Path) -> None:
    controller = ed25519.Ed25519PrivateKey.generate()
    app = AppMailbox(tmp_path, ROOT, Recorder())
    request = mb.sign_request(controller, rid="a" * 32, argv=_status_argv(), device=None,
                              now=time.time())
    doc = json.loads(base64.b64decode(json.loads(app.handle(request, "a" * 32))["stdout_b64"]))
    assert doc["error"]["code"] == "mailbox_bad_signature"
    assert isinstance(app.run, Recorder) and app.run.calls == []


# -- the controller side over a local folder ----------------------------------------------------
class FolderIO:
    def write_bytes(self, p: str, d: bytes) -> None:
        Path(p).parent.mkdir(parents=True, exist_ok=True)
        Path(p).write_bytes(d)

    def read_bytes(self, p: str) -> bytes | None:
        return Path(p).read_bytes() if Path(p).exists() else None

    def rename(self, a: str, b: str) -> None:
        Path(a).rename(b)

    def remove(self, p: str) -> None:
        Path(p).unlink(missing_ok=True)


@pytest.fixture
def peer(app: AppMailbox) -> Iterator[Path]:
    """The app answering its folder mailbox (``<container>/Documents/fleet``)."""
    base = app.container / "Documents" / "fleet"
    (base / "inbox").mkdir(parents=True, exist_ok=True)
    (base / "outbox").mkdir(parents=True, exist_ok=True)
    stop = threading.Event()

    def serve() -> None:
        while not stop.wait(0.02):
            for req in (base / "inbox").glob("*.json"):
                answer = app.handle(req.read_bytes(), req.stem)
                (base / "outbox" / f".{req.stem}.tmp").write_bytes(answer)
                (base / "outbox" / f".{req.stem}.tmp").rename(base / "outbox" / req.name)
                req.unlink()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield base
    stop.set()
    t.join()


def test_controller_round_trip_through_a_folder(app: AppMailbox, peer: Path,
                                                controller: ed25519.Ed25519PrivateKey) -> None:
    creds = mb.MailboxCredentials(lambda: controller, _app_device(app).public_key())
    res = Mailbox(FolderIO(), str(peer), creds, poll_s=0.01).run(_status_argv(), timeout=10)
    assert res.exit_code == 0 and json.loads(res.stdout)["verb"] == "status"
    assert list((peer / "outbox").iterdir()) == []


def test_controller_refuses_an_answer_from_another_device(
        app: AppMailbox, peer: Path, controller: ed25519.Ed25519PrivateKey) -> None:
    """The registry holds another key than the one answering (a swapped app)."""
    creds = mb.MailboxCredentials(lambda: controller,
                                  ec.generate_private_key(ec.SECP256R1()).public_key())
    with pytest.raises(errors.MailboxBadSignatureError):
        Mailbox(FolderIO(), str(peer), creds, poll_s=0.01).run(_status_argv(), timeout=10)


def test_controller_without_a_device_key_sends_only_enroll(
        tmp_path: Path, controller: ed25519.Ed25519PrivateKey) -> None:
    box = Mailbox(FolderIO(), str(tmp_path), mb.MailboxCredentials(lambda: controller, None))
    with pytest.raises(errors.KeyMaterialError, match="enroll it first"):
        box.run(_status_argv(), timeout=1)
    with pytest.raises(errors.KeyMaterialError, match="signed with the controller's key"):
        Mailbox(FolderIO(), str(tmp_path)).run(_status_argv(), timeout=1)
    assert not (tmp_path / "inbox").exists() or list((tmp_path / "inbox").iterdir()) == []


# -- the real emulated iPhone (lab: usbmuxd, lockdownd, house_arrest, AFC) -------------------
def _await(t: IosTransport, path: str, timeout: float = 30.0) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = t.read_bytes(path)
        if data is not None:
            t.remove(path)
            return data
        time.sleep(0.05)
    raise AssertionError(f"no answer at {path}")


def _drop(t: IosTransport, box: Mailbox, rid: str, data: bytes) -> str:
    """A file written into the inbox over AFC, as anyone paired with the phone can."""
    t.write_bytes(f"{box.inbox}/.{rid}.json.tmp", data)
    t.rename(f"{box.inbox}/.{rid}.json.tmp", f"{box.inbox}/{rid}.json")
    return f"{box.outbox}/{rid}.json"


@pytest.mark.timeout(180)
def test_lab_iphone_refuses_unsigned_and_replayed_requests_and_forged_answers(
        ios_lab: IosLab) -> None:
    phone = ios_lab.phones(1)[0]
    evil = ed25519.Ed25519PrivateKey.generate()
    with ios_lab.transport(phone) as t:
        creds = t.options.mailbox
        assert creds is not None and creds.device_key is not None
        box = Mailbox(io=t, base=MAILBOX_BASE, credentials=creds)
        # a genuine request runs; keep its bytes
        posted = box.post(_status_argv(), timeout=60)
        assert json.loads(box.accept(posted, _await(t, posted.answer_path)).stdout)["ok"]

        # 1. unsigned: the trust-replace case's request, no key, no signature
        rid = mb.new_request_id()
        unsigned = json.dumps({"schema": mb.SCHEMA, "id": rid, "argv": _status_argv(
            verb="enroll", controller_pub=public_pem(evil.public_key()),
            replace_trust=True)}).encode()
        ans = mb.verify_answer(_await(t, _drop(t, box, rid, unsigned)), rid=rid,
                               request=unsigned, device_key=creds.device_key)
        assert json.loads(ans.stdout)["error"]["code"] == "mailbox_unsigned"

        # 2. replayed: the genuine request's exact bytes, dropped again
        ans = mb.verify_answer(_await(t, _drop(t, box, posted.rid, posted.request)),
                               rid=posted.rid, request=posted.request,
                               device_key=creds.device_key)
        assert json.loads(ans.stdout)["error"]["code"] == "mailbox_replay"

    # 3. forged answer: the app is suspended; a forger answers "up to date" first
    container = ios_lab.container(phone) / MAILBOX_BASE
    stop = threading.Event()

    def forger() -> None:
        while not stop.wait(0.02):
            for req in (container / "inbox").glob("*.json"):
                doc = {"schema": "fleet.agent/1", "ok": True, "verb": "status",
                       "installed": {"tiny": {"version": 99}}}
                forged = {"schema": mb.SCHEMA, "id": req.stem, "exit_code": 0,
                          "request_sha256": mb.request_sha256(req.read_bytes()),
                          "stdout_b64": base64.b64encode(json.dumps(doc).encode()).decode(),
                          "stderr_b64": "", "duration_ms": 1}
                (container / "outbox" / f"{req.stem}.json").write_text(json.dumps(forged))
                req.unlink()

    thread = threading.Thread(target=forger, daemon=True)
    try:
        ios.set_app(ios_lab.home, phone.name, "mute")
        thread.start()
        with ios_lab.transport(phone) as t, pytest.raises(errors.MailboxUnsignedError):
            t.run(_status_argv(), timeout=30)
    finally:
        stop.set()
        thread.join()
        ios_lab.heal(phone.name)
    assert list((container / "outbox").glob("*.json")) == []  # the refused answer is gone
    # the trust was not replaced: the real controller still runs verbs
    with ios_lab.transport(phone) as t:
        assert json.loads(t.run(_status_argv(), timeout=60).stdout)["ok"] is True
