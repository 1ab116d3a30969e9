"""Quiet by default (issue 15): an unreachable board is one line on stderr, no traceback;
``-v`` shows what paramiko and MNN said. The boards are real sockets on 127.0.0.1: a
closed port, and a listener that accepts and hangs up (not an SSH server), which is what
makes paramiko log its two tracebacks."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fleet.core.mnn.fdcapture import capture_fds
from fleet.home import FleetHome


@pytest.fixture
def hangs_up() -> Iterator[int]:
    """A TCP port that accepts and closes at once (a board whose sshd is not SSH)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        t.join(2)
        srv.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def test_an_unreachable_board_is_one_line_and_v_shows_the_detail(
        run_fleet, home: FleetHome, hangs_up: int) -> None:  # type: ignore[no-untyped-def]
    assert run_fleet("init").exit_code == 0
    # a closed port, with the board's host key already in the fleet's known_hosts
    port = _closed_port()
    key = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    home.known_hosts.write_text(f"[127.0.0.1]:{port} {key}\n")
    r = run_fleet("device", "add", f"ssh://root@127.0.0.1:{port}", "--name", "b1")
    assert r.exit_code == 12, r.output
    lines = _lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    # a board that hangs up mid-handshake: paramiko logs two tracebacks; we show none
    r = run_fleet("device", "add", f"ssh://root@127.0.0.1:{hangs_up}", "--name", "b2")
    assert r.exit_code == 12, r.output
    lines = _lines(r.stderr)
    assert len(lines) == 1 and "Error reading SSH protocol banner" in lines[0], r.stderr
    assert "Traceback" not in r.stderr and "paramiko" not in r.stderr
    # -v: paramiko's own account, with its traceback
    r = run_fleet("-v", "device", "add", f"ssh://root@127.0.0.1:{hangs_up}", "--name", "b2")
    assert r.exit_code == 12
    assert "paramiko.transport" in r.stderr and "Traceback" in r.stderr, r.stderr
    assert _lines(r.stderr)[-1].startswith("error: ")


def test_a_fanout_retry_is_logged_only_with_v(run_fleet, home: FleetHome,  # type: ignore[no-untyped-def]
                                              tmp_path: Path) -> None:
    assert run_fleet("init").exit_code == 0
    port = _closed_port()
    assert run_fleet("device", "add", f"ssh://root@127.0.0.1:{port}", "--name", "b",
                     "--no-enroll").exit_code == 0
    quiet = run_fleet("audit", "-d", "b")
    assert quiet.exit_code == 12 and "attempt" not in quiet.stderr
    assert "Traceback" not in quiet.stderr
    assert len([ln for ln in _lines(quiet.stderr) if ln.startswith("error: ")]) == 1
    loud = run_fleet("-v", "audit", "-d", "b")
    assert "INFO fleet.fanout: b: attempt 1 failed (connect" in loud.stderr, loud.stderr


def test_what_mnn_prints_goes_to_the_fleet_mnn_log(caplog: pytest.LogCaptureFixture) -> None:
    """Native writes to fd 1 and 2 (MNN's banner and fallback lines) are logged at INFO,
    once, after the outermost capture; nested captures do not log them twice."""
    with caplog.at_level(logging.INFO, logger="fleet.mnn"):
        with capture_fds() as outer:
            with capture_fds():
                os.write(1, b"The device supports: i8sdot:0, fp16:0\n")
            os.write(2, b"Can't Find type=3 backend, use 0 instead\n")
        assert outer.lines() == ["Can't Find type=3 backend, use 0 instead"]
    mnn = [r.getMessage() for r in caplog.records if r.name == "fleet.mnn"]
    assert mnn == ["The device supports: i8sdot:0, fp16:0",
                   "Can't Find type=3 backend, use 0 instead"]
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "fleet.mnn")
