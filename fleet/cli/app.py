"""``fleet``: the controller CLI. Subcommand groups live in their own modules.

Every :class:`fleet.core.errors.FleetError` that escapes a command is printed on stderr as one
line and becomes the exit code from the single table in :mod:`fleet.cli._exit`; with
``--json`` (``-o json``/``yaml``) stdout carries it too, as ``{"error": {"code", "message",
"exit"}}``, and so does a command line click refuses (exit 2, code ``usage``). The root
also gives every command ``-o/--output`` (:mod:`fleet.cli._options`), sets the output
format (:mod:`fleet.cli._output`) and the logging (``-v``, :mod:`fleet.cli._logging`).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.main
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from fleet.cli import _output
from fleet.cli._ctx import CliState, set_state
from fleet.cli._exit import EXIT_CODES, exit_code_for
from fleet.cli._options import adorn, requested_format, tidy_help
from fleet.cli._output import err, error_document
from fleet.core import errors
from fleet.home import FleetHome

__all__ = ["app", "main"]

#: Modules of pyproject's ``controller`` extra (the controller's services, never installed
#: on a board): a command that needs one in an install without it exits 2 and says so.
_CONTROLLER_EXTRA = frozenset({"psycopg", "celery", "kombu", "redis", "plotly", "fastapi",
                               "uvicorn", "starlette"})


#: Top-level command -> (the modules that define it, its one-line help). Commands are
#: imported only when run, so ``fleet --help`` and ``fleet device list`` do not pay for
#: MNN, paramiko or alembic (bench/bench_cli.py measures it). A new command module is
#: added here; tests/test_cli_help.py checks the table matches what the modules define.
COMMANDS: dict[str, tuple[tuple[str, ...], str]] = {
    "init": (("fleet.cli.cmd_core",),
             "Create the controller home and migrate the registry to the newest schema."),
    "status": (("fleet.cli.cmd_core",), "Summarise the fleet: devices per group and status."),
    "device": (("fleet.cli.cmd_device", "fleet.cli.cmd_bootstrap"),
               "Devices: register, list, inspect, remove, bootstrap."),
    "group": (("fleet.cli.cmd_group",), "Groups of devices."),
    "keys": (("fleet.cli.cmd_keys",),
             "Keys: the root of trust, online signing keys, rotation and revocation."),
    "package": (("fleet.cli.cmd_package",),
                "Build a signed, encrypted package for devices without sending it."),
    "deploy": (("fleet.cli.cmd_deploy",),
               "Package a model and roll it out to devices (waves, health gates)."),
    "rollback": (("fleet.cli.cmd_deploy",), "Return devices to a model's previous version."),
    "deployment": (("fleet.cli.cmd_deployment",),
                   "Deployments: list, show, resume or cancel one (history and lifecycle)."),
    "audit": (("fleet.cli.cmd_audit",),
              "Per device: configured vs effective vs recommended backend, findings."),
    "reports": (("fleet.cli.cmd_audit",), "A device's stored reports, newest first."),
    "report": (("fleet.cli.cmd_report",),
               "The fleet as one offline HTML page with plots (--html), or CSV tables."),
    "lora": (("fleet.cli.cmd_lora",), "LoRA adapters: package, push, hot-swap, roll back."),
    "gc": (("fleet.cli.cmd_gc",),
           "Delete built packages no device needs (the devices' keep policy)."),
    "lab": (("fleet.cli.cmd_lab",), "The virtual device lab: boards, phones, faults."),
    "server": (("fleet.cli.cmd_server",),
               "The device API that pull-mode devices poll (HTTPS; init-tls makes its CA)."),
    "worker": (("fleet.cli.cmd_worker",),
               "Farm hosts: run the worker of one host's devices, or list the workers."),
}


def _click_exception_class() -> Any:
    from typer._click.exceptions import ClickException  # typer vendors click

    return ClickException


def _click_error(exc: Any) -> dict[str, Any]:
    """The document of an error click raised: ``usage`` (exit 2) for a command line it
    refuses (bad option, missing argument), ``cli`` for its other errors."""
    from typer._click.exceptions import UsageError

    code = int(getattr(exc, "exit_code", 2))
    return error_document("usage" if isinstance(exc, UsageError) else "cli",
                          exc.format_message(), code)


def _exit_word(code: int) -> str:
    """The stable error code of a bare exit status (a Ctrl-C, a "no" at a prompt, a
    command that ends with a failure it has already printed)."""
    if code == 130:
        return "interrupted"
    if code == 1:
        return "aborted"
    for cls, n in EXIT_CODES.items():
        if n == code:
            return str(getattr(cls, "code", "exit"))
    return "exit"


class _FleetGroup(TyperGroup):
    """The root group: lazy subcommands, the options every command gets, and errors
    (FleetError -> one line + exit code; under ``--json`` a document on stdout too)."""

    _listing = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for p in self.params:
            tidy_help(p)
        for command in self.commands.values():  # built by typer from modules loaded already
            adorn(command)

    def list_commands(self, ctx: Any) -> list[str]:
        extra = [n for n in super().list_commands(ctx) if n not in COMMANDS]
        return [*COMMANDS, *extra]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in COMMANDS:
            return super().get_command(ctx, cmd_name)
        modules, short = COMMANDS[cmd_name]
        # built already, from all of its modules (one imported alone by other code, e.g.
        # cmd_device without cmd_bootstrap, gives a group that lacks commands: built again)
        if cmd_name in self.commands and all(m in sys.modules for m in modules):
            return super().get_command(ctx, cmd_name)
        if self._listing:  # the help page needs names and one line each, nothing more
            # typer vendors click: `click` itself is not among our dependencies
            return TyperCommand(cmd_name, short_help=short, help=short)
        for module in modules:
            importlib.import_module(module)
        command = _click_command_for(cmd_name)
        adorn(command)
        self.add_command(command, cmd_name)
        return command

    def format_help(self, ctx: Any, formatter: Any) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def main(self, args: Any = None, *rest: Any, **kwargs: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        _output.begin(requested_format(argv))
        try:
            return super().main(argv, *rest, **kwargs)
        finally:
            _output.begin(deferring=False)  # nothing of this command line is kept

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except _click_exception_class() as exc:  # the root's own options: before invoke
            _output.finish(_click_error(exc))
            raise

    def invoke(self, ctx: Any) -> Any:
        try:
            rv = super().invoke(ctx)
        except errors.FleetError as exc:
            code = exit_code_for(exc)
            _output.finish(error_document(exc.code, exc.message, code))
            # the message may carry device text: printed as text, never as markup
            err.print(f"[bold red]error:[/] {escape(str(exc.message))}", highlight=False,
                      markup=True, soft_wrap=True)  # one line, whatever the terminal width
            raise typer.Exit(code) from exc
        except _click_exception_class() as exc:
            _output.finish(_click_error(exc))
            raise
        except typer.Exit as exc:
            code = int(exc.exit_code or 0)
            # the command chose its exit status after printing its answer: that stays as
            # it is; with nothing printed, the status becomes an error document
            _output.finish(error_document(_exit_word(code), f"stopped with exit status {code}",
                                          code) if code else None, merge=False)
            raise
        except typer.Abort:
            _output.finish(error_document("aborted", "aborted", 1))
            raise
        except KeyboardInterrupt:
            _output.finish(error_document("interrupted", "interrupted (Ctrl-C)", 130))
            raise
        except ModuleNotFoundError as exc:
            missing = (exc.name or "").partition(".")[0]
            if missing not in _CONTROLLER_EXTRA:
                raise
            message = (f"this command needs {missing}, which comes with the controller's "
                       "extra: pip install 'mnn-fleet[controller]'")
            _output.finish(error_document("usage", message, 2))
            err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True,
                      soft_wrap=True)
            raise typer.Exit(2) from exc
        except Exception as exc:  # a bug, or a library error nothing mapped: still one line
            import logging  # only now: `fleet --help` does not pay for it

            logging.getLogger("fleet.cli").info("internal error", exc_info=True)
            first = (str(exc).strip().splitlines() or [""])[0][:500]
            message = f"internal error: {type(exc).__name__}: {first}".rstrip(": ")
            _output.finish(error_document("internal", message, 1))
            err.print(f"[bold red]error:[/] {escape(message)} (fleet -v ... shows the "
                      "traceback)", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(1) from exc
        _output.finish()
        return rv


def _click_command_for(name: str) -> Any:
    """The click command typer builds for ``name`` once its module has registered it."""
    for group in app.registered_groups:
        if group.name == name:
            return typer.main.get_group_from_info(
                group, pretty_exceptions_short=app.pretty_exceptions_short,
                rich_markup_mode=app.rich_markup_mode, suggest_commands=app.suggest_commands)
    for info in app.registered_commands:
        if info.callback is not None and (info.name or typer.main.get_command_name(
                info.callback.__name__)) == name:
            return typer.main.get_command_from_info(
                info, pretty_exceptions_short=app.pretty_exceptions_short,
                rich_markup_mode=app.rich_markup_mode)
    raise errors.FleetError(f"internal: command {name!r} is listed but not defined")


# Plain (click) help: typer's Rich help pulls in rich.markdown and friends, a third of a
# cold `fleet --help` (bench/bench_cli.py); plain help also pipes cleanly.
app = typer.Typer(name="fleet", cls=_FleetGroup, no_args_is_help=True, add_completion=True,
                  rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="""Deploy MNN models to a fleet of phones and boards, and audit them.

