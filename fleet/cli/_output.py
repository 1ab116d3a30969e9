"""Data on stdout, progress and logs on stderr; ``--json``/``-o FORMAT`` everywhere; NO_COLOR
honoured.

Every command prints its data with :func:`emit`: one document (what ``--json`` prints)
and a ``render`` function that draws it for people. The output format is the
invocation's (``-o json|yaml|wide|tsv``, ``--json`` being ``-o json``; the root command
sets it, :mod:`fleet.cli.app`), so commands do not pass it around:

- text (the default): ``render`` draws on :data:`out`. When stdout is not a terminal
  (a pipe, a file) nothing is cut to a width: tables are as wide as their longest cell.
- ``json``, ``yaml``: the document. While a command runs it is held back and printed when
  the command ends, so that an error after it can go into the same document (below).
- ``wide``, ``tsv``: every field of the document's rows (:mod:`fleet.cli._formats`).

Errors under ``json``/``yaml``: stdout is one document ``{"error": {"code", "message",
"exit"}}`` (:func:`error_document`) beside the one ``error:`` line on stderr and the exit
code. A command that had produced its document and then failed (a fan-out where some
devices failed) keeps that document, which gains ``error`` if it is an object; a list
stays a list (its rows carry each device's error). Either way stdout is one document.

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
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any
from uuid import UUID

from rich.console import Console, ConsoleDimensions, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

__all__ = ["OutputFormat", "confirm", "emit", "emit_ndjson", "err", "error_document",
           "human_bytes", "literal", "out", "output_format", "table", "to_jsonable"]

#: the width tables get when stdout is not a terminal: wider than any row, so nothing is cut
PIPE_WIDTH = 1 << 15


class OutputFormat(StrEnum):
    """``-o/--output``; ``text`` is the default (no option)."""

    TEXT = "text"
    JSON = "json"
    YAML = "yaml"
    WIDE = "wide"
    TSV = "tsv"

    @property
    def structured(self) -> bool:
        """A format whose errors are documents on stdout too."""
        return self in (OutputFormat.JSON, OutputFormat.YAML)


#: what ``-o`` accepts
OUTPUT_CHOICES = ("json", "yaml", "wide", "tsv")


class _DataConsole(Console):
    """stdout: a terminal's width on a terminal; otherwise never narrower than a row."""

    @property
    def size(self) -> ConsoleDimensions:
        if self.is_terminal:
            return super().size
        return ConsoleDimensions(PIPE_WIDTH, 25)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._width, self._height = new_size


out: Console = _DataConsole(soft_wrap=True)
#: stderr: soft-wrapped, so a long message stays one line in a log or a pipe
err = Console(stderr=True, soft_wrap=True)


@dataclass
class _Invocation:
    """The output state of one command line (reset by :func:`begin`)."""

    format: OutputFormat = OutputFormat.TEXT
    #: hold json/yaml documents until the command ends (set by the root command)
    deferring: bool = False
    pending: list[tuple[OutputFormat, Any]] = field(default_factory=list)
    error_written: bool = False


_now = _Invocation()


def begin(fmt: OutputFormat = OutputFormat.TEXT, *, deferring: bool = True) -> None:
    """A new command line: its format as far as known (``--json`` seen in argv), and
    structured documents held until :func:`finish`."""
    global _now
    _now = _Invocation(format=fmt, deferring=deferring)


def set_output_format(fmt: OutputFormat | str) -> None:
    """The format asked for with ``-o``/``--json`` (a parameter callback calls it)."""
    _now.format = OutputFormat(fmt)


def output_format() -> OutputFormat:
    return _now.format


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


def _write_document(fmt: OutputFormat, data: Any) -> None:
    if fmt is OutputFormat.YAML:
        from fleet.cli._formats import yaml_text

        sys.stdout.write(yaml_text(to_jsonable(data)))
    else:
        sys.stdout.write(json.dumps(to_jsonable(data), indent=2, sort_keys=True) + "\n")
    sys.stdout.flush()


