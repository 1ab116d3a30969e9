"""The CLI's lazy command table matches what the command modules define, and help works
without importing them."""

from __future__ import annotations

import subprocess
import sys

import typer.main
from typer.testing import CliRunner

from fleet.cli import app as app_mod


def _defined_names() -> set[str]:
    app_mod.load_all()
    names = {g.name for g in app_mod.app.registered_groups if g.name}
    for info in app_mod.app.registered_commands:
        assert info.callback is not None
        names.add(info.name or typer.main.get_command_name(info.callback.__name__))
    return names


def test_every_defined_command_is_in_the_lazy_table_and_back() -> None:
    assert _defined_names() == set(app_mod.COMMANDS)


def test_every_command_in_the_table_has_a_one_line_help() -> None:
    for name, (modules, short) in app_mod.COMMANDS.items():
        assert modules and short and "\n" not in short, name


def test_help_lists_every_command_without_importing_any_command_module() -> None:
    code = ("import sys; from fleet.cli.app import main; rc = main(['--help']); "
            "loaded = sorted(m for m in sys.modules if m.startswith('fleet.cli.cmd_')); "
            "print('LOADED', loaded); sys.exit(rc)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=False, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    assert "LOADED []" in res.stdout
    for name in app_mod.COMMANDS:
        assert f" {name} " in res.stdout


def test_short_h_is_help_and_a_subcommand_runs_after_lazy_load() -> None:
    runner = CliRunner()
    res = runner.invoke(app_mod.app, ["-h"])
    assert res.exit_code == 0 and "deploy" in res.output
    res = runner.invoke(app_mod.app, ["group", "-h"])
    assert res.exit_code == 0 and "Usage" in res.output and "list" in res.output
