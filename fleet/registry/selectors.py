"""Target selection: groups, devices and label selectors, evaluated in SQL.

A selector is ``TERM[,TERM...]`` (kubectl's syntax); every term must hold:

====================  =====================================================================
``key=value``          equal (``==`` too)
``key!=value``         not equal; for a tag, a device without the tag matches (kubectl)
``key>=n`` ``<=`` ``>`` ``<``  numeric facts only (``hw.ram_gb>=4``)
``key``                the device has this tag / fact (a boolean ``hw.*`` fact: it is true)
``!key``               it has not (a boolean ``hw.*`` fact: it is false)
====================  =====================================================================

Keys: ``hw.*`` (:data:`fleet.registry.facts.HW_FACTS`, from the latest probe),
``disk.free_gb``, ``platform``, ``status``, ``model`` (``model=NAME``: NAME is active;
``model=NAME@V``: version V is), ``model.NAME`` (its active version, numeric), and any
other key is a tag. An unknown ``hw.*`` key is a usage error listing the known ones. A
device without a fact (never probed) matches no selector on it except ``!key``.

:func:`select_devices` is a fixed number of queries whatever the fleet size: one that
checks the named groups and devices exist, one that selects (union of ``groups`` members
and ``devices``, or every device when neither is given, filtered by every term).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, false, literal, not_, or_, true, union_all
from sqlalchemy import select as sa_select
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import col, select

from fleet.core import errors
from fleet.registry.api import Registry
from fleet.registry.facts import HW_FACTS, FactKind
from fleet.registry.models import Device, Group, Membership

__all__ = ["BUILTIN_KEYS", "Term", "check_tag_key", "criteria", "parse_selector",
           "parse_selectors", "select_devices", "selector_keys_help"]

#: keys that are not tags (a tag may not be named like them)
BUILTIN_KEYS: dict[str, FactKind] = {"platform": "str", "status": "str", "model": "str",
                                     "disk.free_gb": "num"}
_RESERVED_PREFIXES = ("hw.", "model.", "disk.")
_KEY = r"[A-Za-z0-9][A-Za-z0-9_.\-/]*"
_TERM = re.compile(rf"^\s*(?P<neg>!)?\s*(?P<key>{_KEY})\s*"
                   r"(?:(?P<op>>=|<=|!=|==|=|>|<)\s*(?P<value>.*?))?\s*$")
_ARCH_ALIASES = {"aarch64": "arm64", "armv8": "arm64", "amd64": "x86_64", "x64": "x86_64",
                 "i686": "x86", "i386": "x86", "armv7": "arm", "armv7l": "arm"}
_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}
_NUMERIC_OPS = (">=", "<=", ">", "<")


@dataclass(frozen=True)
class Term:
    """One selector term. ``op``: ``=``, ``!=``, ``>=``, ``<=``, ``>``, ``<``, ``exists``
    or ``absent``; ``value`` is already typed for its key (str, bool or float)."""

    key: str
    op: str
    value: Any = None
    kind: str = "tag"  #: tag | fact | column | model

    def __str__(self) -> str:
        if self.op == "exists":
            return self.key
        if self.op == "absent":
            return f"!{self.key}"
        v = self.value
        shown = ("true" if v else "false") if isinstance(v, bool) else \
            f"{v:g}" if isinstance(v, float) else str(v)
        return f"{self.key}{self.op}{shown}"


def selector_keys_help() -> str:
    """The keys that are not tags, for error messages and ``--help``."""
    return ", ".join([*HW_FACTS, *BUILTIN_KEYS, "model.NAME"])


def check_tag_key(key: str) -> None:
    """UsageError unless ``key`` can be a tag (selectable, not shadowing a fact)."""
    if not re.fullmatch(_KEY, key):
        raise errors.UsageError(f"tag key {key!r}: letters, digits and _ . - / only, "
                                "starting with a letter or digit", key=key)
    if key in BUILTIN_KEYS or key.startswith(_RESERVED_PREFIXES):
        raise errors.UsageError(f"tag key {key!r} is reserved for a fact (hw.*, model, "
                                "disk.*, platform, status); choose another", key=key)


def _kind_of(key: str) -> tuple[str, FactKind]:
    if key.startswith("hw."):
        fact = HW_FACTS.get(key)
        if fact is None:
            raise errors.UsageError(f"unknown selector key {key!r}; hardware keys: "
                                    f"{', '.join(HW_FACTS)}", key=key)
        return "fact", fact.kind
    if key == "model":
        return "model", "str"
    if key.startswith("model."):
        return "fact", "num"
    if key in ("platform", "status"):
        return "column", "str"
    if key in BUILTIN_KEYS:
        return "fact", BUILTIN_KEYS[key]
    if key.startswith("disk."):
        raise errors.UsageError(f"unknown selector key {key!r}; known: disk.free_gb",
                                key=key)
    return "tag", "str"


def _typed(key: str, fkind: FactKind, op: str, raw: str, text: str) -> Any:
    if op in _NUMERIC_OPS and fkind != "num":
        numeric = [k for k, f in HW_FACTS.items() if f.kind == "num"]
        raise errors.UsageError(f"selector {text!r}: {op} compares numbers and {key} is not "
                                f"numeric (numeric keys: {', '.join(numeric)}, disk.free_gb, "
                                "model.NAME)", selector=text)
    if fkind == "num":
        try:
            return float(raw)
        except ValueError as exc:
            raise errors.UsageError(f"selector {text!r}: {key} takes a number, not {raw!r}",
                                    selector=text) from exc
    if fkind == "bool":
        low = raw.lower()
        if low in _TRUE | _FALSE:
            return low in _TRUE
        raise errors.UsageError(f"selector {text!r}: {key} is true or false, not {raw!r}",
                                selector=text)
    if key == "hw.arch":
        return _ARCH_ALIASES.get(raw.lower(), raw.lower())
    return raw


def _term(text: str, whole: str) -> Term:
    m = _TERM.match(text)
    if m is None:
        raise errors.UsageError(f"selector {whole!r}: cannot read {text.strip()!r} (KEY=VALUE, "
                                "KEY!=VALUE, KEY>=N, KEY or !KEY)", selector=whole)
    key, op, raw = m["key"], m["op"], m["value"]
    kind, fkind = _kind_of(key)
    if op is None:
        if kind == "model":
            raise errors.UsageError(f"selector {whole!r}: 'model' alone says nothing; write "
                                    "model=NAME, model!=NAME or model=NAME@V", selector=whole)
        if fkind == "bool" and kind == "fact":  # hw.gpu.cuda: has it; !hw.gpu.cuda: lacks it
            return Term(key, "=", not m["neg"], kind)
        return Term(key, "absent" if m["neg"] else "exists", None, kind)
    if m["neg"]:
        raise errors.UsageError(f"selector {whole!r}: '!' goes only before a lone key "
                                "(!KEY); write KEY!=VALUE", selector=whole)
    if raw == "":
        raise errors.UsageError(f"selector {whole!r}: {key}{op} needs a value",
                                selector=whole)
    op = "=" if op == "==" else op
    if kind == "model":
        if op not in ("=", "!="):
            raise errors.UsageError(f"selector {whole!r}: model takes = or != "
                                    "(model=NAME, model=NAME@V; model.NAME>=V for numbers)",
                                    selector=whole)
        name, sep, ver = raw.partition("@")
        if not name or (sep and not ver.isdigit()):
            raise errors.UsageError(f"selector {whole!r}: model=NAME or model=NAME@VERSION "
                                    "(a number)", selector=whole)
        return Term(key, op, raw, kind)
    return Term(key, op, _typed(key, fkind, op, raw, whole), kind)


def parse_selector(text: str) -> list[Term]:
    """One ``-l`` value: its terms (all must hold). Raises UsageError (exit 2)."""
    parts = [p for p in text.split(",")]
    if not text.strip() or any(not p.strip() for p in parts):
        raise errors.UsageError(f"selector {text!r} has an empty term", selector=text)
    return [_term(p, text) for p in parts]


def parse_selectors(texts: Sequence[str]) -> list[Term]:
    """Every ``-l`` value's terms, in order (all must hold)."""
    return [t for text in texts for t in parse_selector(text)]


