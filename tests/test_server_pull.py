"""Pull mode end to end: a real ``fleet server`` (uvicorn, TLS with the CA ``fleet server
init-tls`` made, a private port) and real agents running ``fleet-agent pull --once`` as
local processes, each with its own device root. One server for the module; the
restart test stops and starts it on the same port.

Covered: enrollment (one-time token, only its hash stored), two waves with a gate that
opens the second wave when the first has reported, a late joiner, a server restarted
mid-download (the agent resumes with HTTP Range), a tampered package refused (and the
wave gate halting the rollout), a revoked device refused, a forged report refused, an
expired desired state refused (a second server whose clock is three days behind, through
the ``FLEET_TEST_SERVER_CLOCK_SKEW_S`` hook: a real signed, expired state).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleet.core.pull import API_PREFIX, AUTH_TAG, sign_device, sign_report

BIN = Path(sys.executable).parent
TINY = Path(__file__).resolve().parents[1] / "models" / "tiny" / "tiny.mnn"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Lab:
    """A controller home, its server process and helpers to run ``fleet`` and agents."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "home"
        self.env = {**os.environ, "FLEET_HOME": str(self.home), "NO_COLOR": "1",
                    "FLEET_SERVER_POLL_S": "5", "FLEET_SERVER_RATE_PER_MIN": "100000",
                    "FLEET_SERVER_RATE_BURST": "100000"}
        self.env.pop("FLEET_DB", None)
        self.port = _free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def ca(self) -> Path:
        return self.home / "tls" / "ca.pem"

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def fleet(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([str(BIN / "fleet"), *args], env=self.env, text=True,
                             capture_output=True, timeout=300, check=False)
        if check and res.returncode != 0:
            raise AssertionError(f"fleet {' '.join(args)}: {res.returncode}\n{res.stderr}")
        return res

    def fleet_json(self, *args: str) -> Any:
        return json.loads(self.fleet(*args, "--json").stdout)

    def start(self, port: int | None = None, **env: str) -> subprocess.Popen[bytes]:
        port = port or self.port
        proc = subprocess.Popen([str(BIN / "fleet"), "server", "--listen",
                                 f"127.0.0.1:{port}"], env={**self.env, **env},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, "fleet server exited"
            try:
                if httpx.get(f"https://127.0.0.1:{port}/healthz", verify=self.tls(),
                             timeout=2).status_code == 200:
                    return proc
            except httpx.HTTPError:
                time.sleep(0.3)
        raise AssertionError("fleet server did not come up")

    def stop(self, proc: subprocess.Popen[bytes] | None = None) -> None:
        proc = proc or self.proc
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)

    def agent(self, name: str, *extra: str, server: str | None = None,
              env: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        res = subprocess.run([str(BIN / "fleet-agent"), "--root", str(self.root / name),
                              "pull", "--server", server or self.url, "--ca", str(self.ca),
                              "--once", *extra], env={**self.env, **(env or {})}, text=True,
                             capture_output=True, timeout=300, check=False)
        return res.returncode, json.loads(res.stdout.strip().splitlines()[-1])

    def add(self, name: str, group: str) -> str:
        doc = self.fleet_json("device", "add", f"pull://{name}", "-g", group)
        return str(doc["token"])

    def enrolled(self, name: str, group: str) -> None:
        rc, doc = self.agent(name, "--token", self.add(name, group))
        assert rc == 0 and doc["enrolled"]["device"] == name, doc

    def steps(self, dep: str) -> dict[str, str]:
        doc = self.fleet_json("deployment", "show", dep)
        return {s["device"]: s["state"] for s in doc["steps"]}

    def status(self, dep: str) -> str:
        return str(self.fleet_json("deployment", "show", dep)["deployment"]["status"])

    def device_key(self, name: str) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key(
            (self.root / name / "identity" / "device_key.pem").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key

    def bearer(self, key: ec.EllipticCurvePrivateKey) -> str:
        from fleet.core.package.keyid import fingerprint_public_key

        c = httpx.Client(base_url=self.url, verify=self.tls())
        ch = c.post(f"{API_PREFIX}/auth/challenge",
                    json={"fingerprint": fingerprint_public_key(key.public_key())}).json()
        tok = c.post(f"{API_PREFIX}/auth/token", json={
            "challenge": ch["challenge"],
            "signature": sign_device(key, AUTH_TAG, ch["challenge"].encode())})
        assert tok.status_code == 200, tok.text
        return str(tok.json()["token"])


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = Lab(tmp_path_factory.mktemp("pull"))
    lab.fleet("init")
    lab.fleet("keys", "init")
    lab.fleet("server", "init-tls")
    lab.proc = lab.start()
    yield lab
    lab.stop()


def test_enrollment_token_is_one_time_and_only_its_hash_is_stored(lab: Lab) -> None:
    lab.fleet("group", "create", "enroll")
    token = lab.add("e1", "enroll")
    rc, doc = lab.agent("e1", "--token", token)
    assert rc == 0, doc
    assert doc["enrolled"]["root_version"] == 1
    dev = lab.fleet_json("device", "show", "e1")
    assert dev["fingerprint"] == doc["enrolled"]["fingerprint"]
    rc, again = lab.agent("e1-copy", "--token", token)  # another device, the same token
    assert rc == 1 and again["error"]["code"] == "enroll_token"
    raw = (lab.home / "registry.db").read_bytes()
    for extra in ("registry.db-wal",):
        p = lab.home / extra
        raw += p.read_bytes() if p.exists() else b""
    assert token.encode() not in raw


def test_two_waves_open_after_reports_and_a_late_joiner_gets_the_model(lab: Lab) -> None:
    lab.fleet("group", "create", "field")
    lab.enrolled("w1", "field")
    lab.enrolled("w2", "field")
    doc = lab.fleet_json("deploy", str(TINY), "-g", "field", "--waves", "1,100%",
                         "--name", "wavy")
    dep = str(doc["deployment"])
    assert {r["device"]: r["status"] for r in doc["results"]} == {
        "w1": "waiting for check-in", "w2": "waiting for check-in"}
    rc, d2 = lab.agent("w2")  # wave 2 is not open yet: nothing to do
    assert rc == 0 and d2["models"] == []
    rc, d1 = lab.agent("w1")
    assert rc == 0 and d1["models"] == ["wavy"], d1
    assert lab.steps(dep) == {"w1": "ok", "w2": "pending"}
    rc, d2 = lab.agent("w2")  # the gate passed: wave 2's desired state is written
    assert rc == 0 and d2["models"] == ["wavy"], d2
    assert lab.steps(dep) == {"w1": "ok", "w2": "ok"}
    assert lab.status(dep) == "completed"
    lab.enrolled("w3", "field")  # joins the group after the rollout
    rc, d3 = lab.agent("w3")
    assert rc == 0 and d3["models"] == ["wavy"], d3
    assert lab.steps(dep)["w3"] == "ok"
    assert lab.status(dep) == "completed"
    st = json.loads((lab.root / "w3" / "state.json").read_text())
    assert st["slots"]["wavy"]["current"] == 1


def test_tampered_package_is_refused_and_the_gate_halts(lab: Lab) -> None:
    lab.fleet("group", "create", "gate")
    lab.enrolled("g1", "gate")
    lab.enrolled("g2", "gate")
    doc = lab.fleet_json("deploy", str(TINY), "-g", "gate", "--waves", "1,100%",
                         "--name", "tampered")
    dep = str(doc["deployment"])
    art = next((lab.home / "artifacts").glob("tampered-1-*.fpkg"))
    data = bytearray(art.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit in a middle chunk
    art.write_bytes(bytes(data))
    rc, d1 = lab.agent("g1")
    assert rc == 0, d1
    failed = [s for s in d1["steps"] if s.get("state") == "failed"]
    assert failed and failed[0]["error_code"] in ("chunk_auth", "digest_mismatch"), d1
    assert not list((lab.root / "g1" / "incoming").glob("*.part"))  # nothing kept
    assert not (lab.root / "g1" / "slots" / "tampered").exists()
    assert lab.steps(dep) == {"g1": "failed", "g2": "not_started"}
    assert lab.status(dep) == "halted"
    rc, d2 = lab.agent("g2")
    assert rc == 0 and d2["models"] == []


def _slot(lab: Lab, device: str, name: str) -> Any:
    st = json.loads((lab.root / device / "state.json").read_text())
    return (st.get("slots", {}).get(name) or {}).get("current")


def test_cancel_keeps_devices_not_yet_updated_and_rollback_takes_one_back(lab: Lab) -> None:
    lab.fleet("group", "create", "cancel")
    lab.enrolled("c1", "cancel")
    lab.enrolled("c2", "cancel")
    lab.fleet_json("deploy", str(TINY), "-g", "cancel", "--name", "cx")
    for dev in ("c1", "c2"):
        assert lab.agent(dev)[0] == 0
        assert _slot(lab, dev, "cx") == 1
    folder = lab.root / "cx2"  # version 2: another payload
    folder.mkdir()
    (folder / "tiny.mnn").write_bytes(TINY.read_bytes())
    (folder / "extra.bin").write_bytes(os.urandom(4096))
    doc = lab.fleet_json("deploy", str(folder), "--entry", "tiny.mnn", "--golden",
                         str(TINY.with_suffix(".golden.npz")), "-g", "cancel",
                         "--name", "cx")
    dep = str(doc["deployment"])
    assert doc["version"] == 2
    rc, d1 = lab.agent("c1")  # c1 takes version 2 before the cancel
    assert rc == 0 and _slot(lab, "c1", "cx") == 2, d1
    before = json.loads((lab.root / "c2" / "pull.json").read_text())["last_counter"]
    out = lab.fleet_json("deployment", "cancel", dep)
    assert "reverted on 1 pull device" in out["controller"]
    assert lab.steps(dep) == {"c1": "ok", "c2": "cancelled"}
    assert lab.status(dep) == "cancelled"
    rc, d2 = lab.agent("c2")  # its desired state is version 1 again, under a new counter
    assert rc == 0 and d2["counter"] > before, d2
    assert not any(s.get("state") == "downloading" for s in d2["steps"]), d2
    assert _slot(lab, "c2", "cx") == 1
    # rollback through the desired state: c1 goes back to the version it reported as
    # previous, with a signed rollback order
    back = lab.fleet_json("rollback", "cx", "-d", "c1")
    rb = str(back["deployment"])
    assert back["kind"] == "rollback" and back["left_out"] == {}
    assert lab.steps(rb) == {"c1": "pending"}
    rc, d1 = lab.agent("c1")
    assert rc == 0 and any(s.get("state") == "rolled_back" for s in d1["steps"]), d1
    assert _slot(lab, "c1", "cx") == 1
    assert lab.steps(rb) == {"c1": "ok"} and lab.status(rb) == "completed"
    rc, d1 = lab.agent("c1")  # the next check-in changes nothing
    assert rc == 0 and _slot(lab, "c1", "cx") == 1 and d1["steps"] == [], d1


def test_install_window_stages_outside_it_and_activates_inside(lab: Lab) -> None:
    from datetime import UTC, datetime, timedelta

    lab.fleet("group", "create", "win")
    lab.enrolled("n1", "win")
    bad = lab.fleet("deploy", str(TINY), "-g", "win", "--window", "25:00-01:00",
                    "--json", check=False)
    assert bad.returncode == 2 and "HH:MM-HH:MM" in bad.stderr + bad.stdout
    now = datetime.now(UTC)
    window = f"{now + timedelta(hours=4):%H:%M}-{now + timedelta(hours=6):%H:%M}"
    doc = lab.fleet_json("deploy", str(TINY), "-g", "win", "--name", "win",
                         "--window", window)
    dep = str(doc["deployment"])
    assert doc["window"] == window
    rc, out = lab.agent("n1", env={"TZ": "UTC"})  # device-local time: outside the window
    assert rc == 0 and any(s.get("waiting_for_window") == window for s in out["steps"]), out
    assert any("downloaded" in s for s in out["steps"])  # the download did not wait
    assert _slot(lab, "n1", "win") is None
    assert lab.steps(dep) == {"n1": "staged"}
    rc, out = lab.agent("n1", env={"TZ": "UTC"})  # still outside: still waiting
    assert rc == 0 and _slot(lab, "n1", "win") is None
    rc, out = lab.agent("n1", env={"TZ": "XXX-5"})  # UTC+5: inside the window
    assert rc == 0 and not any("downloaded" in s for s in out["steps"]), out
    assert _slot(lab, "n1", "win") == 1
    assert lab.steps(dep) == {"n1": "ok"} and lab.status(dep) == "completed"


def test_revoked_device_is_refused(lab: Lab) -> None:
    lab.fleet("group", "create", "rev")
    lab.enrolled("r1", "rev")
    lab.fleet("device", "revoke", "r1", "--yes")
    rc, doc = lab.agent("r1")
    assert rc == 1 and doc["error"]["code"] == "revoked", doc


def test_forged_report_is_refused_and_nothing_is_recorded(lab: Lab) -> None:
    lab.fleet("group", "create", "forge")
    lab.enrolled("f1", "forge")
    bearer = lab.bearer(lab.device_key("f1"))
    other = ec.generate_private_key(ec.SECP256R1())
    forged = sign_report(other, {"name": "x", "version": 1, "deployment": None,
                                 "report": {"name": "x", "version": 1}})
    body = json.loads(forged["report"])
    body["device"] = lab.fleet_json("device", "show", "f1")["fingerprint"]
    forged["report"] = json.dumps(body)  # names f1, signed by another key
    c = httpx.Client(base_url=lab.url, verify=lab.tls(),
                     headers={"Authorization": f"Bearer {bearer}"})
    before = lab.fleet_json("reports", "f1")
    r = c.post(f"{API_PREFIX}/reports", json=forged)
    assert r.status_code == 401 and r.json()["error"]["code"] == "bad_signature"
    genuine = sign_report(lab.device_key("f1"), {"name": "x", "version": 1,
                                                 "deployment": None, "report": {}})
    assert c.post(f"{API_PREFIX}/reports", json=genuine).status_code == 200
    assert len(lab.fleet_json("reports", "f1")) == len(before) + 1


def test_expired_desired_state_is_refused(lab: Lab) -> None:
    lab.fleet("group", "create", "late-clock")
    lab.enrolled("x1", "late-clock")
    port = _free_port()
    behind = lab.start(port, FLEET_TEST_SERVER_CLOCK_SKEW_S=str(-3 * 86400))
    try:
        rc, doc = lab.agent("x1", server=f"https://127.0.0.1:{port}")
    finally:
        lab.stop(behind)
    assert rc == 1 and doc["error"]["code"] == "expired", doc
    rc, doc = lab.agent("x1")  # the same device against the right clock is fine
    assert rc == 0, doc


def test_server_restart_mid_download_resumes_with_range(lab: Lab) -> None:
    # 32 MiB of extra payload: more than the loopback socket buffers hold, so the server
    # is really still sending when it is killed (the agent reads at --max-rate)
    folder = lab.root / "bigmodel"
    folder.mkdir()
    (folder / "tiny.mnn").write_bytes(TINY.read_bytes())
    (folder / "blob.bin").write_bytes(os.urandom(32 << 20))
    lab.fleet("group", "create", "slow")
    lab.enrolled("s1", "slow")
    lab.fleet_json("deploy", str(folder), "--entry", "tiny.mnn", "--golden",
                   str(TINY.with_suffix(".golden.npz")), "-g", "slow", "--name", "resumed")
    size = next((lab.home / "artifacts").glob("resumed-1-*.fpkg")).stat().st_size
    proc = subprocess.Popen([str(BIN / "fleet-agent"), "--root", str(lab.root / "s1"),
                             "pull", "--server", lab.url, "--ca", str(lab.ca), "--once",
                             "--max-rate", str(size // 6)], env=lab.env,
                            stdout=subprocess.PIPE, text=True)
    part: Path | None = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and part is None:
        for p in (lab.root / "s1" / "incoming").glob("*.part"):
            if p.stat().st_size >= size // 6:
                part = p
        time.sleep(0.05)
    assert part is not None, "the download never started"
    lab.stop()  # the server goes away mid-download
    out, _ = proc.communicate(timeout=120)
    first = json.loads(out.strip().splitlines()[-1])
    assert not first["ok"] and first["error"]["code"] == "connection_lost", first
    kept = part.stat().st_size
    assert 0 < kept < size
    lab.proc = lab.start()
    rc, doc = lab.agent("s1")
    assert rc == 0, doc
    got = next(s for s in doc["steps"] if "downloaded" in s)
    assert got["resumed_from"] == kept and got["received"] == size - kept
    st = json.loads((lab.root / "s1" / "state.json").read_text())
    assert st["slots"]["resumed"]["current"] == 1


def test_registry_holds_no_device_secret(lab: Lab) -> None:
    """Device keys stay on the device: the registry has public keys only."""
    con = sqlite3.connect(lab.home / "registry.db")
    try:
        keys = [r[0] for r in con.execute("SELECT public_key FROM devices "
                                          "WHERE public_key IS NOT NULL")]
    finally:
        con.close()
    assert keys and all("PRIVATE" not in k for k in keys)


# -- the OpenAPI document fuzzed against the running server (schemathesis) ---------------
def _dump(lab: Lab) -> list[str]:
    con = sqlite3.connect(lab.home / "registry.db")
    try:
        return list(con.iterdump())
    finally:
        con.close()


def test_openapi_fuzz_invalid_input_gets_4xx_never_5xx_and_writes_nothing(lab: Lab) -> None:
    """Every operation of /openapi.json, with schemathesis' generated inputs (valid
    shapes and invalid ones) and no credentials: never a 5xx, and the registry dump is
    the same afterwards."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation import GenerationMode

    before = _dump(lab)
    doc = httpx.get(f"{lab.url}/openapi.json", verify=lab.tls()).json()
    assert doc["info"]["title"] == "mnn-fleet device API"
    schema = schemathesis.openapi.from_dict(doc)
    seen: list[tuple[str, str, int]] = []
    with requests.Session() as session:
        session.verify = str(lab.ca)
        for result in schema.get_all_operations():
            op = result.ok()
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                @given(case=op.as_strategy(generation_mode=mode))
                @settings(max_examples=25, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))
                def call(case: Any) -> None:
                    resp = case.call(base_url=lab.url, session=session, timeout=30,
                                     verify=str(lab.ca))
                    seen.append((case.method, case.path, resp.status_code))
                    assert resp.status_code < 500, (case.method, case.path,
                                                    resp.status_code, resp.text[:300])

                try:
                    call()
                except Unsatisfiable:  # nothing to make invalid (GET /healthz)
                    assert mode is GenerationMode.NEGATIVE and not op.body
    assert len({(m, p) for m, p, _ in seen}) == len(doc["paths"])
    assert any(400 <= code < 500 for _, _, code in seen)
    assert _dump(lab) == before
