"""The data formats of ``-o/--output`` besides JSON: ``yaml``, ``wide`` and ``tsv``.

A command hands :func:`fleet.cli._output.emit` one document (what ``--json`` prints);
the formats here are views of that same document, so every command has them without
code of its own and they never disagree with ``--json``:

- ``yaml``: the JSON document as YAML (PyYAML's safe dumper, keys sorted).
- ``wide`` and ``tsv``: the document's rows, one column per field (every field, with the
  JSON key as its header). The rows are the document itself when it is a list of
  objects; for an object, its first non-empty list of objects (``results`` of a deploy,
  ``devices`` of a group, ``steps`` of a deployment), the object's other plain fields
  printed above the table by ``wide`` (``tsv`` is the table alone); an object without such
  a list is one row. Nested values are flattened into one cell: an object as
  ``k=v,k=v``, a list as its items joined by ``,`` (an item that is an object by its
  ``id`` or ``name``, else as compact JSON).

``tsv`` has a header line, tabs between cells, no padding; a tab, newline or backslash in
a value is written ``\\t``, ``\\n``, ``\\\\`` (PostgreSQL's text format), an empty
value is an empty cell. ``wide`` pads columns with spaces and never truncates.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any, TextIO
from uuid import UUID

__all__ = ["Rows", "cell_text", "rows_of", "write_tsv", "yaml_text"]


@dataclass
class Rows:
    """A document as a table: ``columns`` (field names), ``rows`` (one value per column)
    and ``context`` (the enclosing object's plain fields, for ``wide``'s header)."""

    columns: list[str]
    rows: list[list[Any]]
    context: list[tuple[str, Any]] = field(default_factory=list)


def _plain(value: Any) -> Any:
    """Pydantic models and the like as plain data (what ``--json`` would print)."""
    if hasattr(value, "model_dump"):
        return value.model_dump()
    return value


def _is_record_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(_plain(v), Mapping) for v in value)


def cell_text(value: Any, *, empty: str = "") -> str:
    """One value as the text of one cell (see the module docstring for the rules)."""
    value = _plain(value)
    if value is None:
        return empty
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    if isinstance(value, (UUID, Enum)):
        return str(value.value if isinstance(value, Enum) else value)
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, Mapping):
        return ",".join(f"{k}={cell_text(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple, set)):
        return ",".join(_item_text(v) for v in value)
    return str(value)


def _item_text(value: Any) -> str:
    value = _plain(value)
    if isinstance(value, Mapping):
        for key in ("id", "name", "device"):
            if key in value and value[key] is not None:
                return str(value[key])
        return json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return cell_text(value)


def _table(records: Sequence[Any]) -> tuple[list[str], list[list[Any]]]:
    columns: list[str] = []
    dicts = [dict(_plain(r)) for r in records]
    for d in dicts:
        columns.extend(str(k) for k in d if str(k) not in columns)
    return columns, [[d.get(c) for c in columns] for d in dicts]


def rows_of(data: Any) -> Rows:
    """The rows ``wide`` and ``tsv`` print for a command's JSON document."""
    data = _plain(data)
    if isinstance(data, list):
        if _is_record_list(data):
            return Rows(*_table(data))
        return Rows(["value"], [[v] for v in data])
    if isinstance(data, Mapping):
        lists = [k for k, v in data.items() if _is_record_list(v)]
        chosen = next((k for k in lists if data[k]), lists[0] if lists else None)
        if chosen is None:
            return Rows(*_table([data]))
        context = [(str(k), v) for k, v in data.items()
                   if k != chosen and not _is_record_list(v)]
        return Rows(*_table(data[chosen]), context=context)
    return Rows(["value"], [[data]])


def _tsv_cell(value: Any) -> str:
    text = cell_text(value)
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n") \
        .replace("\r", "\\r")


def write_tsv(data: Any, stream: TextIO) -> None:
    """``data``'s rows as TSV with a header line (nothing for a document with no rows
    and no columns)."""
    rows = rows_of(data)
    if not rows.columns:
        return
    stream.write("\t".join(_tsv_cell(c) for c in rows.columns) + "\n")
    for r in rows.rows:
        stream.write("\t".join(_tsv_cell(v) for v in r) + "\n")


def yaml_text(data: Any) -> str:
    """``data`` (already JSON-able) as one YAML document."""
    import yaml  # only when asked for: `fleet --help` stays light

    return str(yaml.safe_dump(data, sort_keys=True, allow_unicode=True,
                              default_flow_style=False))
