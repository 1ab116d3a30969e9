"""``fleet``: the controller CLI. Subcommand groups live in their own modules.

Every :class:`fleet.core.errors.FleetError` that escapes a command is printed on stderr as one
line and becomes the exit code from the single table in :mod:`fleet.cli._exit`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from fleet.cli._ctx import CliState, set_state
from fleet.cli._exit import exit_code_for
from fleet.cli._output import err
from fleet.core import errors
from fleet.home import FleetHome

__all__ = ["app", "main"]


class _FleetGroup(TyperGroup):
    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except errors.FleetError as exc:
            err.print(f"[bold red]error:[/] {exc.message}", highlight=False, markup=True)
            raise typer.Exit(exit_code_for(exc)) from exc


app = typer.Typer(name="fleet", cls=_FleetGroup, no_args_is_help=True, add_completion=False,
                  help="Deploy MNN models to a fleet of phones and boards, and audit them.",
                  pretty_exceptions_enable=False)


@app.callback()
def _root(
    home: Annotated[Path | None, typer.Option("--home", envvar="FLEET_HOME",
                                              help="Controller home (default ~/.fleet).")] = None,
    db: Annotated[str | None, typer.Option("--db", envvar="FLEET_DB",
                                           help="SQLAlchemy URL of the registry.")] = None,
) -> None:
    set_state(CliState(home=FleetHome.from_env(home, db)))


def _register() -> None:
    # Each module adds its commands to `app` (or a sub-typer) on import.
    from fleet.cli import cmd_core, cmd_device, cmd_group  # noqa: F401
    for optional in ("cmd_keys", "cmd_package", "cmd_deploy", "cmd_audit", "cmd_lab",
                     "cmd_lora", "cmd_bootstrap"):
        try:
            __import__(f"fleet.cli.{optional}")
        except ModuleNotFoundError as exc:
            if exc.name != f"fleet.cli.{optional}":
                raise


_register()


def main(argv: list[str] | None = None) -> int:
    try:
        app(args=argv if argv is not None else sys.argv[1:], prog_name="fleet")
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0
