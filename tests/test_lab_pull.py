"""Pull mode on the real lab: a real ``fleet server`` (uvicorn, TLS, the fleet CA pinned)
on the lab's root-namespace address, and lab boards' agents (``fleet-agent pull --once``)
running inside the boards' network namespaces, so every byte crosses the boards' veth
links (:mod:`fleet.lab.pull`).

Covered here: enrollment from the boards, two waves with a gate, a late joiner, the server
restarted mid-download with the board's link at 2 Mbit/s (the download resumes by HTTP
Range: the bytes fetched after the restart are fewer than the package), a board with
30 % loss and 2 Mbit/s that still ends active, a revoked board refused. Expired desired
state, tampered package and forged report are refused in tests/test_server_pull.py with
the same real server and agent (on the host: the refusals do not depend on the link).
One server for the module, on the session's lab boards (tests/lab_fixtures.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from fleet.lab import faults
from fleet.lab import pull as labpull

pytest_plugins = ("tests.lab_fixtures",)

if TYPE_CHECKING:
    from tests.lab_fixtures import IotLab

pytestmark = [pytest.mark.lab, pytest.mark.slow]

BIN = Path(sys.executable).parent
TINY = Path(__file__).resolve().parents[1] / "models" / "tiny" / "tiny.mnn"
BOARDS = ("iot0", "iot1", "iot2")


@dataclass
class PullLab:
    lab: IotLab
    addr: str
    port: int
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    enrolled: set[str] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"https://{self.addr}:{self.port}"

    @property
    def ca(self) -> Path:
        return self.lab.home.path / "tls" / "ca.pem"

    def fleet(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([str(BIN / "fleet"), *args], env=self.env, text=True,
                             capture_output=True, timeout=300, check=False)
        if check and res.returncode != 0:
            raise AssertionError(f"fleet {' '.join(args)}: {res.returncode}\n{res.stderr}")
        return res

    def fleet_json(self, *args: str) -> Any:
        return json.loads(self.fleet(*args, "--json").stdout)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [str(BIN / "fleet"), "server", "--listen", f"{self.addr}:{self.port}"],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        labpull.wait_ready(self.url, self.ca, proc=self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # no goodbye: a crash or power cut
            self.proc.wait(30)

    def agent(self, board: str, *extra: str) -> tuple[int, dict[str, Any]]:
        return labpull.run_agent(self.lab.home, board, self.url, self.ca, "--once", *extra)

    def enroll(self, board: str, group: str) -> None:
        token = self.fleet_json("device", "add", f"pull://field-{board}", "-g", group)["token"]
        rc, doc = self.agent(board, "--token", token)
        assert rc == 0 and doc["enrolled"]["device"] == f"field-{board}", doc
        self.enrolled.add(board)

    def steps(self, dep: str) -> dict[str, str]:
        return {s["device"]: s["state"]
                for s in self.fleet_json("deployment", "show", dep)["steps"]}

    def slot(self, board: str, name: str) -> Any:
        st = json.loads((labpull.pull_root(self.lab.home, board) / "state.json").read_text())
        return st["slots"].get(name, {}).get("current")


@pytest.fixture(scope="module")
def pl(iot_lab: IotLab) -> Iterator[PullLab]:
    iot_lab.boards(len(BOARDS))
    home = iot_lab.home
    addr = labpull.server_address(home, BOARDS[0])
    env = {**os.environ, "FLEET_HOME": str(home.path), "NO_COLOR": "1",
           "FLEET_SERVER_POLL_S": "5", "FLEET_SERVER_RATE_PER_MIN": "100000",
           "FLEET_SERVER_RATE_BURST": "100000"}
    p = PullLab(iot_lab, addr, labpull.free_port(addr), env)
    p.fleet("keys", "init", check=False)  # the session's home may have its key already
    p.fleet("server", "init-tls", "--san", addr)
    for b in BOARDS:
        labpull.forget(home, b)
        labpull.reach(home, b, addr)
    p.start()
    try:
        yield p
    finally:
        p.stop()
        for b in BOARDS:
            labpull.unreach(home, b, addr)
            labpull.forget(home, b)


def test_boards_enroll_then_two_waves_open_after_the_gate_and_a_late_joiner_joins(
        pl: PullLab) -> None:
    pl.fleet("group", "create", "lab-pull")
    pl.enroll("iot0", "lab-pull")
    pl.enroll("iot1", "lab-pull")
    doc = pl.fleet_json("deploy", str(TINY), "-g", "lab-pull", "--waves", "1,100%",
                        "--name", "pullwave")
    dep = str(doc["deployment"])
    rc, second = pl.agent("iot1")  # wave 2 is closed until wave 1 has reported
    assert rc == 0 and second["models"] == [], second
    rc, first = pl.agent("iot0")
    assert rc == 0 and first["models"] == ["pullwave"], first
    assert pl.steps(dep) == {"field-iot0": "ok", "field-iot1": "pending"}
    rc, second = pl.agent("iot1")  # the gate passed: wave 2's desired state is there
    assert rc == 0 and second["models"] == ["pullwave"], second
    assert pl.steps(dep) == {"field-iot0": "ok", "field-iot1": "ok"}
    pl.enroll("iot2", "lab-pull")  # joins the group after the rollout finished
    rc, late = pl.agent("iot2")
    assert rc == 0 and late["models"] == ["pullwave"], late
    assert pl.steps(dep)["field-iot2"] == "ok"
    assert pl.fleet_json("deployment", "show", dep)["deployment"]["status"] == "completed"
    assert [pl.slot(b, "pullwave") for b in BOARDS] == [1, 1, 1]


def test_server_restarted_mid_download_resumes_by_range_over_a_2mbit_link(
        pl: PullLab) -> None:
    if "iot0" not in pl.enrolled:
        pl.fleet("group", "create", "lab-pull-0")
        pl.enroll("iot0", "lab-pull-0")
    folder = pl.lab.home.path.parent / "pullbig"
    folder.mkdir(exist_ok=True)
    (folder / "tiny.mnn").write_bytes(TINY.read_bytes())
    (folder / "blob.bin").write_bytes(os.urandom(1 << 20))  # ~4 s at 2 Mbit/s
    pl.fleet("group", "create", "lab-pull-slow")
    pl.fleet("group", "add", "lab-pull-slow", "field-iot0")
    pl.fleet_json("deploy", str(folder), "--entry", "tiny.mnn", "--golden",
                  str(TINY.with_suffix(".golden.npz")), "-g", "lab-pull-slow",
                  "--name", "pullbig")
    size = next((pl.lab.home.path / "artifacts").glob("pullbig-1-*.fpkg")).stat().st_size
    incoming = labpull.pull_root(pl.lab.home, "iot0") / "incoming"
    try:
        faults.apply_fault(pl.lab.home, "iot0", bandwidth="2mbit")
        proc = subprocess.Popen(labpull.agent_argv(pl.lab.home, "iot0", pl.url, pl.ca,
                                                   "--once"), stdout=subprocess.PIPE,
                                text=True)
        part: Path | None = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and part is None and proc.poll() is None:
            for p in incoming.glob("*.part"):
                if p.stat().st_size >= size // 4:
                    part = p
            time.sleep(0.05)
        assert part is not None, "the download never got a quarter in"
        pl.stop()  # the server goes away mid-download
        out, _ = proc.communicate(timeout=120)
        cut = json.loads(out.strip().splitlines()[-1])
        assert not cut["ok"] and cut["error"]["code"] == "connection_lost", cut
        kept = part.stat().st_size
        assert 0 < kept < size
        pl.start()
        rc, doc = pl.agent("iot0")
    finally:
        pl.lab.heal("iot0")
    assert rc == 0, doc
    got = next(s for s in doc["steps"] if "downloaded" in s)
    assert got["resumed_from"] == kept and got["received"] == size - kept < size
    assert pl.slot("iot0", "pullbig") == 1


def test_board_with_30_percent_loss_and_2mbit_still_ends_active(pl: PullLab) -> None:
    if "iot1" not in pl.enrolled:
        pl.fleet("group", "create", "lab-pull-1")
        pl.enroll("iot1", "lab-pull-1")
    pl.fleet("group", "create", "lab-pull-lossy")
    pl.fleet("group", "add", "lab-pull-lossy", "field-iot1")
    dep = str(pl.fleet_json("deploy", str(TINY), "-g", "lab-pull-lossy",
                            "--name", "pulllossy")["deployment"])
    cycles: list[dict[str, Any]] = []
    retrans = labpull.tcp_retransmits(pl.lab.home, "iot1")
    try:
        assert faults.apply_fault(pl.lab.home, "iot1", bandwidth="2mbit", loss=30)[
            "faults"] == {"bandwidth": "2mbit", "loss": 30}
        # each run is one device cycle; a cycle cut by the link is what the agent's loop
        # retries (with backoff) and a partial download resumes
        while len(cycles) < 10 and pl.steps(dep).get("field-iot1") != "ok":
            rc, doc = pl.agent("iot1")
            cycles.append({"rc": rc, "error": (doc.get("error") or {}).get("code")})
        retrans = labpull.tcp_retransmits(pl.lab.home, "iot1") - retrans
    finally:
        pl.lab.heal("iot1")
    assert retrans > 0  # the link really lost packets on the way
    assert pl.steps(dep) == {"field-iot1": "ok"}, cycles
    assert pl.slot("iot1", "pulllossy") == 1
    print(f"lossy board: {len(cycles)} cycle(s), {retrans} TCP retransmits: {cycles}")


def test_revoked_board_is_refused(pl: PullLab) -> None:
    if "iot2" not in pl.enrolled:
        pl.fleet("group", "create", "lab-pull-2")
        pl.enroll("iot2", "lab-pull-2")
    pl.fleet("device", "revoke", "field-iot2", "--yes")
    rc, doc = pl.agent("iot2")
    assert rc == 1 and doc["error"]["code"] == "revoked", doc
