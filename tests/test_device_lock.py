"""One operation at a time per device root (issue 13, case ``concurrent-deploys``, device
half): two agent processes on one root are serialised, or the second is told ``busy``
(retryable) after its wait; two pushes of one file to one device each write their own
partial file and both succeed; an interrupted push still resumes."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from fleet.core import errors
from fleet.core.fsutil import sha256_file
from fleet.core.package.envelope import envelope_to_text
from fleet.transports.base import TransferResult, TransportOptions
from fleet.transports.local import LocalTransport
from tests.package_kit import Device, envelope_of, make_package

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20

_HOLDER = """
import sys
from pathlib import Path
from fleet_agent.context import AgentContext
from fleet_agent.store import root_lock
with root_lock(AgentContext(Path(sys.argv[1]))):
    print("held", flush=True)
    sys.stdin.read()
"""


def _holder(dev: Device) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(dev.ctx.root)], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _agent(dev: Device, verb: str, args: dict[str, object]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "fleet_agent", "--root", str(dev.ctx.root),
                             verb, "--args", json.dumps(args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _answer(proc: subprocess.Popen[bytes]) -> tuple[int, dict[str, Any]]:
    out, err = proc.communicate(timeout=120)
    assert out, err.decode()[-2000:]
    return proc.returncode, json.loads(out)


def _local(dev: Device, home: Path) -> LocalTransport:
    return LocalTransport(f"local://d?root={dev.ctx.root}", TransportOptions(home=home))


def test_a_second_operation_is_busy_after_its_wait(dev: Device) -> None:
    holder = _holder(dev)
    try:
        rc, doc = _answer(_agent(dev, "gc", {"lock_timeout": 0.3}))
        assert rc == 1 and doc["ok"] is False
        err = doc["error"]
        assert isinstance(err, dict) and err["code"] == "busy"
        again = errors.error_from_code(err["code"], err["message"], err["details"])
        assert isinstance(again, errors.BusyError) and again.retryable
        # status reads, never waits
        rc, doc = _answer(_agent(dev, "status", {}))
        assert rc == 0 and doc["ok"]
    finally:
        holder.kill()
        holder.wait()


def test_a_waiting_operation_runs_once_the_holder_is_done(dev: Device) -> None:
    holder = _holder(dev)
    waiting = _agent(dev, "gc", {"lock_timeout": 120})
    assert holder.stdin is not None
    holder.stdin.close()  # the holder finishes its operation
    holder.wait(timeout=60)
    rc, doc = _answer(waiting)
    assert rc == 0 and doc["ok"], doc


def test_a_killed_holder_does_not_wedge_the_root(dev: Device) -> None:
    holder = _holder(dev)
    holder.kill()  # SIGKILL: no cleanup at all
    holder.wait()
    rc, doc = _answer(_agent(dev, "gc", {"lock_timeout": 5}))
    assert rc == 0 and doc["ok"], doc


def test_two_agents_staging_one_upload_both_succeed(tmp_path: Path,
                                                    signer: ed25519.Ed25519PrivateKey,
                                                    dev: Device) -> None:
    """Two deploys of one package land on incoming/<sha>.fpkg; the first stage takes it,
    the second finds it already staged (no ``[Errno 2]``)."""
    pkg, _ = make_package(tmp_path, signer, [dev], version=1, size=MiB)
    remote = str(dev.ctx.incoming / f"{sha256_file(pkg)}.fpkg")
    _local(dev, tmp_path).push(pkg, remote)
    env = envelope_to_text(envelope_of(pkg, dev) or b"")  # what each deploy sends with it
    procs = [_agent(dev, "stage", {"path": remote, "envelope": env}) for _ in range(2)]
    answers = [_answer(p) for p in procs]
    assert [rc for rc, _ in answers] == [0, 0], answers
    assert sorted(bool(doc["already"]) for _, doc in answers) == [False, True]
    assert {doc["version"] for _, doc in answers} == {1}
    assert not list(dev.ctx.incoming.iterdir())
    assert dev.store().installed()["m"]["versions"] == [1]


def test_two_concurrent_pushes_of_one_file_both_succeed(tmp_path: Path, dev: Device) -> None:
    src = tmp_path / "pkg.fpkg"
    src.write_bytes(bytes(range(256)) * (3 * MiB // 256))
    remote = str(dev.ctx.incoming / "same.fpkg")
    first_midway, second_done = threading.Event(), threading.Event()
    results: dict[str, object] = {}

    def hold_midway(done: int, total: int) -> None:
        if done < total and not first_midway.is_set():
            first_midway.set()
            assert second_done.wait(60)  # the other push runs start to end meanwhile

    def first() -> None:
        try:
            results["first"] = _local(dev, tmp_path).push(src, remote, progress=hold_midway)
        except Exception as exc:  # reported below
            results["first"] = exc

    t = threading.Thread(target=first)
    t.start()
    assert first_midway.wait(60)
    parts = sorted(p.name for p in dev.ctx.incoming.iterdir())
    assert parts == ["same.fpkg.part"]
    try:
        results["second"] = _local(dev, tmp_path).push(src, remote)
    finally:
        second_done.set()
        t.join(60)
    want = sha256_file(src)
    for key in ("first", "second"):
        res = results[key]
        assert isinstance(res, TransferResult), res
        assert res.sha256 == want
    assert sha256_file(remote) == want
    assert sorted(p.name for p in dev.ctx.incoming.iterdir()) == ["same.fpkg"]


def test_an_interrupted_push_resumes_from_its_partial_file(tmp_path: Path,
                                                           dev: Device) -> None:
    src = tmp_path / "pkg.fpkg"
    src.write_bytes(bytes(range(256)) * (3 * MiB // 256))
    remote = str(dev.ctx.incoming / "r.fpkg")

    def cut(done: int, total: int) -> None:
        if done >= MiB:
            raise ConnectionResetError("link dropped")

    with pytest.raises(errors.TransportError):
        _local(dev, tmp_path).push(src, remote, progress=cut)
    kept = Path(remote + ".part").stat().st_size
    assert 0 < kept < src.stat().st_size
    res = _local(dev, tmp_path).push(src, remote)  # a later push, a new transport
    assert res.resumed_from == kept and res.bytes_sent == src.stat().st_size - kept
    assert sha256_file(remote) == sha256_file(src)