# -- SQL ------------------------------------------------------------------------------------
def _json_value(column: Any, key: str, fkind: FactKind) -> Any:
    item = col(column)[key]
    if fkind == "num":
        return item.as_float()
    if fkind == "bool":
        return item.as_boolean()
    return item.as_string()


def _present(column: Any, key: str) -> ColumnElement[bool]:
    # as_string: JSON_EXTRACT / ->> give SQL NULL for a missing key on SQLite and PostgreSQL
    return col(column)[key].as_string().is_not(None)


def _compare(expr: Any, op: str, value: Any) -> ColumnElement[bool]:
    if op == "=":
        return expr == value
    if op == "!=":
        return expr != value
    if op == ">=":
        return expr >= value
    if op == "<=":
        return expr <= value
    if op == ">":
        return expr > value
    return expr < value


def _model_clause(term: Term) -> ColumnElement[bool]:
    name, _, ver = str(term.value).partition("@")
    key = f"model.{name}"
    if ver:
        match = and_(_present(Device.facts, key),
                     _json_value(Device.facts, key, "num") == float(ver))
    else:
        match = _present(Device.facts, key)
    return not_(match) if term.op == "!=" else match


def _clause(term: Term) -> ColumnElement[bool]:
    if term.kind == "model":
        return _model_clause(term)
    if term.kind == "column":
        field = col(Device.platform) if term.key == "platform" else col(Device.status)
        if term.op == "exists":
            return true()
        if term.op == "absent":
            return false()
        return _compare(field, term.op, term.value)
    column: Any = Device.tags if term.kind == "tag" else Device.facts
    if term.op == "exists":
        return _present(column, term.key)
    if term.op == "absent":
        return not_(_present(column, term.key))
    fkind: FactKind = "str" if term.kind == "tag" else (
        HW_FACTS[term.key].kind if term.key in HW_FACTS else
        BUILTIN_KEYS.get(term.key, "num"))
    value = _compare(_json_value(column, term.key, fkind), term.op, term.value)
    if term.kind == "tag" and term.op == "!=":
        return or_(not_(_present(column, term.key)), value)  # kubectl: no tag matches !=
    return and_(_present(column, term.key), value)  # an unknown fact matches nothing


