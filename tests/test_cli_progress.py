"""Fan-out progress (issue 15): the rendering on fakes and a fake clock, the plain lines a
deploy prints when stderr is not a terminal (the fake fleet, then real local devices),
and full-width result tables when stdout is not a terminal."""

from __future__ import annotations

import re
from pathlib import Path

from rich.console import Console
from typer.testing import CliRunner

from fleet.artifacts import init_signing_key
from fleet.cli._progress import (
    FanOutModel,
    FanOutProgress,
    device_text,
    render,
    summary_text,
)
from fleet.core import errors
from fleet.home import FleetHome
from fleet.registry import Registry
from fleet.rollout.deploy import DeployJob, run_deployment
from tests.conftest import REPO, local_uri
from tests.fakes import FakeClock, FakeFleet, fake_package

TINY = REPO / "models" / "tiny" / "tiny.mnn"


def test_nothing_unknown_is_drawn_as_a_question_mark() -> None:
    clock = FakeClock()
    m = FanOutModel(3, clock)
    assert summary_text(m.summary()) == "0/3 devices · ETA -"
    m.state("pixel1", "queued")
    m.state("pixel1", "connecting")
    clock.advance(2)
    assert device_text(m.in_flight()[0], clock()) == "connecting 2s"
    m.state("pixel1", "pushing")  # the fan-out's word for sending
    m.bytes("pixel1", 0, 1 << 20)
    assert device_text(m.in_flight()[0], clock()) == "sending 0 B of 1.0 MiB"
    clock.advance(1)
    m.bytes("pixel1", 512 << 10, 1 << 20)
    clock.advance(1)
    s = m.summary()
    assert (s.sent, s.to_send, s.done, s.total) == (512 << 10, 1 << 20, 0, 3)
    text = summary_text(s)
    assert text.startswith("0/3 devices · 512.0 KiB of 1.0 MiB · 512.0 KiB/s · ETA 0:01")
    assert device_text(m.in_flight()[0], clock()) == "sending 512.0 KiB of 1.0 MiB"
    m.state("pixel1", "activating")
    clock.advance(12)
    assert device_text(m.in_flight()[0], clock()) == "activating 12s"
    m.state("pixel2", "retry in 1.5s (connect)")
    assert device_text(m.in_flight()[1], clock()) == "retrying in 1.5s (connect)"
    assert m.finish("pixel1", "ok") == ("activating", "done")
    assert m.finish("pixel2", "unreachable", "connect") == ("retrying", "unreachable (connect)")
    s = m.summary()
    assert (s.done, s.failed, s.sent) == (2, 1, 1 << 20)
    assert summary_text(s).startswith("2/3 devices · 1 failed · 1.0 MiB of 1.0 MiB")
    c = Console(record=True, width=100, color_system=None)
    m.state("board3", "staging")
    c.print(render(m))
    drawn = c.export_text()
    assert "2/3 devices" in drawn and "board3" in drawn and "staging" in drawn
    assert "?" not in drawn and "pixel1" not in drawn  # finished: counted, not listed
    assert " kB" not in drawn and "MB/s" not in drawn


def test_a_fake_fleet_deploy_is_one_line_per_phase_change(registry: Registry,
                                                          home: FleetHome,
                                                          tmp_path: Path) -> None:
    names = ["a", "b", "c", "d"]
    devs = [registry.add_device(n, f"local://{n}?root=/x") for n in names]
    fleet = FakeFleet(names)
    fleet["b"].install("m", 1)  # runs it already: skipped
    fleet["c"].refuse("stage", errors.DiskFullError("c: no space left on the device"))
    fleet["d"].fail("status", 1, errors.ConnectError("d: connection refused"))
    path, sha = fake_package(tmp_path, "m", 1)
    job = DeployJob(name="m", version=1, kind="model", package=path, package_sha256=sha,
                    digest="digest-m-1", size=path.stat().st_size, bench={})
    lines: list[str] = []
    prog = FanOutProgress(FanOutModel(len(devs)), live=False, write=lines.append)
    _, res = run_deployment(home, registry, job, devs, target="t", opener=fleet.opener,
                            workers=1, retries=1, on_bytes=prog.on_bytes,
                            on_state=prog.on_state, on_done=prog.on_done)
    by = {n: [ln.split(": ", 1)[1] for ln in lines if ln.startswith(f"{n}: ")] for n in names}
    arrow = prog.arrow
    chain = [f"queued {arrow} connecting", f"connecting {arrow} sending",
             f"sending {arrow} staging", f"staging {arrow} activating",
             f"activating {arrow} done"]
    assert by["a"] == chain
    assert by["b"] == [f"queued {arrow} connecting", f"connecting {arrow} skipped"]
    assert by["c"] == [*chain[:3], f"staging {arrow} failed (disk_full)"]
    assert by["d"][0] == f"queued {arrow} connecting"
    assert re.fullmatch(rf"connecting {arrow} retrying in [0-9.]+s \(connect\)", by["d"][1])
    assert by["d"][-1] == f"activating {arrow} done"
    assert not any("?" in ln for ln in lines)
    s = prog.model.summary()
    assert (s.done, s.total, s.failed) == (4, 4, 1)
    assert s.sent == 3 * job.size and res["a"].ok


def test_deploy_to_local_devices_prints_state_lines_and_whole_cells(
        home: FleetHome, tmp_path: Path) -> None:
    """CliRunner's stderr is not a terminal: plain lines, nothing drawn; its stdout is not
    one either: the table keeps every cell whole although COLUMNS says 40."""
    from fleet.cli.app import app

    runner = CliRunner()

    def fleet(*args: str):  # type: ignore[no-untyped-def]
        return runner.invoke(app, ["--home", str(home.path), *args],
                             env={"NO_COLOR": "1", "COLUMNS": "40",
                                  "FLEET_HOME": str(home.path)})

    assert fleet("init").exit_code == 0
    init_signing_key(home)
    for n in ("d1", "d2"):
        assert fleet("device", "add", local_uri(tmp_path, n), "--name", n).exit_code == 0
    r = fleet("deploy", str(TINY), "-d", "d1", "-d", "d2", "--iterations", "2",
              "--warmup", "1")
    assert r.exit_code == 0, r.output
    for n in ("d1", "d2"):
        assert re.search(rf"^{n}: staging (→|->) activating$", r.stderr, re.M), r.stderr
        assert re.search(rf"^{n}: activating (→|->) done$", r.stderr, re.M), r.stderr
    assert "?" not in r.stderr and " kB" not in r.stderr
    assert "cpu/p-normal/m-normal/t1" in r.stdout  # the backend column is not cut to …
    assert "…" not in r.stdout and "KiB" in r.stdout
