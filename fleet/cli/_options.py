"""What the root gives every command, so no command module writes it: ``-o/--output``,
``--json`` as the short form of ``-o json``, and help that reads right.

:func:`adorn` runs on each click command the root builds (:mod:`fleet.cli.app`):

- a command that prints data (it has ``--json``) gets ``-o/--output json|yaml|wide|tsv``
  (only ``--output`` where ``-o`` is already the command's own, e.g. ``package -o
  OUT.fpkg``); the option stores the format where :func:`fleet.cli._output.emit` reads it
  and never reaches the command's function;
- ``--json`` (and ``--ndjson``, for errors) sets the same format;
- an option that takes a value shows its name as the value's placeholder (``--group
  GROUP``), not a Python type (``<list[str]>``); flags show none; a repeatable option
  says so in its help.

:func:`requested_format` reads the format straight from the command line, for errors
that come before any option is processed (a bad option, a missing argument).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from enum import StrEnum
from typing import Annotated, Any

import typer
import typer.main
from typer.core import TyperGroup
from typer.models import CommandInfo

from fleet.cli._output import OUTPUT_CHOICES, OutputFormat, set_output_format

__all__ = ["adorn", "requested_format", "tidy_help"]


class _Choice(StrEnum):
    JSON = "json"
    YAML = "yaml"
    WIDE = "wide"
    TSV = "tsv"


_HELP = ("Output format: json (as --json), yaml, wide (every field as a column) or tsv "
         "(tab-separated, with a header).")


def _with_short(output: Annotated[_Choice | None, typer.Option(
        "--output", "-o", help=_HELP, case_sensitive=False, metavar="FORMAT")] = None) -> None:
    """Prototype: typer builds the option once, commands get copies."""


def _long_only(output: Annotated[_Choice | None, typer.Option(
        "--output", help=_HELP, case_sensitive=False, metavar="FORMAT")] = None) -> None:
    """Prototype for commands whose ``-o`` is their own."""


_protos: dict[bool, Any] = {}


def _set_output(ctx: Any, param: Any, value: Any) -> Any:
    if value is not None:
        set_output_format(OutputFormat(str(getattr(value, "value", value)).lower()))
    return value


def _output_option(short: bool) -> Any:
    if short not in _protos:
        fn = _with_short if short else _long_only
        cmd = typer.main.get_command_from_info(CommandInfo(callback=fn),
                                               pretty_exceptions_short=True,
                                               rich_markup_mode=None)
        (param,) = cmd.params
        param.expose_value = False  # the command's function never sees it
        param.callback = _set_output
        _protos[short] = param
    return copy.copy(_protos[short])


def _json_callback(original: Any) -> Any:
    def callback(ctx: Any, param: Any, value: Any) -> Any:
        if original is not None:
            value = original(ctx, param, value)
        if value:
            set_output_format(OutputFormat.JSON)
        return value
    return callback


def _opts(param: Any) -> list[str]:
    return [*getattr(param, "opts", []), *getattr(param, "secondary_opts", [])]


def tidy_help(param: Any) -> None:
    """A placeholder that names the value, and ``(repeat)`` on a repeatable option."""
    if getattr(param, "param_type_name", "") != "option":
        return
    if not (param.is_flag or param.count) and param.metavar is None and param.name:
        param.metavar = param.name.upper()
    if param.multiple and "repeat" not in (param.help or ""):
        param.help = f"{param.help} (repeat)" if param.help else "Repeatable."


def adorn(command: Any) -> None:
    """Give ``command`` (and every command under a group) the options above; idempotent."""
    if getattr(command, "_fleet_adorned", False):
        return
    command._fleet_adorned = True
    if isinstance(command, TyperGroup):  # a group that runs alone has options of its own
        for sub in command.commands.values():
            adorn(sub)
    names = {o for p in command.params for o in _opts(p)}
    for p in command.params:
        tidy_help(p)
        if {"--json", "--ndjson"} & set(_opts(p)):
            p.callback = _json_callback(p.callback)
    if "--json" in names and "--output" not in names:
        command.params.append(_output_option(short="-o" not in names))


def requested_format(argv: Sequence[str]) -> OutputFormat:
    """The format a command line asks for, read from its words (up to ``--``)."""
    fmt = OutputFormat.TEXT
    words = list(argv)
    for i, word in enumerate(words):
        if word == "--":
            break
        value: str | None = None
        if word in ("--json", "--ndjson"):
            value = "json"
        elif word in ("-o", "--output") and i + 1 < len(words):
            value = words[i + 1]
        elif word.startswith("--output="):
            value = word.split("=", 1)[1]
        elif word.startswith("-o") and len(word) > 2 and not word.startswith("--"):
            value = word[2:].lstrip("=")
        if value is not None and value.lower() in OUTPUT_CHOICES:
            fmt = OutputFormat(value.lower())
    return fmt
