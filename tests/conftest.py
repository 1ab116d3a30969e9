"""Shared fixtures: a temporary controller home with an initialised registry."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.home import FleetHome
from fleet.registry import Registry

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FleetHome:
    path = tmp_path / "home"
    monkeypatch.setenv("FLEET_HOME", str(path))
    monkeypatch.delenv("FLEET_DB", raising=False)
    return FleetHome.from_env(path)


@pytest.fixture
def registry(home: FleetHome) -> Iterator[Registry]:
    reg = Registry.init(home)
    yield reg
    reg.close()


@pytest.fixture
def run_fleet(home: FleetHome):  # type: ignore[no-untyped-def]
    """Invoke the CLI in-process through typer's CliRunner; returns the Result."""
    from typer.testing import CliRunner

    from fleet.cli.app import app

    runner = CliRunner()

    def _run(*args: str, input: str | None = None):  # type: ignore[no-untyped-def]
        return runner.invoke(app, ["--home", str(home.path), *args], input=input,
                             env={"NO_COLOR": "1", "COLUMNS": "200",
                                  "FLEET_HOME": str(home.path)})

    return _run


def local_uri(tmp_path: Path, name: str) -> str:
    return f"local://{name}?root={tmp_path / 'devices' / name}"


os.environ.setdefault("NO_COLOR", "1")
