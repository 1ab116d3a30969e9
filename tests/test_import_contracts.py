"""Who may import whom: the import-linter contracts in pyproject.toml hold on the tree,
cover every controller module, and really fail when an agent module imports the
controller (shown on a throwaway copy of the sources)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import cast

ROOT = Path(__file__).resolve().parents[1]


def _contracts() -> dict[str, dict[str, object]]:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["name"]: c for c in cfg["contracts"]}


#: lint-imports with the editable install's import hook removed, so that ``fleet`` and
#: ``fleet_agent`` are found on PYTHONPATH (the tree given), not redirected to the checkout.
_RUN = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
        "if type(f).__name__ != 'ScikitBuildRedirectingFinder']; "
        "from importlinter.cli import lint_imports_command; "
        "lint_imports_command(['--no-cache', sys.argv[1]])")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": f"{root / 'agents'}:{root}", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", _RUN, str(root / "pyproject.toml")],
                          cwd=root, env=env, capture_output=True, text=True, check=False)


def _controller_modules() -> set[str]:
    out = set()
    for p in (ROOT / "fleet").iterdir():
        if p.name.startswith("_") or p.name == "__pycache__":
            continue
        if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py":
            out.add(f"fleet.{p.stem}")
    return out


def test_the_contracts_hold_on_the_tree() -> None:
    res = _lint(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "BROKEN" not in res.stdout


def test_every_controller_module_is_named_by_the_core_and_cli_contracts() -> None:
    contracts = _contracts()
    core = set(cast(list[str], contracts["fleet.core imports neither the controller nor the "
                                         "agent"]["forbidden_modules"]))
    domain = set(cast(list[str], contracts["no domain module imports the CLI"]
                      ["source_modules"]))
    modules = _controller_modules() - {"fleet.core"}
    assert modules - core == set(), "add new controller modules to the core contract"
    assert modules - domain - {"fleet.cli", "fleet.demo"} == set(), \
        "add new domain modules to the CLI contract"


def test_an_agent_module_importing_the_controller_breaks_the_check(tmp_path: Path) -> None:
    copy = tmp_path / "tree"
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "bin")
    shutil.copytree(ROOT / "fleet", copy / "fleet", ignore=ignore)
    shutil.copytree(ROOT / "agents" / "fleet_agent", copy / "agents" / "fleet_agent",
                    ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    assert _lint(copy).returncode == 0  # the copy alone is clean
    victim = copy / "agents" / "fleet_agent" / "verbs_basic.py"
    victim.write_text(victim.read_text() + "\nfrom fleet.registry import Registry  # noqa\n")
    res = _lint(copy)
    assert res.returncode != 0
    assert "the agent imports only fleet.core from fleet BROKEN" in res.stdout
    assert "fleet_agent.verbs_basic -> fleet.registry" in res.stdout