Data goes to stdout (-o json|yaml|wide|tsv, --json), progress and logs to stderr
(-v, -vv for more). Exit codes: README, "Commands".

Examples:

\b
  fleet init && fleet keys init
  fleet device add local://pixel7?root=/tmp/pixel7 --name pixel7
  fleet deploy model.onnx --group phones
  fleet device list -o wide | less -S
  fleet --install-completion""",
                  pretty_exceptions_enable=False)


def _show_version(value: bool) -> None:
    if value:  # eager: answers before any command, home or registry is looked at
        from fleet._version import version_line

        typer.echo(version_line())
        raise typer.Exit()


@app.callback()
def _root(
    home: Annotated[Path | None, typer.Option("--home", envvar="FLEET_HOME",
                                              help="Controller home (default ~/.fleet).")] = None,
    db: Annotated[str | None, typer.Option("--db", envvar="FLEET_DB",
                                           help="SQLAlchemy URL of the registry.")] = None,
    _version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_show_version,
                                           help="Print mnn-fleet's version and exit.")] = False,
    verbose: Annotated[int, typer.Option(
        "--verbose", "-v", count=True, show_default=False,
        help="Show the libraries' logs: -v (info, with paramiko's errors and MNN's "
             "output), -vv (debug).")] = 0,
) -> None:
    from fleet.cli._logging import configure

    configure(verbose)
    set_state(CliState(home=FleetHome.from_env(home, db)))


def load_all() -> None:
    """Import every command module (shell completion, docs, tests of the whole tree)."""
    for modules, _ in COMMANDS.values():
        for module in modules:
            importlib.import_module(module)


def main(argv: list[str] | None = None) -> int:
    try:
        app(args=argv if argv is not None else sys.argv[1:], prog_name="fleet")
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0
