"""Canonical JSON: the one byte form that is signed and hashed.

Keys sorted, no whitespace, UTF-8, no floats (their text form is not portable across
languages), no duplicate keys. A verifier re-encodes what it parsed and refuses bytes
that differ, so two parsers can never disagree about what was signed.
"""

from __future__ import annotations

import json
from typing import Any

from fleet.core import errors

__all__ = ["canonical_bytes", "parse_canonical"]


def _check(value: Any, where: str = "$") -> None:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, int):
        if abs(value) >= 2**63:
            raise errors.FormatError(f"integer out of range at {where}", where=where)
        return
    if isinstance(value, float):
        raise errors.FormatError(f"floats are not allowed in signed JSON ({where})",
                                 where=where)
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise errors.FormatError(f"non-string key at {where}", where=where)
            _check(v, f"{where}.{k}")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check(v, f"{where}[{i}]")
        return
    raise errors.FormatError(f"value of type {type(value).__name__} at {where} is not JSON",
                             where=where)


def canonical_bytes(value: Any) -> bytes:
    """Encode ``value`` in the canonical form (raises FormatError for floats etc.)."""
    _check(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, allow_nan=False).encode("utf-8")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise errors.FormatError(f"duplicate key {k!r} in signed JSON", key=k)
        out[k] = v
    return out


def _no_float(text: str) -> Any:
    raise errors.FormatError("floats are not allowed in signed JSON", value=text)


def parse_canonical(data: bytes, what: str = "manifest") -> Any:
    """Parse bytes that must already be canonical; anything else is a FormatError."""
    try:
        text = data.decode("utf-8")
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_float=_no_float,
                           parse_constant=_no_float)
    except errors.FormatError:
        raise
    except (UnicodeDecodeError, ValueError) as exc:
        raise errors.FormatError(f"{what} is not valid JSON: {exc}") from exc
    if canonical_bytes(value) != data:
        raise errors.FormatError(f"{what} is not in canonical form (sorted keys, no spaces)")
    return value
