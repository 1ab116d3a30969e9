"""The authenticated mailbox, pure: documents, signatures, freshness, replay window.

App agents (iOS, Android apps that embed the agent) are reached through a file mailbox:
whoever can write the app's ``inbox/`` (a paired host, adb, shared storage, a sync tool)
could otherwise run agent verbs, and whoever can write ``outbox/`` could answer for the
device. So every request is signed by the controller's online Ed25519 key and names the
device's key fingerprint, a random nonce and an expiry; every answer is signed by the
device's P-256 key (ECDSA-SHA256) and bound to the exact bytes of its request. The
format, the checks and their order are ``docs/agent-protocol.md`` ("Mailbox").

Everything here works on bytes, keys and a clock value given by the caller (no I/O), in
the manner of python-tuf's trusted metadata set: the controller (:mod:`fleet.mailbox`)
and the app side (:mod:`fleet_agent.mailbox_auth`) move files and call these. Signed
bytes are a domain tag followed by the canonical JSON of the document without ``sig``
(:func:`fleet.core.package.canonical.canonical_bytes`), so a manifest or rollback-order
signature by the same key can never pass for a mailbox request.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fleet.core import errors
from fleet.core.package.canonical import canonical_bytes
from fleet.core.package.keyid import fingerprint_public_key
from fleet.core.protocol import decode_args

__all__ = [
    "AGENT_ARGV0",
    "ANSWER_DOMAIN",
    "BOOTSTRAP_VERB",
    "CLOCK_TOLERANCE_S",
    "DEFAULT_TTL_S",
    "MAX_TTL_S",
    "REQUEST_DOMAIN",
    "SCHEMA",
    "AgentCall",
    "Answer",
    "MailboxCredentials",
    "Request",
    "check_addressed",
    "check_enroll_answer",
    "check_replay",
    "new_request_id",
    "parse_agent_argv",
    "request_id_of",
    "request_sha256",
    "sign_answer",
    "sign_request",
    "verify_answer",
    "verify_request",
]

SCHEMA = "fleet.mailbox/2"
AGENT_ARGV0 = "fleet-agent"
REQUEST_DOMAIN = b"fleet.mailbox/2 request\n"
ANSWER_DOMAIN = b"fleet.mailbox/2 answer\n"
#: seconds a request lives after the controller signs it (the app must take it by then)
DEFAULT_TTL_S = 600
#: the longest life an app accepts: a request expiring later is refused, so the nonce
#: store never has to remember a nonce for longer than this (plus the tolerance)
MAX_TTL_S = 3600
#: the clock difference between controller and device that expiry checks allow
CLOCK_TOLERANCE_S = 120
#: the bootstrap verb: the one request an app with no pinned key, or addressed to no
#: device key, may run (``docs/agent-protocol.md``, "Enrollment over the mailbox")
BOOTSTRAP_VERB = "enroll"

_ID = re.compile(r"[0-9a-f]{32}")
_NONCE = re.compile(r"[0-9a-f]{32,128}")
_FP = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_REQUEST_FIELDS: dict[str, type | tuple[type, ...]] = {
    "schema": str, "id": str, "argv": list, "timeout_s": int, "device": (str, type(None)),
    "nonce": str, "expires": int, "signer": str, "sig": str}
_ANSWER_FIELDS: dict[str, type | tuple[type, ...]] = {
    "schema": str, "id": str, "request_sha256": str, "exit_code": int, "stdout_b64": str,
    "stderr_b64": str, "duration_ms": int, "signer": str, "sig": str}


# -- credentials (controller side) ---------------------------------------------------------
@dataclass(frozen=True)
class MailboxCredentials:
    """What the controller needs to talk to one app: its online signing key (loaded when
    first needed, so a transport that never uses a mailbox never reads it) and the
    device's registered public key, ``None`` until the device is enrolled (then only
    ``enroll`` may be sent: the bootstrap)."""

    signing_key: Callable[[], ed25519.Ed25519PrivateKey]
    device_key: ec.EllipticCurvePublicKey | None = None
    ttl_s: int = DEFAULT_TTL_S

    @classmethod
    def for_device(cls, signing_key: Callable[[], ed25519.Ed25519PrivateKey],
                   device_pem: str | None, *, ttl_s: int = DEFAULT_TTL_S
                   ) -> MailboxCredentials:
        key = None
        if device_pem:
            try:
                loaded = serialization.load_pem_public_key(device_pem.encode())
            except ValueError as exc:
                raise errors.KeyMaterialError("registered device key is not a PEM public "
                                              "key") from exc
            if not isinstance(loaded, ec.EllipticCurvePublicKey):
                raise errors.KeyMaterialError("registered device key is not a P-256 key")
            key = loaded
        return cls(signing_key, key, ttl_s)


# -- small helpers -------------------------------------------------------------------------
def new_request_id() -> str:
    return secrets.token_hex(16)


def request_sha256(request_bytes: bytes) -> str:
    """What an answer is bound to: the SHA-256 of the request file's exact bytes."""
    return hashlib.sha256(request_bytes).hexdigest()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str, field: str, cls: type[errors.MailboxAuthError], rid: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise cls(f"mailbox {field} of {rid} is not base64", request_id=rid,
                  field=field) from exc


