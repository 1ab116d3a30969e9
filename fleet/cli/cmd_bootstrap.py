"""``fleet device bootstrap DEVICE``: install the agent on a board from a pushed wheelhouse."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fleet.cli._ctx import state
from fleet.cli._output import emit, err
from fleet.cli.cmd_device import device_app
from fleet.registry import Device, Registry

if TYPE_CHECKING:  # imported when the command runs: `fleet device list` must stay light
    from fleet.bootstrap import BootstrapResult
    from fleet.rollout.fanout import TaskContext


@device_app.command("bootstrap")
def bootstrap_cmd(
    name: str,
    venv: Annotated[str, typer.Option(help="Virtualenv path on the device.")
                    ] = "~/.fleet-agent-venv",
    python: Annotated[str, typer.Option(help="The device's Python.")] = "python3",
    wheelhouse: Annotated[Path | None, typer.Option(
        help="A ready wheelhouse (one mnn-fleet wheel and its dependencies' wheels) to install "
             "as it is, instead of one made from this installation of mnn-fleet.")] = None,
    cache: Annotated[Path | None, typer.Option(
        help="Where the wheelhouse made from this installation is cached "
             "(default: <home>/wheelhouse).")] = None,
    rebuild: Annotated[bool, typer.Option(help="Rebuild the cached wheels.")] = False,
    keep_wheels: Annotated[bool, typer.Option(help="Leave the wheels on the device.")] = False,
    set_agent: Annotated[bool, typer.Option(
        "--set-agent/--no-set-agent", help="Point the registry's agent command at the "
                                           "installed agent.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Build (once) and push a wheelhouse, make a venv on the device, install, check.

    Examples:

    \b
      fleet device bootstrap pi4
      fleet device bootstrap pi4 --wheelhouse ./wheels-aarch64
    """
    from fleet.bootstrap import Wheelhouse, bootstrap, wheelhouse_from_dir
    from fleet.bootstrap_board import ask_board
    from fleet.bootstrap_cross import wheelhouse_for
    from fleet.connect import device_session
    from fleet.rollout.fanout import call_each

    home = state().home
    reg = Registry.open(home)
    dev = reg.get_device(name)
    given = wheelhouse_from_dir(wheelhouse) if wheelhouse else None
    houses: list[Wheelhouse] = []

    def log(m: str) -> None:
        err.print(m, highlight=False, markup=False)

    def task(d: Device, ctx: TaskContext) -> BootstrapResult:
        with device_session(home, d, ctx) as agent:
            # the board says what it runs (machine, CPython ABI, glibc); the wheelhouse is
            # made for exactly that (cross-built for another architecture)
            board = ask_board(agent.transport, python, device=d.name)
            house = given or wheelhouse_for(cache or home.path / "wheelhouse", board,
                                            rebuild=rebuild, log=log)
            houses.append(house)
            if house.build_s:
                err.print(f"wheelhouse for {house.tag} built in {house.build_s:.1f}s "
                          f"({len(house.wheels)} wheels)")
            return bootstrap(agent.transport, d.name, house, venv=venv, agent_root=agent.root,
                             python=python, keep_wheels=keep_wheels, log=log, board=board)

    # installing is not idempotent halfway: no retries; pip over a slow link takes time
    outcome = call_each([dev], task, workers=1, deadline_s=1800.0, retries=0)
    outcome.raise_for_failures("bootstrap")
    result = outcome[name].result
    assert result is not None  # succeeded: the task returned it
    if set_agent:
        reg.update_device(name, agent_cmd=result.agent_cmd,
                          agent_version=result.agent_status.get("agent_version"))
    data = asdict(result)
    data["wheelhouse_build_s"] = round(houses[0].build_s, 1) if houses else 0.0
    data["wheelhouse_tag"] = houses[0].tag if houses else None
    emit(data, as_json=as_json,
         render=lambda c: c.print(
             f"{name}: agent {result.agent_status.get('agent_version')} installed in "
             f"{result.venv} ({result.wheels_sent}/{result.wheels} wheels sent, "
             f"{result.timings['total_s']:.1f}s)"))
