"""``$FLEET_HOME/config.toml`` (fleet.config): set once, used by every command; the
environment and flags override it; a broken file is one clear line, exit 2."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from fleet import config
from fleet.core import errors
from fleet.home import FleetHome


def test_the_registry_url_comes_from_the_file_unless_env_or_flag_say_otherwise(
        run_fleet, home: FleetHome, tmp_path: Path,  # type: ignore[no-untyped-def]
        monkeypatch: pytest.MonkeyPatch) -> None:
    from_file, from_env, from_flag = (tmp_path / f"{n}.db" for n in ("file", "env", "flag"))
    config.update(home.path, {"registry.url": f"sqlite:///{from_file}",
                              "broker.url": "redis://farm:6379/0"})
    r = run_fleet("init", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["db"] == f"sqlite:///{from_file}" and from_file.exists()
    assert not (home.path / "registry.db").exists()
    monkeypatch.setenv("FLEET_DB", f"sqlite:///{from_env}")
    assert run_fleet("init").exit_code == 0 and from_env.exists()
    assert run_fleet("--db", f"sqlite:///{from_flag}", "init").exit_code == 0
    assert from_flag.exists()
    monkeypatch.delenv("FLEET_DB")
    assert run_fleet("group", "create", "g").exit_code == 0  # the file's registry again
    assert FleetHome.from_env(home.path).db_url == f"sqlite:///{from_file}"


def test_update_keeps_other_keys_removes_none_and_writes_0600(tmp_path: Path) -> None:
    config.update(tmp_path, {"registry.url": "sqlite:///a.db", "worker.heartbeat_s": 2.5})
    cfg = config.update(tmp_path, {"broker.url": "redis://x", "registry.url": None})
    assert cfg.registry_url is None and cfg.broker_url == "redis://x"
    assert cfg.get("worker.heartbeat_s") == 2.5 and cfg.get("worker.nope", 7) == 7
    assert stat.S_IMODE((tmp_path / "config.toml").stat().st_mode) == 0o600
    assert config.load(tmp_path / "elsewhere").doc == {}  # no file: no settings


@pytest.mark.parametrize(("text", "words"), [
    ("[registry\nurl = 1", "not valid TOML"),
    ("[registry]\nurl = 5\n", "registry.url must be a string"),
])
def test_a_broken_file_is_one_line_exit_2(run_fleet, home: FleetHome,  # type: ignore[no-untyped-def]
                                         text: str, words: str) -> None:
    home.path.mkdir(parents=True)
    (home.path / "config.toml").write_text(text)
    with pytest.raises(errors.UsageError, match=words):
        config.load(home.path)
    r = run_fleet("status")
    assert r.exit_code == 2 and words in r.stderr and "config.toml" in r.stderr
    assert "Traceback" not in r.output
