"""Versions are allocated atomically: one payload digest per ``name@version``, ever
(issue 13, fault 6; case ``concurrent-deploy-version-race``)."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from fleet_agent.identity import public_pem
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from fleet.artifacts import init_signing_key, load_signing_key
from fleet.core import errors
from fleet.home import FleetHome
from fleet.registry import Registry
from fleet.registry import versions as ver
from fleet.registry.db import make_engine
from fleet.registry.versions import claim_version, record_package
from tests.conftest import REPO
from tests.package_kit import make_device, make_tiny_mnn


def _digest(i: int | str) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


pytestmark = pytest.mark.backends  # SQLite and PostgreSQL (tests/pgfixture.py)


def _digests_per_version(home: FleetHome, table: str) -> dict[tuple[str, int], int]:
    engine = make_engine(home.db_url)
    try:
        with engine.connect() as db:
            rows = db.execute(text(f"SELECT name, version, count(DISTINCT digest) FROM "
                                   f"{table} GROUP BY name, version")).fetchall()
    finally:
        engine.dispose()
    return {(n, v): c for n, v, c in rows}


# -- the allocator's rules ---------------------------------------------------------------
def test_a_new_digest_gets_the_next_version_and_the_same_digest_its_own(
        registry: Registry) -> None:
    a = claim_version(registry, name="m", kind="model", digest=_digest("a"))
    b = claim_version(registry, name="m", kind="model", digest=_digest("b"))
    again = claim_version(registry, name="m", kind="model", digest=_digest("a"))
    other = claim_version(registry, name="n", kind="model", digest=_digest("a"))
    assert (a.version, a.reused) == (1, False)
    assert (b.version, b.reused) == (2, False)
    assert (again.version, again.reused) == (1, True)
    assert other.version == 1  # versions count per name


def test_an_explicit_version_holding_another_digest_is_refused(registry: Registry) -> None:
    claim_version(registry, name="m", kind="model", digest=_digest("a"), version=3)
    with pytest.raises(errors.DuplicateError, match="exists with another digest") as ei:
        claim_version(registry, name="m", kind="model", digest=_digest("b"), version=3)
    assert ei.value.details["version"] == 3
    same = claim_version(registry, name="m", kind="model", digest=_digest("a"), version=3)
    assert same.reused and same.version == 3
    # the refused claim wrote nothing: the next free version is still 4
    assert claim_version(registry, name="m", kind="model", digest=_digest("c")).version == 4


def test_a_name_is_one_namespace_for_models_and_lora_packs(registry: Registry) -> None:
    claim_version(registry, name="m", kind="model", digest=_digest("a"))
    with pytest.raises(errors.DuplicateError, match="exists as a model"):
        claim_version(registry, name="m", kind="lora", digest=_digest("a"), version=1)
    assert claim_version(registry, name="m", kind="lora", digest=_digest("z")).version == 2


def test_a_package_is_never_recorded_under_a_version_of_another_digest(
        registry: Registry) -> None:
    """`fleet deploy ready.fpkg`: the package's own name@version is checked as it is
    recorded, in the same transaction."""
    claim_version(registry, name="m", kind="model", digest=_digest("a"))
    kw: dict[str, Any] = {"name": "m", "kind": "model", "version": 1, "size": 1,
                          "path": "/x.fpkg",
                          "manifest": {}}
    with pytest.raises(errors.DuplicateError, match="exists with another digest"):
        record_package(registry, digest=_digest("b"), package_sha256=_digest("p1"), **kw)
    art, claim = record_package(registry, digest=_digest("a"), package_sha256=_digest("p2"),
                                **kw)
    assert claim.reused and art.version == 1
    again, _ = record_package(registry, digest=_digest("a"), package_sha256=_digest("p2"),
                              **kw)
    assert again.id == art.id  # the same file is one row
    fresh, new = record_package(registry, digest=_digest("c"), package_sha256=_digest("p3"),
                                **{**kw, "version": 7})
    assert not new.reused and fresh.version == 7


def test_version_zero_is_a_usage_error(registry: Registry) -> None:
    with pytest.raises(errors.UsageError, match="start at 1"):
        claim_version(registry, name="m", kind="model", digest=_digest("a"), version=0)


def test_the_database_refuses_two_digests_for_one_version(registry: Registry) -> None:
    """The UNIQUE(name, version) constraint itself, under any code path."""
    claim_version(registry, name="m", kind="model", digest=_digest("a"))
    with registry.engine.connect() as conn, pytest.raises(IntegrityError):
        conn.exec_driver_sql(
            "INSERT INTO artifact_versions (id, name, version, kind, digest, created_at) "
            "VALUES ('00000000000000000000000000000001', 'm', 1, 'model', 'ff', "
            "'2026-01-01 00:00:00')")


def test_a_claim_that_loses_a_race_reads_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a server backend two claims can both read "free" and one insert fails on the
    constraint: the claim retries (and gives up as a clean RegistryBusyError)."""
    monkeypatch.setattr(ver.time, "sleep", lambda _s: None)
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise IntegrityError("INSERT", {}, Exception("UNIQUE constraint failed"))
        return "won"

    assert ver._retrying(flaky, "m") == "won" and len(calls) == 3

    def always() -> str:
        raise IntegrityError("INSERT", {}, Exception("UNIQUE constraint failed"))

    with pytest.raises(errors.RegistryBusyError, match="allocate a version of m"):
        ver._retrying(always, "m")


