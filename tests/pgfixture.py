"""The registry's two backends for the tests: SQLite, and a private PostgreSQL cluster.

One cluster serves the whole run (:func:`pg_cluster`, session scope, started the first
time a test asks for PostgreSQL and removed at the end; fsync off, it is thrown away). A
template database migrated to head is made once; every test gets a database of its own,
empty (:func:`db_url`) or cloned from that template (``CREATE DATABASE ... TEMPLATE`` is
a file copy, ~0.1 s, where migrating takes ~1.5 s), dropped after it.

A module (or one test) opts in with ``pytestmark = pytest.mark.backends``: its tests then
run once per backend (ids ``[sqlite]``/``[postgresql]``). ``@pytest.mark.backends("sqlite")``
on one test keeps it on SQLite alone (WAL, read-only mounts: SQLite's own behaviour).
Tests that do not opt in run on SQLite only, as before.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from fleet.lab import pg

BACKENDS = ("sqlite", "postgresql")
#: the database every PostgreSQL test's registry is cloned from (migrated to head)
TEMPLATE = "fleet_head"
_names = itertools.count()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "backends(*names): run the test on each registry backend (default: "
        "sqlite and postgresql)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("backends")
    if marker is None or "db_backend" not in metafunc.fixturenames:
        return
    names = marker.args or BACKENDS
    metafunc.parametrize("db_backend", list(names), indirect=True, ids=list(names))


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[pg.PgCluster]:
    """One private PostgreSQL cluster for the whole test run, with the head template."""
    from fleet.registry.db import migrate

    cluster = pg.create(pg.private_root(None, prefix="fleet-pg-test-"), durable=False,
                        listen=["127.0.0.1"])  # TCP too, password only: the login tests
    try:
        pg.start(cluster, database=None)
        cluster.create_database(TEMPLATE)
        migrate(cluster.url(TEMPLATE))
        yield cluster
    finally:
        pg.destroy(cluster)


@pytest.fixture
def db_backend(request: pytest.FixtureRequest) -> str:
    """``sqlite`` or ``postgresql`` (see the module docstring); sqlite unless parametrised."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
def pg_database(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test; its name (dropped afterwards)."""
    cluster: pg.PgCluster = request.getfixturevalue("pg_cluster")
    name = f"t{next(_names)}"
    cluster.create_database(name)
    yield name
    cluster.drop_database(name)


def clone_head(cluster: pg.PgCluster, name: str) -> str:
    """Replace database ``name`` by a copy of the head template; its URL."""
    cluster.drop_database(name)
    return cluster.create_database(name, template=TEMPLATE)