def emit(data: Any, *, as_json: bool, render: Callable[[Console], None] | None = None) -> None:
    """Print ``data`` in the invocation's format (``as_json``: as JSON whatever it is);
    ``render`` draws it for people (none: the text form is JSON too)."""
    fmt = OutputFormat.JSON if as_json else _now.format
    if fmt is OutputFormat.TEXT and render is None:
        fmt = OutputFormat.JSON
    if fmt.structured:
        if _now.deferring:
            _now.pending.append((fmt, data))
        else:
            _write_document(fmt, data)
    elif fmt is OutputFormat.TSV:
        from fleet.cli._formats import write_tsv

        write_tsv(data, sys.stdout)
        sys.stdout.flush()
    elif fmt is OutputFormat.WIDE:
        _render_wide(data)
    else:
        assert render is not None
        render(out)


def _render_wide(data: Any) -> None:
    """Every field as a column, plain columns (kubectl's ``-o wide``), never cut."""
    import io

    from fleet.cli._formats import cell_text, rows_of

    rows = rows_of(data)
    buf = io.StringIO()
    wide = Console(file=buf, soft_wrap=True, width=PIPE_WIDTH, color_system=None)
    for key, value in rows.context:
        wide.print(Text(f"{key}: {cell_text(value, empty='-') or '-'}"))
    if rows.columns:
        t = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
        for c in rows.columns:
            t.add_column(c, no_wrap=True)
        for r in rows.rows:
            t.add_row(*[Text(cell_text(v, empty="-") or "-") for v in r])
        wide.print(t)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in buf.getvalue().splitlines()))
    sys.stdout.flush()


def error_document(code: str, message: str, exit_code: int) -> dict[str, Any]:
    """``{"error": {"code", "message", "exit"}}``: the stable code (a FleetError's ``code``,
    ``usage`` for a command line click refused, ``interrupted``, ``aborted``)."""
    return {"error": {"code": code, "message": message, "exit": exit_code}}


def finish(error: dict[str, Any] | None = None, *, merge: bool = True) -> None:
    """The command ended: print the held documents. With ``error`` (an
    :func:`error_document`) and a structured format: printed alone when the command
    printed nothing; put into the command's document when that is an object (and
    ``merge``); a list is left as it is (its rows say what failed, the exit status that
    something did). Once per command line."""
    pending, _now.pending = _now.pending, []
    if error is not None and _now.format.structured and not _now.error_written:
        _now.error_written = True
        if not pending:
            pending.append((_now.format, error))
        elif merge:
            last_fmt, last = pending[-1]
            last = to_jsonable(last)
            if isinstance(last, dict):
                pending[-1] = (last_fmt, {**last, **error})
    for doc_fmt, doc in pending:
        _write_document(doc_fmt, doc)


def emit_ndjson(rows: Iterable[Any]) -> None:
    for row in rows:
        sys.stdout.write(json.dumps(to_jsonable(row), sort_keys=True) + "\n")
    sys.stdout.flush()


def literal(value: Any) -> str:
    """``value`` as text with Rich markup escaped, for an f-string printed with markup."""
    return escape(str(value))


def human_bytes(n: int | float | None) -> str:
    """A size in binary units, the one way sizes are written: ``512 B``, ``59.5 KiB``,
    ``1.2 MiB``, ``3.0 GiB``; ``-`` for unknown (None)."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _cell(value: Any) -> RenderableType:
    """A table cell: a Rich renderable the caller built stays; anything else is text."""
    if value is None:
        return ""
    if isinstance(value, (Text, Table)):
        return value
    return Text(str(value))


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    """Cells and title are literal text (never markup): rows often hold device text.
    Columns never truncate (``…``): on a narrow terminal a cell wraps instead."""
    t = Table(title=Text(title) if title is not None else None, title_justify="left")
    for c in columns:
        t.add_column(c, overflow="fold")
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
