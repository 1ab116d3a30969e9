"""Finding 9 (``cases/device-text-rich-markup``): text from a device is printed as text.
A device message holding ``[/]`` must not crash the report; ``[b]..[/b]`` must show as is."""

from __future__ import annotations

from typing import Any

import pytest
from rich.console import Console
from rich.text import Text

from fleet.cli._output import literal, table
from fleet.core import errors


def _render(obj: Any, markup: bool = True) -> str:
    c = Console(record=True, width=200, color_system=None)
    c.print(obj, markup=markup)
    return c.export_text()


def test_table_cells_holding_a_closing_tag_print_literally() -> None:
    text = _render(table("deploy", ["device", "error"], [("x", "[/] oops"), ("a", "ok")]))
    assert "[/] oops" in text and "ok" in text


def test_table_cells_holding_style_tags_are_not_interpreted() -> None:
    c = Console(record=True, width=200, force_terminal=True)
    c.print(table(None, ["device", "error"], [("y", "[b]INJECTED[/b]")]))
    assert "[b]INJECTED[/b]" in c.export_text()
    assert "\x1b[1m" not in c.export_text(styles=True).split("INJECTED")[0][-20:]


def test_table_title_is_literal() -> None:
    assert "[/]" in _render(table("[/]", ["a wide column"], [("1",)]))


def test_renderables_built_by_the_caller_stay() -> None:
    assert "styled" in _render(table(None, ["a"], [(Text("styled", style="bold"),)]))


def test_literal_escapes_markup_in_f_strings() -> None:
    assert "[link=http://x]click[/link]" in _render(
        f"[bold]k[/]: {literal('[link=http://x]click[/link]')}")


def test_cli_error_path_prints_device_text_as_text(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``_FleetGroup.invoke``: the one place every command's FleetError is printed."""
    import typer
    from typer.core import TyperGroup

    from fleet.cli.app import _FleetGroup

    def boom(self: Any, ctx: Any) -> Any:
        raise errors.DeviceError("agent said: [/] oops [b]INJECTED[/b]")

    monkeypatch.setattr(TyperGroup, "invoke", boom)
    with pytest.raises(typer.Exit) as info:
        _FleetGroup(name="fleet").invoke(None)
    assert info.value.exit_code == 16
    assert "[/] oops [b]INJECTED[/b]" in capsys.readouterr().err
