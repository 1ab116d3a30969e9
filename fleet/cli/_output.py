"""Data on stdout, progress and logs on stderr; ``--json`` everywhere; NO_COLOR honoured.

Text that comes from a device or a model (agent error messages, reasons, findings, names a
device reports) is always printed as text: :func:`table` cells and titles are literal
:class:`rich.text.Text`, and a command that prints such text itself goes through
:func:`literal` (``rich.markup.escape``). A device message holding ``[/]`` must neither
crash the report (``MarkupError``) nor style the operator's terminal.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from rich.console import Console, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

__all__ = ["emit", "emit_ndjson", "err", "literal", "out", "table", "to_jsonable"]

out = Console(soft_wrap=True)
err = Console(stderr=True)


def to_jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    if hasattr(value, "model_dump"):
        return to_jsonable(value.model_dump())
    return value


def emit(data: Any, *, as_json: bool, render: Callable[[Console], None] | None = None) -> None:
    """Print ``data`` as one JSON document, or let ``render`` draw it for people."""
    if as_json or render is None:
        sys.stdout.write(json.dumps(to_jsonable(data), indent=2, sort_keys=True) + "\n")
        sys.stdout.flush()
    else:
        render(out)


def emit_ndjson(rows: Iterable[Any]) -> None:
    for row in rows:
        sys.stdout.write(json.dumps(to_jsonable(row), sort_keys=True) + "\n")
    sys.stdout.flush()


def literal(value: Any) -> str:
    """``value`` as text with Rich markup escaped, for an f-string printed with markup."""
    return escape(str(value))


def _cell(value: Any) -> RenderableType:
    """A table cell: a Rich renderable the caller built stays; anything else is text."""
    if value is None:
        return ""
    if isinstance(value, (Text, Table)):
        return value
    return Text(str(value))


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    """Cells and title are literal text (never markup): rows often hold device text."""
    t = Table(title=Text(title) if title is not None else None, title_justify="left")
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[_cell(v) for v in r])
    return t


def confirm(what: str, yes: bool) -> None:
    """Ask "WHAT?" on a terminal unless ``yes``; without a terminal, refuse (UsageError,
    exit 2) and say to pass ``--yes``. A "no" exits 1."""
    import typer

    from fleet.core import errors

    if yes:
        return
    if not sys.stdin.isatty():
        raise errors.UsageError(f"{what}: pass --yes to confirm (no terminal to ask on)")
    if not typer.confirm(f"{what}?"):
        raise typer.Exit(1)