def _check_names(reg: Registry, groups: Sequence[str], devices: Sequence[str]) -> None:
    """One query: NotFoundError (exit 5) naming every unknown group and device."""
    if not groups and not devices:
        return
    q = union_all(
        sa_select(col(Group.name), literal("group")).where(col(Group.name).in_(list(groups))),
        sa_select(col(Device.name), literal("device")).where(
            col(Device.name).in_(list(devices))))
    with reg.reading() as s:
        found = {(str(kind), str(name)) for name, kind in s.exec(q).all()}  # type: ignore[call-overload]
    missing = [("group", g) for g in dict.fromkeys(groups) if ("group", g) not in found] + \
              [("device", d) for d in dict.fromkeys(devices) if ("device", d) not in found]
    if missing:
        raise errors.NotFoundError(
            "no " + ", no ".join(f"{kind} named {name!r}" for kind, name in missing),
            kind=missing[0][0], name=missing[0][1], missing=[n for _, n in missing])


def select_devices(reg: Registry, *, groups: Sequence[str] = (),
                   devices: Sequence[str] = (), terms: Sequence[Term] = ()) -> list[Device]:
    """The devices named by ``groups`` (their members) and ``devices``, or every device
    when neither is given, that match every term; sorted by name, no repeats.

    Raises NotFoundError (exit 5) for an unknown group or device; an empty answer is not
    an error here (the caller decides)."""
    stmt = select(Device).where(*criteria(reg, groups=groups, devices=devices, terms=terms))
    with reg.reading() as s:
        return list(s.exec(stmt.order_by(col(Device.name))).all())


def criteria(reg: Registry, *, groups: Sequence[str] = (), devices: Sequence[str] = (),
             terms: Sequence[Term] = ()) -> list[ColumnElement[bool]]:
    """The WHERE criteria on ``devices`` that :func:`select_devices` applies, for a query
    of one's own (:func:`fleet.registry.listing.device_lines` streams them). Checks the
    named groups and devices exist first (NotFoundError, exit 5)."""
    _check_names(reg, groups, devices)
    out: list[ColumnElement[bool]] = []
    named: list[ColumnElement[bool]] = []
    if groups:  # EXISTS: devices are read in name order from their index, not sorted
        named.append(select(Membership.device_id)
                     .join(Group, col(Group.id) == col(Membership.group_id))
                     .where(col(Group.name).in_(list(groups)),
                            col(Membership.device_id) == col(Device.id)).exists())
    if devices:
        named.append(col(Device.name).in_(list(devices)))
    if named:
        out.append(or_(*named))
    out.extend(_clause(term) for term in terms)
    return out
