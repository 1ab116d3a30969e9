"""The signed manifest: what a package holds and how its data key reaches a device.

``Manifest.from_dict`` validates every field (types, ranges, file layout, names safe to
use as directory names) and is the only way a device turns signed JSON into an object.

Two forms (``docs/package-format.md``). Format 2 (``fleet.package/2``, what the
controller builds): no recipient is named; the manifest commits to the data key
(``key_commitment``) and each device gets its wrapped key in a small per-device envelope
(:mod:`.envelope`) bound to the manifest's digest, so the manifest's size does not grow
with the fleet. Format 1 (``fleet.package/1``, still read): every recipient's wrapped key
in ``recipients``. The manifest without ``recipients`` is the *content*; its digest is
what a wrapped key is bound to (in format 2 the content is the whole manifest).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from fleet.core import errors
from fleet.core.package.canonical import canonical_bytes

__all__ = ["CIPHER", "KEY_WRAP", "KEY_WRAPS", "KINDS", "MANIFEST_TYPE", "MANIFEST_TYPES",
           "FileEntry", "Manifest", "WrappedKey", "chunk_count"]

#: manifest type and key wrap per package format (1: inline wraps, 2: envelopes)
MANIFEST_TYPES = {1: "fleet.package/1", 2: "fleet.package/2"}
KEY_WRAPS = {1: "ECDH-P256+HKDF-SHA256+AES-KW/1", 2: "ECDH-P256+HKDF-SHA256+AES-KW/2"}
MANIFEST_TYPE = MANIFEST_TYPES[1]
KEY_WRAP = KEY_WRAPS[1]
CIPHER = "AES-256-GCM-CHUNKED/1"
KINDS = ("model", "lora")
#: A model name (docs/package-format.md, "Model names"): a Unicode letter or digit, then
#: letters, digits, ``.``, ``_``, ``-`` and the combining marks of the listed blocks
#: (diacritics; Hebrew, Arabic, Indic, Thai/Lao, Tibetan, Myanmar, Khmer and kana marks);
#: 64 characters; checked with ``re.fullmatch`` (``$`` would let a trailing newline in),
#: with NFC and at most 192 UTF-8 bytes on top (``valid_name``).
_NAME_MARKS = ("\u0300-\u036f\u0483-\u0489\u0591-\u05c7\u0610-\u061a\u064b-\u065f"
               "\u0670\u06d6-\u06ed\u0900-\u0dff\u0e00-\u0eff\u0f00-\u0fff"
               "\u1000-\u109f\u1780-\u17ff\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff"
               "\u302a-\u302f\u3099\u309a\ufe20-\ufe2f")
_NAME = re.compile(rf"[^\W_][\w.\-{_NAME_MARKS}]{{0,63}}")
_NAME_MAX_BYTES = 192
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_FP = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}$")
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")


def chunk_count(size: int, chunk_size: int) -> int:
    """Number of chunks: an empty payload is one empty chunk, so the last flag exists."""
    return max(1, -(-size // chunk_size))


def _want(cond: bool, msg: str, **details: Any) -> None:
    if not cond:
        raise errors.FormatError(f"manifest: {msg}", **details)


def _int(d: dict[str, Any], key: str, lo: int = 0) -> int:
    v = d.get(key)
    _want(isinstance(v, int) and not isinstance(v, bool) and v >= lo,
          f"{key} must be an integer >= {lo}", field=key)
    return int(v)  # type: ignore[arg-type]


def _str(d: dict[str, Any], key: str, pattern: re.Pattern[str] | None = None) -> str:
    v = d.get(key)
    _want(isinstance(v, str) and (pattern is None or bool(pattern.fullmatch(v))),
          f"{key} is missing or malformed", field=key)
    return str(v)


def _safe_path(p: Any) -> bool:
    if not isinstance(p, str) or not p or len(p) > 255 or p.startswith("/") or "\\" in p:
        return False
    return all(part not in ("", ".", "..") for part in p.split("/")) and "\x00" not in p


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str
    offset: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256,
                "offset": self.offset}


@dataclass(frozen=True)
class WrappedKey:
    epk: str  # base64 of the ephemeral P-256 public key, X9.62 uncompressed (65 bytes)
    wrapped_key: str  # base64 of the RFC 3394 wrapped 32-byte data key (40 bytes)

    def to_dict(self) -> dict[str, Any]:
        return {"epk": self.epk, "wrapped_key": self.wrapped_key}


@dataclass(frozen=True)
class Manifest:
    package_id: str
    name: str
    kind: str
    version: int
    sequence: int
    created: str
    size: int
    sha256: str
    chunk_size: int
    files: tuple[FileEntry, ...]
    entry: str
    signer: str
    recipients: dict[str, WrappedKey] = field(default_factory=dict)
    mnn: dict[str, Any] | None = None
    golden: str | None = None
    base: dict[str, Any] | None = None
    #: ``YYYY-MM-DDTHH:MM:SSZ``; None only in manifests signed before expiry existed
    #: (they still parse, so stored packages open, but a device never stages one)
    expires: str | None = None
    #: 1: ``recipients`` holds every wrapped key; 2: per-device envelopes, and
    #: ``key_commitment`` (64 hex) commits to the data key (:mod:`.envelope`)
    format: int = 1
    key_commitment: str | None = None

    @property
    def chunks(self) -> int:
        return chunk_count(self.size, self.chunk_size)

    @property
    def uses_envelopes(self) -> bool:
        """Format 2: the data key comes in a per-device envelope, not in the manifest."""
        return self.format == 2

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise errors.NotFoundError(f"no file {path!r} in package {self.name}", path=path)

    def content_dict(self) -> dict[str, Any]:
        """Every field but ``recipients``: what the wrapped keys are bound to."""
        extra: dict[str, Any] = {}
        if self.expires is not None:
            extra["expires"] = self.expires
        if self.format == 2:
            extra["key_commitment"] = self.key_commitment
        return {
            "type": MANIFEST_TYPES[self.format], "id": self.package_id, "name": self.name,
            "kind": self.kind, "version": self.version, "sequence": self.sequence,
            "created": self.created,
            "payload": {"size": self.size, "sha256": self.sha256,
                        "chunk_size": self.chunk_size, "chunks": self.chunks,
                        "cipher": CIPHER},
            "files": [f.to_dict() for f in self.files], "entry": self.entry,
            "mnn": self.mnn, "golden": self.golden, "base": self.base,
            "signer": self.signer, "key_wrap": KEY_WRAPS[self.format], **extra,
        }

    def content_digest(self) -> bytes:
        """SHA-256 of the canonical content: the HKDF salt of every wrap. In format 2 the
        content is the whole manifest, so this is the digest of the signed manifest bytes
        (what an envelope names)."""
        return hashlib.sha256(canonical_bytes(self.content_dict())).digest()

    def to_dict(self) -> dict[str, Any]:
        d = self.content_dict()
        if self.format == 1:
            d["recipients"] = {fp: w.to_dict() for fp, w in sorted(self.recipients.items())}
        return d

    def to_bytes(self) -> bytes:
        return canonical_bytes(self.to_dict())

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        _want(isinstance(d, dict), "not a JSON object")
        fmt = next((f for f, t in MANIFEST_TYPES.items() if d.get("type") == t), None)
        _want(fmt is not None, f"type must be one of {sorted(MANIFEST_TYPES.values())}",
              type=d.get("type"))
        assert fmt is not None
        _want(d.get("key_wrap") == KEY_WRAPS[fmt], "unknown key wrap",
              key_wrap=d.get("key_wrap"))
        payload = d.get("payload")
        _want(isinstance(payload, dict), "payload must be an object")
        _want(payload.get("cipher") == CIPHER, "unknown cipher", cipher=payload.get("cipher"))
        size = _int(payload, "size")
        chunk_size = _int(payload, "chunk_size", 1)
        _want(payload.get("chunks") == chunk_count(size, chunk_size),
              "payload.chunks does not match size / chunk_size")
        kind = _str(d, "kind")
        _want(kind in KINDS, f"kind must be one of {KINDS}", kind=kind)
        files = cls._files(d.get("files"), size)
        entry = _str(d, "entry")
        _want(any(f.path == entry for f in files), "entry names no file", entry=entry)
        golden = d.get("golden")
        _want(golden is None or any(f.path == golden for f in files),
              "golden names no file", golden=golden)
        for opt in ("mnn", "base"):
            _want(d.get(opt) is None or isinstance(d.get(opt), dict), f"{opt} must be an object")
        _want(kind != "lora" or isinstance(d.get("base"), dict),
              "a lora package must carry its base binding")
        recipients = cls._recipients(d.get("recipients")) if fmt == 1 else {}
        commitment = _str(d, "key_commitment", _HEX64) if fmt == 2 else None
        _want(cls.valid_name(d.get("name")), "name is missing or malformed",
              field="name")
        expires = d.get("expires")
        _want("expires" not in d or (isinstance(expires, str)
                                     and _TIME.fullmatch(expires) is not None),
              "expires must be YYYY-MM-DDTHH:MM:SSZ", field="expires")
        m = cls(package_id=_str(d, "id", re.compile(r"^[0-9a-f]{32}$")),
                name=_str(d, "name"), kind=kind, version=_int(d, "version", 1),
                sequence=_int(d, "sequence"), created=_str(d, "created"), size=size,
                sha256=_str(payload, "sha256", _HEX64), chunk_size=chunk_size,
                files=files, entry=entry, signer=_str(d, "signer", _FP),
                recipients=recipients, mnn=d.get("mnn"), golden=golden, base=d.get("base"),
                expires=expires, format=fmt, key_commitment=commitment)
        _want(m.to_dict() == d, "unknown or extra fields")
        return m

    @staticmethod
    def _recipients(raw: Any) -> dict[str, WrappedKey]:
        _want(isinstance(raw, dict) and len(raw) > 0, "no recipients")
        out: dict[str, WrappedKey] = {}
        for fp, w in raw.items():
            _want(bool(_FP.fullmatch(fp)) and isinstance(w, dict)
                  and isinstance(w.get("epk"), str) and isinstance(w.get("wrapped_key"), str)
                  and set(w) == {"epk", "wrapped_key"}, "malformed recipient", recipient=fp)
            out[fp] = WrappedKey(epk=w["epk"], wrapped_key=w["wrapped_key"])
        return out

    @staticmethod
    def _files(raw: Any, size: int) -> tuple[FileEntry, ...]:
        _want(isinstance(raw, list) and len(raw) > 0, "files must be a non-empty list")
        out: list[FileEntry] = []
        offset = 0
        seen: set[str] = set()
        for f in raw:
            _want(isinstance(f, dict) and set(f) == {"path", "size", "sha256", "offset"},
                  "malformed file entry")
            path = f["path"]
            _want(_safe_path(path), "unsafe file path", path=path)
            _want(path not in seen, "duplicate file path", path=path)
            seen.add(path)
            fsize = _int(f, "size")
            _want(_int(f, "offset") == offset, "files must tile the payload in order",
                  path=path)
            out.append(FileEntry(path=path, size=fsize, sha256=_str(f, "sha256", _HEX64),
                                 offset=offset))
            offset += fsize
        _want(offset == size, "file sizes do not add up to the payload size")
        return tuple(out)

    @staticmethod
    def valid_name(name: object) -> bool:
        """A name safe as a device directory name and one-to-one with what people type."""
        return (isinstance(name, str) and _NAME.fullmatch(name) is not None
                and unicodedata.is_normalized("NFC", name)
                and len(name.encode("utf-8")) <= _NAME_MAX_BYTES)
