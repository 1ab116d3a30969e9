"""Destructive commands ask first (or need --yes), and one agent is one device."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

from fleet.home import FleetHome
from fleet.registry import Registry
from tests.conftest import REPO, local_uri


def _names(run_fleet) -> list[str]:  # type: ignore[no-untyped-def]
    return [d["name"] for d in json.loads(run_fleet("device", "list", "--json").stdout)]


def test_rm_and_delete_need_yes_without_a_terminal(run_fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert run_fleet("init").exit_code == 0
    run_fleet("group", "create", "g")
    run_fleet("group", "create", "empty")
    assert run_fleet("device", "add", local_uri(tmp_path, "a"), "--name", "a", "-g", "g",
                     "--no-enroll").exit_code == 0
    r = run_fleet("device", "rm", "a")
    assert r.exit_code == 2 and "pass --yes" in r.stderr and len(r.stderr.splitlines()) == 1
    r = run_fleet("group", "delete", "g")
    assert r.exit_code == 2 and "1 device(s)" in r.stderr and "pass --yes" in r.stderr
    assert _names(run_fleet) == ["a"]
    groups = {g["name"] for g in json.loads(run_fleet("group", "list", "--json").stdout)}
    assert groups == {"g", "empty"}
    assert run_fleet("group", "delete", "empty").exit_code == 0  # nothing in it: no question
    r = run_fleet("group", "delete", "g", "--yes", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout) == {"deleted": "g", "devices": 1}
    assert _names(run_fleet) == ["a"]  # the devices of a deleted group stay
    assert run_fleet("device", "rm", "a", "-y").exit_code == 0
    assert _names(run_fleet) == []
    assert run_fleet("device", "rm", "a", "--yes").exit_code == 5  # unknown: not found


def _on_a_terminal(home: FleetHome, argv: list[str], answer: bytes) -> tuple[int, str]:
    """Run ``python -m fleet ARGV`` with a pseudo-terminal as stdin/stdout (a real TTY:
    what an operator has), type ``answer`` once it asks, return (exit code, output)."""
    main, sub = pty.openpty()
    env = {**os.environ, "FLEET_HOME": str(home.path), "NO_COLOR": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fleet", *argv], stdin=sub, stdout=sub,
                            stderr=sub, env=env, cwd=REPO, close_fds=True)
    os.close(sub)
    seen = b""
    answered = False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(main, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        if not answered and b"[y/N]" in seen:
            os.write(main, answer)
            answered = True
        if proc.poll() is not None and not ready:
            break
    os.close(main)
    return proc.wait(timeout=30), seen.decode(errors="replace")


def test_a_terminal_is_asked(run_fleet, home: FleetHome, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run_fleet("init")
    run_fleet("group", "create", "g")
    run_fleet("device", "add", local_uri(tmp_path, "a"), "--name", "a", "-g", "g",
              "--no-enroll")
    code, text = _on_a_terminal(home, ["group", "delete", "g"], b"n\n")
    assert "delete group g with 1 device(s)" in text and code == 1, text
    assert [g["name"] for g in json.loads(run_fleet("group", "list", "--json").stdout)] == ["g"]
    code, text = _on_a_terminal(home, ["device", "rm", "a"], b"y\n")
    assert code == 0 and "device a removed" in text, text
    assert _names(run_fleet) == []


def test_the_same_agent_under_a_second_name_is_refused_unless_replace(  # type: ignore[no-untyped-def]
        run_fleet, home: FleetHome, tmp_path: Path) -> None:
    run_fleet("init")
    run_fleet("group", "create", "old")
    run_fleet("group", "create", "new")
    uri = local_uri(tmp_path, "board")
    first = run_fleet("device", "add", uri, "--name", "board", "-g", "old", "--tag",
                      "site=lab", "--json")
    assert first.exit_code == 0, first.output
    before = json.loads(first.stdout)
    # the same device root, i.e. the same agent and key, under another name
    r = run_fleet("device", "add", uri + "&x=1", "--name", "board2", "--json")
    assert r.exit_code == 6, r.output
    assert "already registered as 'board'" in r.stderr and "--replace" in r.stderr
    assert _names(run_fleet) == ["board"]  # nothing left behind
    r = run_fleet("device", "add", uri + "&x=1", "--name", "board2", "-g", "new", "--tag",
                  "rack=2", "--replace", "--json")
    assert r.exit_code == 0, r.output
    moved = json.loads(r.stdout)
    assert moved["replaced"] == "board" and moved["name"] == "board2"
    assert moved["id"] == before["id"]  # the same record: its history comes along
    assert moved["fingerprint"] == before["fingerprint"]
    assert moved["uri"] == uri + "&x=1"
    assert moved["tags"] == {"site": "lab", "rack": "2"}
    assert moved["groups"] == ["new", "old"]
    assert _names(run_fleet) == ["board2"]
    reg = Registry.open(home)
    assert reg.get_device("board2").public_key  # enrolled, key kept
    reg.close()
    # a different agent is not a duplicate
    other = run_fleet("device", "add", local_uri(tmp_path, "other"), "--name", "other")
    assert other.exit_code == 0, other.output