# -- concurrency -------------------------------------------------------------------------
def test_threads_claiming_at_once_get_distinct_versions(home: FleetHome,
                                                        registry: Registry) -> None:
    n = 12
    barrier = threading.Barrier(n)
    got: dict[int, int] = {}
    failures: list[BaseException] = []

    def worker(i: int) -> None:
        reg = Registry.open(home)  # its own engine, like another command
        try:
            barrier.wait()
            got[i] = claim_version(reg, name="m", kind="model", digest=_digest(i)).version
        except BaseException as exc:  # reported below
            failures.append(exc)
        finally:
            reg.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures, failures
    assert sorted(got.values()) == list(range(1, n + 1))
    assert set(_digests_per_version(home, "artifact_versions").values()) == {1}


CLAIMER = r"""
import hashlib, sys
from fleet.home import FleetHome
from fleet.registry import Registry
from fleet.registry.versions import claim_version, record_package
reg = Registry.open(FleetHome.from_env(sys.argv[1]))
for i in range(int(sys.argv[3])):
    d = hashlib.sha256(f"{sys.argv[2]}-{i}".encode()).hexdigest()
    print(claim_version(reg, name="m", kind="model", digest=d).version, flush=True)
"""


def test_two_processes_claiming_at_once_never_share_a_version(home: FleetHome,
                                                              registry: Registry) -> None:
    n = 25
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, str(home.path), p, str(n)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for p in ("a", "b")]
    versions: list[int] = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        versions += [int(x) for x in out.split()]
    assert sorted(versions) == list(range(1, 2 * n + 1))


# -- through the CLI ---------------------------------------------------------------------
def _enrolled(tmp_path: Path, home: FleetHome, reg: Registry, name: str) -> Path:
    d = make_device(tmp_path / "devices" / name, load_signing_key(home))
    pem, fp = public_pem(d.key)
    reg.add_device(name, f"local://{name}?root={d.ctx.root}", public_key=pem, fingerprint=fp)
    return d.ctx.root


def test_deploy_with_a_taken_version_of_another_build_is_refused(  # type: ignore[no-untyped-def]
        run_fleet, home: FleetHome, registry: Registry, tmp_path: Path) -> None:
    init_signing_key(home)
    _enrolled(tmp_path, home, registry, "a")
    first = make_tiny_mnn(tmp_path / "first.mnn", seed=1)
    other = make_tiny_mnn(tmp_path / "other.mnn", seed=2)
    r = run_fleet("package", str(first), "--name", "m", "--version", "1", "--for", "a",
                  "-o", str(tmp_path / "m1.fpkg"), "--json")
    assert r.exit_code == 0, r.stderr
    r = run_fleet("deploy", str(other), "--name", "m", "--version", "1", "--device", "a",
                  "--json")
    assert r.exit_code == 6, r.output + r.stderr  # DuplicateError
    assert "m@1 exists with another digest" in r.stderr
    assert "Traceback" not in r.output + r.stderr
    # nothing was sent, and the registry still says m@1 is the first build
    assert not list((tmp_path / "devices" / "a").rglob("*.fpkg"))
    assert _digests_per_version(home, "artifact_versions")[("m", 1)] == 1
    r = run_fleet("deploy", str(tmp_path / "m1.fpkg"), "--device", "a", "--json",
                  "--iterations", "1", "--warmup", "0")
    assert r.exit_code == 0, r.output + r.stderr  # the same build: reused, deployed


DEPLOY = [sys.executable, "-m", "fleet"]


def test_two_concurrent_deploys_of_one_name_never_share_a_version(
        home: FleetHome, registry: Registry, tmp_path: Path) -> None:
    """Two `fleet deploy` processes, different builds, one name, at once: two distinct
    versions or one clean refusal; never two digests for one name@version, in the
    registry or on the device."""
    init_signing_key(home)
    root = _enrolled(tmp_path, home, registry, "d")
    models = [make_tiny_mnn(tmp_path / f"{k}.mnn", seed=s) for k, s in (("a", 11), ("b", 12))]
    env = {"FLEET_HOME": str(home.path), "FLEET_DB": home.db_url, "NO_COLOR": "1",
           "PATH": "/usr/bin:/bin", "PYTHONPATH": f"{REPO / 'agents'}:{REPO}"}
    procs = [subprocess.Popen([*DEPLOY, "deploy", str(m), "--name", "m", "--device", "d",
                               "--json", "--iterations", "1", "--warmup", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env, cwd=REPO) for m in models]
    outs = [p.communicate(timeout=300) for p in procs]
    versions = []
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert "Traceback" not in err, err
        # ok; duplicate refused (6); the device refused the older build (15: its one
        # device failed that way, so the exit code says so); plan refused (17); partial (20)
        assert p.returncode in (0, 6, 15, 17, 20), (p.returncode, err)
        said = re.search(r"\bm@(\d+)", err)  # "packaging m@N" / "deploying m@N"
        versions.append(int(said.group(1)) if said else None)
    assert _digests_per_version(home, "artifact_versions") and \
        set(_digests_per_version(home, "artifact_versions").values()) == {1}
    assert set(_digests_per_version(home, "artifacts").values()) == {1}
    built = [v for v in versions if v is not None]
    assert len(built) == len(set(built)), versions
    from fleet_agent.cli import dispatch
    from fleet_agent.context import AgentContext
    st = dispatch(AgentContext(root), "status", {})
    installed = st["installed"]["m"]
    assert installed["active"] in built
