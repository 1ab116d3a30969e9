"""``fleet``: the controller CLI. Subcommand groups live in their own modules."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from fleet import errors
from fleet.cli._ctx import CliState
from fleet.cli._exit import exit_code_for
from fleet.cli._output import err
from fleet.home import FleetHome

__all__ = ["app", "main"]

app = typer.Typer(name="fleet", no_args_is_help=True, add_completion=False,
                  help="Deploy MNN models to a fleet of phones and boards, and audit them.",
                  pretty_exceptions_enable=False)


@app.callback()
def _root(
    ctx: typer.Context,
    home: Annotated[Path | None, typer.Option("--home", envvar="FLEET_HOME",
                                              help="Controller home (default ~/.fleet).")] = None,
    db: Annotated[str | None, typer.Option("--db", envvar="FLEET_DB",
                                           help="SQLAlchemy URL of the registry.")] = None,
) -> None:
    ctx.obj = CliState(home=FleetHome.from_env(home, db))


def _register() -> None:
    # Each module adds its commands to `app` (or a sub-typer) on import.
    from fleet.cli import cmd_core, cmd_device, cmd_group  # noqa: F401
    for optional in ("cmd_keys", "cmd_package", "cmd_deploy", "cmd_audit", "cmd_lab",
                     "cmd_lora"):
        try:
            __import__(f"fleet.cli.{optional}")
        except ModuleNotFoundError as exc:
            if exc.name != f"fleet.cli.{optional}":
                raise


def main(argv: list[str] | None = None) -> int:
    _register()
    try:
        app(args=argv if argv is not None else sys.argv[1:], standalone_mode=False)
    except errors.FleetError as exc:
        err.print(f"[bold red]error:[/] {exc.message}", highlight=False)
        return exit_code_for(exc)
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except typer.Abort:
        err.print("aborted")
        return 130
    except Exception as exc:  # click usage errors
        import click
        if isinstance(exc, click.ClickException):
            exc.show()
            return 2
        raise
    return 0
