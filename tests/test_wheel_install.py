"""mnn-fleet as a user gets it: a wheel installed into a fresh venv, no checkout in sight.

The wheel is built from this checkout (``pip wheel --no-deps --no-build-isolation``, reusing
the native build directory), then installed with pip into a new venv made in a temp dir,
offline, from a wheelhouse of the runtime dependencies (``fleet.bootstrap.dependency_wheels``:
``pip wheel`` of the requirements, cached in ``build/wheelhouse-cache`` beside the lab's
bootstrap test, so only the first run on a machine downloads). Test extras (torch) are not
installed. Every command runs from a temp cwd with that venv's own ``fleet``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleet.bootstrap import dependency_wheels

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "build" / "wheelhouse-cache"
TINY = REPO / "models" / "tiny" / "tiny.mnn"


@dataclass
class Install:
    venv: Path
    wheel: Path
    deps_dir: Path
    work: Path  # temp cwd, outside the checkout
    env: dict[str, str]

    def run(self, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), cwd=self.work, env=self.env, capture_output=True,
                              text=True, timeout=timeout, check=False)

    def fleet(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self.run(str(self.venv / "bin" / "fleet"), *args, timeout=timeout)

    def python(self, code: str) -> str:
        res = self.run(str(self.venv / "bin" / "python"), "-c", code)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()


def _check(res: subprocess.CompletedProcess[str]) -> None:
    assert res.returncode == 0, f"{res.args}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"


@pytest.fixture(scope="module")
def install(tmp_path_factory: pytest.TempPathFactory) -> Install:
    base = tmp_path_factory.mktemp("wheel-install")
    dist = base / "dist"
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "FLEET_HOME", "FLEET_DB")}
    env |= {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1", "NO_COLOR": "1"}
    _check(subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(dist), str(REPO)],
        capture_output=True, text=True, timeout=1800, check=False, env=env))
    [wheel] = dist.glob("mnn_fleet-*.whl")
    deps = dependency_wheels(CACHE)
    venv = base / "venv"
    _check(subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)],
                          capture_output=True, text=True, timeout=300, check=False, env=env))
    work = base / "cwd"
    work.mkdir()
    # this pip installs into the new venv (--python): offline, from the wheelhouse only
    _check(subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
         "-q", "--no-index", "--find-links", str(deps[0].parent), str(wheel)],
        cwd=work, capture_output=True, text=True, timeout=1800, check=False, env=env))
    env |= {"PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
            "FLEET_HOME": str(base / "home")}
    return Install(venv=venv, wheel=wheel, deps_dir=deps[0].parent, work=work, env=env)


def test_the_wheel_carries_the_migrations_and_both_packages(install: Install) -> None:
    names = set(zipfile.ZipFile(install.wheel).namelist())
    migrations = REPO / "migrations"
    for src in migrations.rglob("*"):
        if src.is_file() and "__pycache__" not in src.parts:
            assert f"fleet/migrations/{src.relative_to(migrations).as_posix()}" in names
    assert "fleet/cli/app.py" in names and "fleet_agent/cli.py" in names
    assert any(n.startswith("fleet_agent/_native.") for n in names)


def test_init_keys_add_deploy_audit_from_a_wheel_in_a_fresh_venv(install: Install) -> None:
    where = json.loads(install.python(
        "import json, sys, fleet, fleet_agent\n"
        "from fleet.registry.db import migrations_dir\n"
        "print(json.dumps([fleet.__file__, fleet_agent.__file__, str(migrations_dir()),"
        " sys.path]))"))
    venv = str(install.venv)
    assert where[0].startswith(venv) and where[1].startswith(venv) and where[2].startswith(venv)
    assert not [p for p in where[3] if p.startswith(str(REPO))], where[3]
    # no test extras: the install holds what a user's would
    assert install.python("import importlib.util as u; print(u.find_spec('torch'))") == "None"

    version = install.python("import importlib.metadata as m; print(m.version('mnn-fleet'))")
    res = install.fleet("--version")
    _check(res)
    assert res.stdout.strip() == f"mnn-fleet {version}"
    res = install.run(str(install.venv / "bin" / "fleet-agent"), "--version")
    _check(res)
    assert res.stdout.strip() == f"mnn-fleet {version}"

    _check(install.fleet("init"))
    _check(install.fleet("keys", "init"))
    device_root = install.work.parent / "devices" / "a"
    _check(install.fleet("device", "add", f"local://a?root={device_root}", "--name", "a"))
    res = install.fleet("deploy", str(TINY), "--device", "a", "--json",
                        "--iterations", "3", "--warmup", "1")
    _check(res)
    [row] = json.loads(res.stdout)["results"]
    assert row["device"] == "a" and row["status"] == "ok", row
    assert row["effective_backend"] == "cpu"
    res = install.fleet("audit", "--device", "a", "--json")
    _check(res)
    [audit] = json.loads(res.stdout)["rows"]
    assert audit["device"] == "a"
    # the agent that ran is the venv's: its store is where the device's URI says
    assert (device_root / "state.json").is_file()


def _digests(wheel: Path) -> dict[str, str]:
    with zipfile.ZipFile(wheel) as zf:
        return {n: hashlib.sha256(zf.read(n)).hexdigest() for n in zf.namelist()
                if not n.endswith(".dist-info/RECORD")}


def test_bootstrap_from_a_wheel_install_ships_the_installed_distribution(
        install: Install) -> None:
    """``fleet device bootstrap`` in the fresh venv: no checkout to build from, so the
    project wheel is made from the install's RECORD; a local "board" gets a venv of its own."""
    cache = install.work.parent / "bootstrap-cache"
    cache.mkdir()
    (cache / install.deps_dir.name).symlink_to(install.deps_dir)  # no second download
    _check(install.fleet("init"))
    board = install.work.parent / "board"
    _check(install.fleet("device", "add", f"local://board?root={board / 'agent'}",
                         "--name", "board"))
    res = install.fleet("device", "bootstrap", "board", "--venv", str(board / "venv"),
                        "--cache", str(cache), "--python", str(install.venv / "bin" / "python"),
                        "--json", timeout=1200)
    _check(res)
    out = json.loads(res.stdout)
    assert out["agent_status"]["ok"] is True
    assert out["agent_cmd"] == [str(board / "venv" / "bin" / "fleet-agent")]
    [remade] = cache.glob("project-*/mnn_fleet-*.whl")
    # the same wheel as the one installed: name (tag) and every member's bytes
    assert remade.name == install.wheel.name
    assert _digests(remade) == _digests(install.wheel)
    # deterministic: made again, the same bytes (so a board holding it is not sent it again)
    again = install.python(
        "import hashlib\nfrom importlib import metadata\nfrom pathlib import Path\n"
        "from fleet.bootstrap import remake_installed_wheel\n"
        "w = remake_installed_wheel(metadata.distribution('mnn-fleet'), Path('again'))\n"
        "print(hashlib.sha256(w.read_bytes()).hexdigest())")
    assert again == hashlib.sha256(remade.read_bytes()).hexdigest()
    probe = install.run(str(board / "venv" / "bin" / "python"), "-c",
                        "import fleet_agent; print(fleet_agent.__file__)")
    _check(probe)
    assert probe.stdout.strip().startswith(str(board / "venv"))
