"""Device URIs: ``local://NAME?root=DIR``, ``ssh://user@host:port``, ``adb://SERIAL``,
``ios://UDID?bundle=APP_ID``, and ``pull://NAME`` (a device that polls ``fleet server``;
no transport reaches it). Parsing is pure and strict: a malformed URI is refused here,
before anything is registered or contacted."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

from fleet.core import errors

__all__ = ["KNOWN_SCHEMES", "DeviceUri", "parse_uri"]

KNOWN_SCHEMES = ("local", "ssh", "adb", "ios", "pull")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")


@dataclass(frozen=True)
class DeviceUri:
    scheme: str
    host: str  #: local: device name; ssh: host; adb: serial; ios: udid
    user: str | None = None
    port: int | None = None
    query: dict[str, str] = field(default_factory=dict)
    raw: str = ""

    @property
    def platform(self) -> str:
        return {"local": "linux", "ssh": "linux", "adb": "android", "ios": "ios",
                "pull": self.query.get("platform", "linux")}[self.scheme]


def parse_uri(uri: str) -> DeviceUri:
    if any(ord(c) < 0x20 or c == "\x7f" for c in uri):
        # urlsplit silently drops tabs and newlines: "local://a\n?.." would pass as "a"
        raise errors.MalformedUriError(f"control character in URI {uri!r}", uri=uri)
    if "://" not in uri:
        raise errors.MalformedUriError(
            f"not a device URI: {uri!r} (expected scheme://..., e.g. ssh://user@host:22)",
            uri=uri)
    scheme = uri.split("://", 1)[0].lower()
    if scheme not in KNOWN_SCHEMES:
        raise errors.UnknownSchemeError(
            f"unknown transport scheme {scheme!r} in {uri!r}; known: {', '.join(KNOWN_SCHEMES)}",
            uri=uri, scheme=scheme)
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as exc:
        raise errors.MalformedUriError(f"malformed URI {uri!r}: {exc}", uri=uri) from exc
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    if scheme == "adb":
        # serials such as 127.0.0.1:5555 contain a colon: take the raw netloc
        host = parts.netloc
        port = None
    else:
        host = parts.hostname or ""
    if not host or not _NAME.fullmatch(host):
        raise errors.MalformedUriError(f"URI {uri!r} has no valid device/host part", uri=uri)
    if scheme == "ssh" and not parts.username:
        raise errors.MalformedUriError(f"ssh URI needs a user: ssh://user@{host}", uri=uri)
    if scheme == "local" and "root" not in query:
        raise errors.MalformedUriError(
            f"local URI needs a device root: local://{host}?root=/path", uri=uri)
    if scheme == "ios" and "bundle" not in query:
        raise errors.MalformedUriError(
            f"ios URI needs the app's bundle id: ios://{host}?bundle=com.example.app", uri=uri)
    if scheme == "pull" and query.get("platform", "linux") not in ("linux", "android", "ios"):
        raise errors.MalformedUriError(
            f"pull URI platform must be linux, android or ios: {uri!r}", uri=uri)
    if parts.path not in ("", "/"):
        raise errors.MalformedUriError(f"URI {uri!r} must not have a path", uri=uri)
    return DeviceUri(scheme=scheme, host=host, user=parts.username, port=port, query=query,
                     raw=uri)