def _load(data: bytes, what: str, rid: str | None) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise errors.MailboxMalformedError(f"mailbox {what} is not JSON: {exc}",
                                           request_id=rid) from exc
    if not isinstance(doc, dict):
        raise errors.MailboxMalformedError(f"mailbox {what} is not a JSON object",
                                           request_id=rid)
    return doc


def _fields(doc: dict[str, Any], spec: Mapping[str, type | tuple[type, ...]], what: str,
            rid: str | None) -> None:
    if doc.get("schema") != SCHEMA:
        raise errors.MailboxMalformedError(
            f"mailbox {what} is not a {SCHEMA} document (schema {doc.get('schema')!r})",
            request_id=rid, schema=doc.get("schema"))
    missing = sorted(k for k in spec if k not in doc)
    wrong = sorted(k for k, t in spec.items() if k in doc and (
        not isinstance(doc[k], t) or (t is int and isinstance(doc[k], bool))))
    if missing or wrong:
        raise errors.MailboxMalformedError(
            f"mailbox {what} {rid or ''} lacks {', '.join(missing) or '-'}; wrong type: "
            f"{', '.join(wrong) or '-'}", request_id=rid, missing=missing, wrong=wrong)


def _signing_input(domain: bytes, doc: Mapping[str, Any]) -> bytes:
    body = {k: v for k, v in doc.items() if k != "sig"}
    try:
        return domain + canonical_bytes(body)
    except errors.FormatError as exc:
        raise errors.MailboxMalformedError(f"mailbox document cannot be signed: {exc}",
                                           request_id=doc.get("id")) from exc


# -- requests ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """A request whose signature, address and expiry were checked (not yet the nonce:
    :func:`check_replay` does that against the app's persisted window)."""

    id: str
    argv: tuple[str, ...]
    stdin: bytes | None
    timeout_s: int
    device: str | None
    nonce: str
    expires: int
    signer: str


def sign_request(signing_key: ed25519.Ed25519PrivateKey, *, rid: str, argv: Sequence[str],
                 device: str | None, now: float, ttl_s: int = DEFAULT_TTL_S,
                 timeout_s: float = 600, stdin: bytes | None = None,
                 nonce: str | None = None) -> bytes:
    """The bytes of one signed request (what the controller writes to ``inbox/<id>.json``)."""
    doc: dict[str, Any] = {
        "schema": SCHEMA, "id": rid, "argv": list(argv), "timeout_s": max(1, int(timeout_s)),
        "device": device, "nonce": nonce or secrets.token_hex(16),
        "expires": int(now) + int(ttl_s),
        "signer": fingerprint_public_key(signing_key.public_key())}
    if stdin is not None:
        doc["stdin_b64"] = _b64(stdin)
    doc["sig"] = _b64(signing_key.sign(_signing_input(REQUEST_DOMAIN, doc)))
    return canonical_bytes(doc)


