"""The CLI's lazy command table matches what the command modules define, and help works
without importing them."""

from __future__ import annotations

import json
import re
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


def _walk(command, path):  # type: ignore[no-untyped-def]
    yield path, command
    for name in (getattr(command, "commands", {}) and command.list_commands(None)) or []:
        yield from _walk(command.get_command(None, name), [*path, name])


def test_every_command_has_a_description_an_example_and_no_fake_metavar() -> None:
    """Every command and subcommand, walked from the root: `--help` has a description and
    an `Example` line; no option shows a Python type (`<bool>`, `<list[str]>`) as the
    value it takes; a flag shows none; every command that prints data has -o/--output."""
    app_mod.load_all()
    root = typer.main.get_command(app_mod.app)
    runner = CliRunner()
    seen, problems = [], []
    for path, command in _walk(root, []):
        res = runner.invoke(app_mod.app, [*path, "--help"], env={"COLUMNS": "100"})
        label = " ".join(path) or "fleet"
        seen.append(label)
        if res.exit_code != 0:
            problems.append(f"{label}: --help exits {res.exit_code}")
            continue
        if not (command.help or "").strip():
            problems.append(f"{label}: no description")
        if "Example" not in res.output:
            problems.append(f"{label}: no example")
        options = res.output.split("Options:", 1)[-1]
        problems.extend(f"{label}: fake metavar {bad}" for bad in
                        ("<bool>", "<list[", "<str>", "<int>", "<float>", "<path>")
                        if bad in options)
        params = {o for p in command.params for o in getattr(p, "opts", [])}
        if "--json" in params:
            if "--output" not in params:
                problems.append(f"{label}: prints data but has no --output")
            # a flag: its help follows the name, no value placeholder between
            if not re.search(r"^\s*--json( {2,}|$)", options, re.M):
                problems.append(f"{label}: --json shows a value")
    assert not problems, "\n".join(problems)
    assert {"fleet", "device list", "deploy", "group create", "lab status"} <= set(seen)
    assert len(seen) > 40


def test_version_short_help_and_completion_are_installable(tmp_path) -> None:  # type: ignore[no-untyped-def]
    runner = CliRunner()
    res = runner.invoke(app_mod.app, ["--version"])
    assert res.exit_code == 0 and "mnn-fleet" in res.output
    res = runner.invoke(app_mod.app, ["device", "list", "-h"])
    assert res.exit_code == 0 and "--output" in res.output
    res = runner.invoke(app_mod.app, ["--show-completion", "bash"])
    assert res.exit_code == 0 and "_FLEET_COMPLETE=complete_bash" in res.output
    res = runner.invoke(app_mod.app, ["--install-completion", "bash"],
                        env={"HOME": str(tmp_path), "SHELL": "/bin/bash"})
    assert res.exit_code == 0, res.output
    assert (tmp_path / ".bash_completions" / "fleet.sh").is_file()
    assert ".bash_completions/fleet.sh" in (tmp_path / ".bashrc").read_text()
    # completion reaches the lazily loaded subcommands and -o's choices
    code = ("import sys; from fleet.cli.app import main; sys.exit(main())")
    res2 = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False, env={"_FLEET_COMPLETE": "complete_bash",
                                            "COMP_WORDS": "fleet device list -o ",
                                            "COMP_CWORD": "4", "PATH": "/usr/bin:/bin"})
    assert res2.stdout.split() == ["json", "yaml", "wide", "tsv"], res2.stderr


def test_a_group_split_over_modules_is_whole_when_one_module_was_imported_first() -> None:
    # cmd_device imported alone (as a test or a library user might) registers `device`
    # without cmd_bootstrap's subcommand: the lazy table still loads the rest of it
    code = ("import fleet.cli.cmd_device\n"
            "from typer.testing import CliRunner\n"
            "from fleet.cli.app import app\n"
            "r = CliRunner().invoke(app, ['device', 'bootstrap', '--help'])\n"
            "print(r.exit_code, 'Usage: fleet device bootstrap' in r.output)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["0", "True"]


def test_a_command_of_the_controller_extra_says_which_extra_is_missing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # a board's install has no plotly (pyproject's `controller` extra): None in sys.modules
    # makes its import fail as it would there
    code = ("import sys\n"
            "sys.modules['plotly'] = None\n"
            "from fleet.cli.app import main\n"
            "h = sys.argv[1]\n"
            "assert main(['--home', h, 'init']) == 0\n"
            "sys.exit(main(['--home', h, 'report', '--html', h + '/r.html', '--json']))\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "home")],
                       capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    doc = json.loads(r.stdout[r.stdout.index("{"):])
    assert doc["error"]["code"] == "usage" and "mnn-fleet[controller]" in doc["error"]["message"]
    assert "needs plotly," in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "home" / "r.html").exists()
