"""With ``--json`` every error is a JSON document on stdout (issue 15): one real case per
exit code of ``fleet/cli/_exit.py`` (and click's usage errors), each asserting that stdout
parses, names a stable code and the exit status the process returns (a command that
had printed its rows, a list, before it failed keeps them as they are: stdout still parses,
and the status and stderr say what failed).

The faults are real (an OpenSSH ``sshd`` with a host key the fleet has not seen and an
``authorized_keys`` without the fleet's key, a closed port, an agent that answers with a
code this controller does not know, a registry held locked by another connection,
truncated and random model files) except where the table says ``direct``: a mailbox that
never answers needs the app lab, and a read-only, full or failing registry disk needs a
mount (``tests/test_registry_errors.py`` makes those for real); there the error is raised
where the registry is opened (monkeypatched) and the CLI's handler is what is tested.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fleet.artifacts import init_signing_key
from fleet.cli._exit import EXIT_CODES
from fleet.cli.app import app
from fleet.core import errors
from fleet.home import FleetHome
from fleet.registry import Registry
from tests.conftest import REPO

TINY = REPO / "models" / "tiny" / "tiny.mnn"
OTHER = REPO / "models" / "tiny" / "outlier.mnn"
SSHD = "/usr/sbin/sshd"


@dataclass
class Lab:
    root: Path
    main: Path  # initialised, keys, group g, enrolled local device a
    keyless: Path  # initialised, no keys
    empty: Path  # nothing at all
    sshd_port: int
    sshd_fingerprint: str
    closed_port: int


def fleet(home: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(app, ["--home", str(home), *args],
                              env={"NO_COLOR": "1", "COLUMNS": "200",
                                   "FLEET_HOME": str(home), **(env or {})})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(200):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert proc.poll() is None, "sshd exited"
        time.sleep(0.05)
    raise AssertionError(f"sshd does not listen on {port}")


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str]]:
    """A real OpenSSH sshd on 127.0.0.1 whose authorized_keys holds no fleet key."""
    d = tmp_path_factory.mktemp("sshd")
    key = d / "host_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                   check=True)
    (d / "authorized_keys").write_text("")
    port = _free_port()
    (d / "sshd_config").write_text("\n".join([
        f"ListenAddress 127.0.0.1:{port}", f"HostKey {key}", f"PidFile {d / 'sshd.pid'}",
        f"AuthorizedKeysFile {d / 'authorized_keys'}", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no", ""]))
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # OpenSSH's privilege separation dir
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")],
                            stderr=subprocess.DEVNULL)
    try:
        _wait_listening(port, proc)
        out = subprocess.run(["ssh-keygen", "-l", "-f", f"{key}.pub"], check=True,
                             capture_output=True, text=True).stdout
        yield port, out.split()[1]
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, sshd: tuple[int, str]) -> Lab:
    root = tmp_path_factory.mktemp("json-errors")
    main, keyless, empty = root / "main", root / "keyless", root / "empty"
    for home in (main, keyless):
        assert fleet(home, "init").exit_code == 0
    init_signing_key(FleetHome(main))
    assert fleet(main, "group", "create", "g").exit_code == 0
    r = fleet(main, "device", "add", f"local://a?root={root / 'dev' / 'a'}", "--name", "a",
              "-g", "g")
    assert r.exit_code == 0, r.output
    return Lab(root, main, keyless, empty, sshd[0], sshd[1], _free_port())


def _set_schema(home: Path, revision: str) -> None:
    con = sqlite3.connect(home / "registry.db")
    con.execute("UPDATE alembic_version SET version_num=?", (revision,))
    con.commit()
    con.close()


def _weird_agent(lab: Lab) -> list[str]:
    script = lab.root / "weird-agent"
    script.write_text("#!/bin/sh\ncat >/dev/null\necho '{\"schema\": \"fleet.agent/1\", "
                      "\"ok\": false, \"error\": {\"code\": \"flux_capacitor\", "
                      "\"message\": \"this agent speaks a newer dialect\"}}'\n")
    script.chmod(0o755)
    return ["device", "add", f"local://w?root={lab.root / 'dev' / 'w'}", "--name", "w",
            "--agent-cmd", str(script)]


def _audit_one_dead(lab: Lab) -> list[str]:
    r = fleet(lab.main, "device", "add", f"local://dead?root={lab.root / 'dev' / 'dead'}",
              "--name", "dead", "--agent-cmd", "/nonexistent/fleet-agent", "--no-enroll")
    assert r.exit_code == 0, r.output
    return ["audit", "-d", "a", "-d", "dead"]


def _newer_on_device(lab: Lab) -> list[str]:
    """a runs tiny@2; deploying a build of tiny@1 is refused by the plan (17)."""
    r = fleet(lab.main, "deploy", str(OTHER), "--name", "tiny", "--version", "2", "-d", "a",
              "--iterations", "2", "--warmup", "1", "--json")
    assert r.exit_code == 0, r.output
    return ["deploy", str(TINY), "--name", "tiny", "--version", "1", "-d", "a"]


def _broken_model(lab: Lab) -> list[str]:
    bad = lab.root / "broken.mnn"
    bad.write_bytes(TINY.read_bytes()[:5000])
    return ["deploy", str(bad), "-d", "a"]


def _random_file(lab: Lab, name: str) -> Path:
    path = lab.root / name
    path.write_bytes(os.urandom(3000))
    return path


def _garbled_lab_state(lab: Lab) -> list[str]:
    (lab.main / "lab").mkdir(exist_ok=True)
    (lab.main / "lab" / "iot.json").write_text("{not json")
    return ["lab", "status"]


@dataclass
class Case:
    code: int
    label: str
    run: Callable[[Lab, pytest.MonkeyPatch], Any]


def _cli(args: Callable[[Lab], list[str]], home: str = "main",
         env: dict[str, str] | None = None) -> Callable[[Lab, pytest.MonkeyPatch], Any]:
    def run(lab: Lab, _mp: pytest.MonkeyPatch) -> Any:
        return fleet(getattr(lab, home), *args(lab), "--json", env=env)
    return run


def _direct(exc: errors.FleetError) -> Callable[[Lab, pytest.MonkeyPatch], Any]:
    """The error raised where every command opens the registry (see the docstring)."""
    def run(lab: Lab, mp: pytest.MonkeyPatch) -> Any:
        def refuse(cls: type, *a: Any, **k: Any) -> Registry:
            raise exc
        mp.setattr(Registry, "open", classmethod(refuse))
        try:
            return fleet(lab.main, "device", "list", "--json")
        finally:
            mp.undo()
    return run


def _busy(lab: Lab, _mp: pytest.MonkeyPatch) -> Any:
    """Another connection holds the registry's write lock past the wait (real)."""
    con = sqlite3.connect(lab.main / "registry.db", isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")
    try:
        return fleet(lab.main, "group", "create", "busy", "--json",
                     env={"FLEET_DB_BUSY_TIMEOUT": "0.2"})
    finally:
        con.execute("ROLLBACK")
        con.close()


# The order matters only where a case builds on the registry state of an earlier one.
CASES = [
    Case(2, "click: unknown option", lambda lab, mp: fleet(lab.main, "device", "list",
                                                           "--json", "--bogus")),
    Case(2, "click: missing argument", lambda lab, mp: fleet(lab.main, "device", "show",
                                                             "-o", "json")),
    Case(2, "usage", _cli(lambda lab: ["lab", "up"])),
    Case(1, "lab state unreadable (LabError)", _cli(_garbled_lab_state)),
    Case(3, "malformed URI", _cli(lambda lab: ["device", "add", "local:/nowhere", "--name",
                                               "y"])),
    Case(4, "unknown scheme", _cli(lambda lab: ["device", "add", "ftp://host", "--name", "z"])),
    Case(5, "not found", _cli(lambda lab: ["device", "show", "nope"])),
    Case(6, "duplicate", _cli(lambda lab: ["group", "create", "g"])),
    Case(8, "not initialised", _cli(lambda lab: ["device", "list"], home="empty")),
    Case(9, "invalid model", _cli(_broken_model)),
    Case(10, "conversion failed", _cli(lambda lab: ["deploy",
                                                    str(_random_file(lab, "bad.onnx")),
                                                    "-d", "a"])),
    Case(11, "no signing key", _cli(lambda lab: ["keys", "show"], home="keyless")),
    Case(12, "closed port", _cli(lambda lab: ["device", "add",
                                              f"ssh://root@127.0.0.1:{lab.closed_port}",
                                              "--name", "closed"])),
    Case(13, "unknown host key", _cli(lambda lab: ["device", "add",
                                                   f"ssh://root@127.0.0.1:{lab.sshd_port}",
                                                   "--name", "hk"])),
    Case(14, "key refused", _cli(lambda lab: ["device", "add",
                                              f"ssh://root@127.0.0.1:{lab.sshd_port}",
                                              "--name", "auth", "--accept-host-key",
                                              lab.sshd_fingerprint])),
    Case(15, "not a package", _cli(lambda lab: ["deploy", str(_random_file(lab, "x.fpkg")),
                                                "-d", "a"])),
    Case(16, "nothing to roll back to", _cli(lambda lab: ["rollback", "tiny", "-d", "a"])),
    Case(17, "device runs a newer version", _cli(_newer_on_device)),
    Case(18, "unknown agent error code", _cli(_weird_agent)),
    Case(19, "mailbox pending (direct)", _direct(errors.MailboxPendingError(
        "pixel: no answer in the mailbox within 30 s"))),
    Case(20, "one of two devices fails", _cli(_audit_one_dead)),
    Case(22, "registry read-only (direct)", _direct(errors.RegistryReadOnlyError(
        "the registry is on a read-only filesystem"))),
    Case(23, "registry full (direct)", _direct(errors.RegistryFullError("no space left"))),
    Case(24, "registry busy", _busy),
    Case(25, "registry I/O (direct)", _direct(errors.RegistryIOError("disk I/O error"))),
    Case(26, "selector matches nothing", _cli(lambda lab: ["deploy", str(TINY), "-l",
                                                           "site=nowhere"])),
    Case(21, "schema older than the code", lambda lab, mp: (
        _set_schema(lab.keyless, "e5a7d3c91b24"), fleet(lab.keyless, "status", "--json"))[1]),
    Case(7, "schema newer than the code", lambda lab, mp: (
        _set_schema(lab.keyless, "deadbeef0000"), fleet(lab.keyless, "status", "--json"))[1]),
]


def test_the_cases_cover_every_exit_code() -> None:
    assert set(EXIT_CODES.values()) <= {c.code for c in CASES}, \
        "a new exit code needs a case here"


def test_every_error_under_json_is_a_json_document(lab: Lab,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    assert shutil.which("ssh-keygen") and Path(SSHD).exists(), "make test installs openssh"
    failures = []
    for case in CASES:
        r = case.run(lab, monkeypatch)
        try:
            doc = json.loads(r.stdout)
        except ValueError:
            failures.append(f"{case.label}: stdout is not JSON: {r.stdout[:300]!r} "
                            f"(stderr {r.stderr[-300:]!r})")
            continue
        if isinstance(doc, list):  # a command's rows, printed before it failed: kept as
            # they are (each row has its device's error); the status and stderr say it
            if r.exit_code != case.code or "error:" not in r.stderr:
                failures.append(f"{case.label}: exit {r.exit_code}, want {case.code}")
            continue
        err = doc.get("error")
        if r.exit_code != case.code or not isinstance(err, dict) \
                or err.get("exit") != case.code or not err.get("code") \
                or not err.get("message"):
            failures.append(f"{case.label}: exit {r.exit_code}, want {case.code}; "
                            f"stdout {json.dumps(doc)[:300]}; stderr {r.stderr[-300:]!r}")
            continue
        if "Traceback" in r.stderr:
            failures.append(f"{case.label}: traceback on stderr")
    assert not failures, "\n".join(failures)


def test_an_error_after_data_joins_the_data_document(lab: Lab) -> None:
    """A fan-out that printed its rows then failed: one document with both (20 above made
    `dead`); -o yaml gives the same shape in YAML."""
    import yaml

    r = fleet(lab.main, "audit", "-d", "a", "-d", "dead", "--json")
    doc = json.loads(r.stdout)
    assert r.exit_code == 20 and doc["error"]["code"] == "partial_failure"
    assert "dead" in json.dumps(doc) and set(doc) - {"error"}  # the audit's own fields
    y = yaml.safe_load(fleet(lab.main, "device", "show", "nope", "-o", "yaml").stdout)
    assert y == {"error": {"code": "not_found", "exit": 5, "message": y["error"]["message"]}}
