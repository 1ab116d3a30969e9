"""Shared fixtures: a temporary controller home with an initialised registry; a signing key
and an agent device root (tests/package_kit.py) for the package and store tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from fleet.home import FleetHome
from fleet.registry import Registry
from tests.package_kit import Device, make_device

#: the two registry backends: the db_backend, pg_cluster and pg_database fixtures, the
#: backends marker and its parametrisation (tests/pgfixture.py)
pytest_plugins = ["tests.pgfixture"]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def db_url(tmp_path: Path, db_backend: str, request: pytest.FixtureRequest) -> str:
    """An empty registry database on the test's backend (tests/pgfixture.py)."""
    if db_backend == "postgresql":
        return str(request.getfixturevalue("pg_cluster").url(
            request.getfixturevalue("pg_database")))
    return f"sqlite:///{tmp_path / 'r.db'}"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, db_backend: str,
         request: pytest.FixtureRequest) -> FleetHome:
    """A controller home; on PostgreSQL its registry is an empty database (FLEET_DB)."""
    path = tmp_path / "home"
    monkeypatch.setenv("FLEET_HOME", str(path))
    monkeypatch.delenv("FLEET_DB", raising=False)
    if db_backend == "postgresql":
        monkeypatch.setenv("FLEET_DB", request.getfixturevalue("db_url"))
    return FleetHome.from_env(path)


@pytest.fixture
def registry(home: FleetHome, db_backend: str, request: pytest.FixtureRequest
             ) -> Iterator[Registry]:
    if db_backend == "postgresql":  # a copy of the migrated template, not a migration
        from tests.pgfixture import clone_head

        clone_head(request.getfixturevalue("pg_cluster"),
                   request.getfixturevalue("pg_database"))
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


@pytest.fixture
def signer() -> ed25519.Ed25519PrivateKey:
    """A controller signing key (Ed25519), fresh per test."""
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture
def dev(tmp_path: Path, signer: ed25519.Ed25519PrivateKey) -> Device:
    """An agent device root under ``tmp_path/dev`` that trusts ``signer``."""
    return make_device(tmp_path / "dev", signer)