def request_id_of(data: bytes) -> str | None:
    """The ``id`` a request claims, if it has a readable one (to address a refusal)."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        return None
    rid = doc.get("id") if isinstance(doc, dict) else None
    return rid if isinstance(rid, str) and _ID.fullmatch(rid) else None


def verify_request(data: bytes, *, trusted: Sequence[ed25519.Ed25519PublicKey],
                   device: str | None, now: float,
                   tolerance_s: int = CLOCK_TOLERANCE_S) -> Request:
    """Check one request, in this order: a JSON object; signed (else
    :class:`~fleet.core.errors.MailboxUnsignedError`); the fields (``Malformed``); signed
    by a ``trusted`` key (``BadSignature``); addressed to ``device``, this app's key
    fingerprint, or to none for the bootstrap verb only (``Misaddressed``, checked by
    :func:`check_addressed` once the verb is known); not expired and not living longer
    than :data:`MAX_TTL_S` (``Expired``)."""
    doc = _load(data, "request", None)
    rid = doc.get("id") if isinstance(doc.get("id"), str) else None
    if not doc.get("sig"):
        raise errors.MailboxUnsignedError(
            f"mailbox request {rid or '(no id)'} is not signed: refused", request_id=rid)
    _fields(doc, _REQUEST_FIELDS, "request", rid)
    assert rid is not None
    if not _ID.fullmatch(rid) or not _NONCE.fullmatch(doc["nonce"]):
        raise errors.MailboxMalformedError(f"mailbox request {rid!r}: bad id or nonce",
                                           request_id=rid)
    argv = doc["argv"]
    if not argv or not all(isinstance(a, str) for a in argv):
        raise errors.MailboxMalformedError(f"mailbox request {rid}: argv is not a list of "
                                           "strings", request_id=rid)
    stdin = None
    if doc.get("stdin_b64") is not None:
        if not isinstance(doc["stdin_b64"], str):
            raise errors.MailboxMalformedError(f"mailbox request {rid}: stdin_b64",
                                               request_id=rid)
        stdin = _unb64(doc["stdin_b64"], "stdin_b64", errors.MailboxMalformedError, rid)
    signer = doc["signer"]
    key = next((k for k in trusted if fingerprint_public_key(k) == signer), None)
    expected = [fingerprint_public_key(k) for k in trusted]
    if key is None:
        raise errors.MailboxBadSignatureError(
            f"mailbox request {rid} is signed by {signer}; this app trusts "
            f"{', '.join(expected) or 'no controller key'}", request_id=rid, signer=signer,
            expected=expected)
    sig = _unb64(doc["sig"], "sig", errors.MailboxBadSignatureError, rid)
    try:
        key.verify(sig, _signing_input(REQUEST_DOMAIN, doc))
    except InvalidSignature as exc:
        raise errors.MailboxBadSignatureError(
            f"mailbox request {rid}: signature does not verify (changed after signing, or "
            "not signed by the key it names)", request_id=rid, signer=signer,
            expected=expected) from exc
    if doc["device"] is not None and doc["device"] != device:
        raise errors.MailboxMisaddressedError(
            f"mailbox request {rid} is for device {doc['device']}, this app is "
            f"{device or 'not enrolled'}", request_id=rid, addressed=doc["device"],
            device=device)
    expires = doc["expires"]
    if now > expires + tolerance_s:
        raise errors.MailboxExpiredError(
            f"mailbox request {rid} expired {int(now - expires)} s ago (tolerance "
            f"{tolerance_s} s); if the device clock is wrong, set it", request_id=rid,
            expires=expires, device_time=int(now), tolerance_s=tolerance_s)
    if expires > now + MAX_TTL_S + tolerance_s:
        raise errors.MailboxExpiredError(
            f"mailbox request {rid} claims to live until {expires}, more than {MAX_TTL_S} s "
            f"past this device's clock ({int(now)}); if the device clock is behind, set it",
            request_id=rid, expires=expires, device_time=int(now), tolerance_s=tolerance_s)
    return Request(id=rid, argv=tuple(argv), stdin=stdin, timeout_s=doc["timeout_s"],
                   device=doc["device"], nonce=doc["nonce"], expires=expires, signer=signer)


def check_addressed(req: Request, verb: str) -> None:
    """A request addressed to no device key may run only the bootstrap verb."""
    if req.device is None and verb != BOOTSTRAP_VERB:
        raise errors.MailboxMisaddressedError(
            f"mailbox request {req.id} names no device key: only {BOOTSTRAP_VERB} may be "
            f"sent that way, not {verb!r}", request_id=req.id, verb=verb)


def check_replay(req: Request, seen: Mapping[str, int], now: float,
                 tolerance_s: int = CLOCK_TOLERANCE_S) -> dict[str, int]:
    """Refuse a nonce already in ``seen`` (nonce -> the request's ``expires``); return the
    window to persist: ``seen`` without entries past expiry + tolerance, plus this one.
    An entry can be forgotten then because :func:`verify_request` refuses the request
    from that moment on anyway."""
    if req.nonce in seen:
        raise errors.MailboxReplayError(
            f"mailbox request {req.id}: nonce already used (a replayed request)",
            request_id=req.id, nonce=req.nonce)
    kept = {n: e for n, e in seen.items() if e + tolerance_s >= now}
    kept[req.nonce] = req.expires
    return kept


# -- the agent command a request carries -----------------------------------------------------
@dataclass(frozen=True)
class AgentCall:
    """``fleet-agent [--root R] VERB [SUB] [--args-b64 B64 | --args JSON]``, parsed
    strictly: the app runs the verb with arguments it re-encodes itself, never the argv
    it received, so no parser difference can smuggle an option through."""

    root: str | None
    verb: str
    args: dict[str, Any]


def parse_agent_argv(argv: Sequence[str], stdin: bytes | None = None,
                     rid: str | None = None) -> AgentCall:
    if not argv or argv[0] != AGENT_ARGV0:
        raise errors.MailboxForbiddenError(
            f"this app runs only {AGENT_ARGV0}, not {(argv or [''])[0]!r}", request_id=rid,
            reason="not_agent")
    root: str | None = None
    args: dict[str, Any] | None = None
    words: list[str] = []
    it = iter(argv[1:])
    try:
        for word in it:
            if word == "--root" and root is None:
                root = next(it)
            elif word == "--args-b64" and args is None:
                args = decode_args(next(it))
            elif word == "--args" and args is None:
                parsed = json.loads(next(it))
                if not isinstance(parsed, dict):
                    raise ValueError("--args is not a JSON object")
                args = parsed
            elif word.startswith("-") or not re.fullmatch(r"[a-z]{1,32}", word):
                raise ValueError(f"unexpected word {word!r}")
            else:
                words.append(word)
        if args is None and stdin:
            parsed = json.loads(stdin)
            if not isinstance(parsed, dict):
                raise ValueError("stdin is not a JSON object")
            args = parsed
    except (StopIteration, ValueError, binascii.Error) as exc:
        raise errors.MailboxMalformedError(f"mailbox request {rid}: agent argv: {exc}",
                                           request_id=rid) from exc
    if not words or len(words) > 2 or (len(words) == 2 and words[0] != "lora"):
        raise errors.MailboxMalformedError(
            f"mailbox request {rid}: no single agent verb in argv ({' '.join(words)!r})",
            request_id=rid)
    return AgentCall(root, " ".join(words), args or {})


# -- answers -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Answer:
    exit_code: int
    stdout: bytes
    stderr: bytes
    duration_s: float
    signer: str
    signer_key: ec.EllipticCurvePublicKey


def _pem(key: ec.EllipticCurvePublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def sign_answer(device_key: ec.EllipticCurvePrivateKey, *, rid: str, request: bytes,
                exit_code: int, stdout: bytes, stderr: bytes, duration_s: float,
                with_public_key: bool = False) -> bytes:
    """The bytes of one signed answer (``outbox/<id>.json``). ``with_public_key`` adds
    ``signer_pub`` (PEM): the enrollment bootstrap, where the controller has no key yet."""
    pub = device_key.public_key()
    doc: dict[str, Any] = {
        "schema": SCHEMA, "id": rid, "request_sha256": request_sha256(request),
        "exit_code": int(exit_code), "stdout_b64": _b64(stdout), "stderr_b64": _b64(stderr),
        "duration_ms": max(0, int(duration_s * 1000)),
        "signer": fingerprint_public_key(pub)}
    if with_public_key:
        doc["signer_pub"] = _pem(pub)
    sig = device_key.sign(_signing_input(ANSWER_DOMAIN, doc), ec.ECDSA(hashes.SHA256()))
    doc["sig"] = _b64(sig)
    return canonical_bytes(doc)


def _bootstrap_key(doc: dict[str, Any], rid: str) -> ec.EllipticCurvePublicKey:
    pem = doc.get("signer_pub")
    try:
        key = serialization.load_pem_public_key(pem.encode()) if isinstance(pem, str) \
            else None
    except ValueError:
        key = None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise errors.MailboxMalformedError(
            f"mailbox answer {rid} to an enrollment carries no P-256 signer_pub",
            request_id=rid)
    return key


def verify_answer(data: bytes, *, rid: str, request: bytes,
                  device_key: ec.EllipticCurvePublicKey | None) -> Answer:
    """Check one answer, in this order: a JSON object; signed (else
    :class:`~fleet.core.errors.MailboxUnsignedError`); by ``device_key``, the device's
    registered key (``BadSignature``) — or, with ``device_key`` None (enrollment), by the
    ``signer_pub`` it carries, which the caller then pins; every field present with its
    type (``Malformed``); bound to this request: its ``id`` and the SHA-256 of the exact
    ``request`` bytes (``UnboundAnswer``)."""
    doc = _load(data, "answer", rid)
    if not doc.get("sig"):
        raise errors.MailboxUnsignedError(
            f"mailbox answer to {rid} is not signed by the device: refused", request_id=rid)
    key = device_key if device_key is not None else _bootstrap_key(doc, rid)
    expected = fingerprint_public_key(key)
    if doc.get("signer") != expected:
        raise errors.MailboxBadSignatureError(
            f"mailbox answer to {rid} is signed by {doc.get('signer')}, the device's key "
            f"is {expected}", request_id=rid, signer=doc.get("signer"), expected=expected)
    sig = doc["sig"]
    raw = _unb64(sig, "sig", errors.MailboxBadSignatureError, rid) \
        if isinstance(sig, str) else b""
    try:
        key.verify(raw, _signing_input(ANSWER_DOMAIN, doc), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise errors.MailboxBadSignatureError(
            f"mailbox answer to {rid}: signature does not verify with the device's key "
            f"{expected} (forged, or changed after signing)", request_id=rid,
            signer=doc.get("signer"), expected=expected) from exc
    _fields(doc, _ANSWER_FIELDS, "answer", rid)
    if doc["id"] != rid or not _SHA256.fullmatch(doc["request_sha256"]) \
            or doc["request_sha256"] != request_sha256(request):
        raise errors.MailboxUnboundAnswerError(
            f"mailbox answer for {doc['id']} is not bound to request {rid} (request digest "
            "differs): refused", request_id=rid, answer_id=doc["id"])
    return Answer(exit_code=doc["exit_code"],
                  stdout=_unb64(doc["stdout_b64"], "stdout_b64",
                                errors.MailboxMalformedError, rid),
                  stderr=_unb64(doc["stderr_b64"], "stderr_b64",
                                errors.MailboxMalformedError, rid),
                  duration_s=doc["duration_ms"] / 1000, signer=expected, signer_key=key)


def check_enroll_answer(answer: Answer, rid: str) -> None:
    """Bootstrap: a successful ``enroll`` answer must report the key that signed it, so the
    key the controller pins is the one that holds the private half."""
    doc: Any = None
    for line in reversed(answer.stdout.decode("utf-8", "replace").splitlines()):
        if line.strip().startswith("{"):
            try:
                doc = json.loads(line)
                break
            except ValueError:
                continue
    if not isinstance(doc, dict) or not doc.get("ok"):
        return  # a refusal: nothing will be pinned
    reported = doc.get("fingerprint")
    try:
        pem = doc.get("public_key")
        key = serialization.load_pem_public_key(pem.encode()) if isinstance(pem, str) \
            else None
        pem_fp = fingerprint_public_key(key) if key is not None else None
    except ValueError:
        pem_fp = None
    if reported != answer.signer or pem_fp != answer.signer:
        raise errors.MailboxBadSignatureError(
            f"mailbox enrollment answer {rid} reports key {doc.get('fingerprint')} but is "
            f"signed by {answer.signer}: refused", request_id=rid,
            signer=answer.signer, reported=reported, public_key=pem_fp)
