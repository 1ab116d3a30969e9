"""SshTransport against real OpenSSH boards of the IoT lab (root; network namespaces)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import paramiko
import pytest

from fleet.core import errors
from fleet.lab import faults, iot
from fleet.transports import TransferResult, open_transport
from fleet.transports._known_hosts import KnownHosts, fingerprint
from fleet.transports.ssh import SshTransport

pytest_plugins = ("tests.lab_fixtures",)

if TYPE_CHECKING:
    from tests.lab_fixtures import IotLab

pytestmark = pytest.mark.lab


def _blob(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def test_open_transport_maps_ssh_scheme(iot_lab: IotLab) -> None:
    dev = iot_lab.boards(1)[0]
    t = open_transport(dev.uri, iot_lab.options())
    assert isinstance(t, SshTransport)
    assert t.agent_root() == dev.agent_root
    assert t.agent_cmd() == dev.agent_cmd
    bare = SshTransport("ssh://pi@board.local:2222", iot_lab.options())
    assert (bare.agent_root(), bare.agent_cmd(), bare.port) == ("~/.fleet-agent",
                                                                ["fleet-agent"], 2222)


def test_run_exit_code_output_and_stdin(iot_lab: IotLab) -> None:
    with iot_lab.transport(iot_lab.boards(1)[0]) as t:
        res = t.run(["sh", "-c", "echo out; echo err >&2; cat; exit 7"], timeout=20,
                    stdin=b"from stdin")
        assert (res.exit_code, res.stdout, res.stderr) == (7, b"out\nfrom stdin", b"err\n")
        # arguments travel as words, not as shell text
        res = t.run(["printf", "%s|", "a b", "$HOME", "'q'"], timeout=20)
        assert res.ok and res.stdout == b"a b|$HOME|'q'|"
        big = os.urandom(3 << 20)  # larger than the ssh window: stdin and stdout interleave
        res = t.run(["cat"], timeout=60, stdin=big)
        assert res.stdout == big


def test_run_timeout_is_bounded(iot_lab: IotLab) -> None:
    with iot_lab.transport(iot_lab.boards(1)[0]) as t:
        start = time.monotonic()
        with pytest.raises(errors.TransportTimeout):
            t.run(["sleep", "30"], timeout=1.0)
        assert time.monotonic() - start < 10
        assert t.run(["true"], timeout=20).ok  # the transport is usable afterwards


def test_push_pull_stat_roundtrip(iot_lab: IotLab, tmp_path: Path) -> None:
    dev = iot_lab.boards(1)[0]
    src = _blob(tmp_path / "model.bin", 5 * (1 << 20) + 123)
    remote = f"{dev.agent_root}/incoming/sub/model.bin"
    seen: list[tuple[int, int]] = []
    with iot_lab.transport(dev) as t:
        res = t.push(src, remote, progress=lambda done, total: seen.append((done, total)))
        assert (res.size, res.bytes_sent, res.resumed_from) == (src.stat().st_size,
                                                                src.stat().st_size, 0)
        assert seen[-1] == (src.stat().st_size, src.stat().st_size)
        st = t.stat(remote)
        assert st is not None and st.size == src.stat().st_size and not st.is_dir
        assert t.stat(remote + ".part") is None  # renamed into place
        assert t.stat(f"{dev.agent_root}/incoming").is_dir  # type: ignore[union-attr]
        assert t.stat(f"{dev.agent_root}/nope") is None
        back = t.pull(remote, tmp_path / "back.bin")
        assert back.sha256 == res.sha256
        assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
        with pytest.raises(errors.RemoteFileError):
            t.pull(f"{dev.agent_root}/nope", tmp_path / "x")
    # the board really has the bytes (the namespace shares this filesystem)
    assert Path(remote).read_bytes() == src.read_bytes()


def test_unknown_host_key_is_refused_with_its_fingerprint(iot_lab: IotLab,
                                                          tmp_path: Path) -> None:
    dev = iot_lab.boards(1)[0]
    empty = tmp_path / "known_hosts"
    t = iot_lab.transport(dev, known_hosts=empty)
    with pytest.raises(errors.UnknownHostKeyError) as info:
        t.run(["true"], timeout=10)
    fp = dev.extra["host_key_fingerprint"]
    assert fp in str(info.value) and "--accept-host-key" in str(info.value)
    assert not empty.exists() or fp not in empty.read_text()


def test_accept_host_key_pins_exactly_that_key(iot_lab: IotLab, tmp_path: Path) -> None:
    dev = iot_lab.boards(1)[0]
    kh = tmp_path / "known_hosts"
    wrong = "SHA256:" + "A" * 43
    with pytest.raises(errors.UnknownHostKeyError):
        iot_lab.transport(dev, known_hosts=kh, accept_host_key=wrong).run(["true"], timeout=10)
    assert KnownHosts(kh).lookup(dev.extra["board_addr"], 22) == {}
    fp = dev.extra["host_key_fingerprint"]
    with iot_lab.transport(dev, known_hosts=kh, accept_host_key=fp) as t:
        assert t.run(["true"], timeout=10).ok
    pinned = KnownHosts(kh).lookup(dev.extra["board_addr"], 22)
    assert [fingerprint(k) for k in pinned.values()] == [fp]
    assert oct(kh.stat().st_mode & 0o777) == "0o600"
    # from now on no acceptance is needed
    with iot_lab.transport(dev, known_hosts=kh) as t:
        assert t.run(["true"], timeout=10).ok


def test_changed_host_key_is_refused(iot_lab: IotLab, tmp_path: Path) -> None:
    dev = iot_lab.boards(1)[0]
    kh = tmp_path / "known_hosts"
    impostor = paramiko.Ed25519Key.from_private_key_file(
        str(_fresh_ed25519(tmp_path / "other_key")))
    KnownHosts(kh).pin(dev.extra["board_addr"], 22, impostor)
    # even an explicit acceptance of the new key does not override a pinned one
    t = iot_lab.transport(dev, known_hosts=kh,
                          accept_host_key=dev.extra["host_key_fingerprint"])
    with pytest.raises(errors.ChangedHostKeyError) as info:
        t.run(["true"], timeout=10)
    msg = str(info.value)
    assert fingerprint(impostor) in msg and dev.extra["host_key_fingerprint"] in msg
    assert [fingerprint(k) for k in KnownHosts(kh).lookup(dev.extra["board_addr"], 22)
            .values()] == [fingerprint(impostor)]


def _fresh_ed25519(path: Path) -> Path:
    from fleet.transports._known_hosts import ensure_ssh_key
    return ensure_ssh_key(path)


def test_wrong_client_key_is_an_auth_error(iot_lab: IotLab, tmp_path: Path) -> None:
    dev = iot_lab.boards(1)[0]
    other = _fresh_ed25519(tmp_path / "stranger")
    with pytest.raises(errors.AuthError):
        iot_lab.transport(dev, ssh_key=other).run(["true"], timeout=10)


def test_link_down_mid_transfer_then_resume(iot_lab: IotLab, tmp_path: Path) -> None:
    dev = iot_lab.boards(1)[0]
    size = 24 << 20
    src = _blob(tmp_path / "big.bin", size)
    remote = f"{dev.agent_root}/incoming/big.bin"
    home = iot_lab.home
    cut = threading.Event()

    def pull_the_plug(done: int, total: int) -> None:
        if done >= 6 << 20 and not cut.is_set():
            cut.set()
            faults.apply_fault(home, dev.name, down=True)

    try:
        # 40 Mbit/s so the transfer is still running when the link goes down
        faults.apply_fault(home, dev.name, bandwidth="40mbit")
        t = iot_lab.transport(dev, io_timeout=3)
        start = time.monotonic()
        with pytest.raises(errors.TransportError) as info:
            t.push(src, remote, progress=pull_the_plug)
        assert info.value.retryable, info.value
        assert time.monotonic() - start < 60
        t.close()
        faults.apply_fault(home, dev.name, up=True)
        kept = Path(remote + ".part").stat().st_size
        assert 0 < kept < size
        seen: list[int] = []
        res: TransferResult = iot_lab.transport(dev, io_timeout=10).push(
            src, remote, progress=lambda done, total: seen.append(done))
    finally:
        iot_lab.heal(dev.name)
    assert res.resumed_from == kept
    assert res.bytes_sent == size - kept  # bytes already on the board were not sent again
    assert seen[0] == kept
    assert Path(remote).read_bytes() == src.read_bytes()


def test_corrupt_partial_file_is_not_trusted(iot_lab: IotLab, tmp_path: Path) -> None:
    dev = iot_lab.boards(1)[0]
    src = _blob(tmp_path / "m.bin", 2 << 20)
    remote = f"{dev.agent_root}/incoming/m.bin"
    Path(remote).parent.mkdir(parents=True, exist_ok=True)
    Path(remote + ".part").write_bytes(b"\0" * (1 << 20))  # right size class, wrong bytes
    with iot_lab.transport(dev) as t:
        res = t.push(src, remote)
    assert (res.resumed_from, res.bytes_sent) == (0, 2 << 20)
    assert Path(remote).read_bytes() == src.read_bytes()


def _push_with_deadline(t: SshTransport, src: Path, remote: str, deadline: float
                        ) -> tuple[bool, object]:
    box: dict[str, object] = {}

    def work() -> None:
        try:
            box["result"] = t.push(src, remote)
        except errors.TransportError as exc:
            box["error"] = exc

    th = threading.Thread(target=work, daemon=True)
    th.start()
    th.join(deadline)
    return th.is_alive(), box.get("result", box.get("error"))


@pytest.mark.parametrize("fault", [{"bandwidth": "2mbit"}, {"loss": 30}],
                         ids=["2mbit", "loss30"])
def test_bad_link_completes_or_fails_cleanly(iot_lab: IotLab, tmp_path: Path,
                                             fault: dict[str, object]) -> None:
    dev = iot_lab.boards(2)[1]
    src = _blob(tmp_path / "f.bin", 2 << 20)
    remote = f"{dev.agent_root}/incoming/f-{next(iter(fault))}.bin"
    try:
        faults.apply_fault(iot_lab.home, dev.name, **fault)  # type: ignore[arg-type]
        start = time.monotonic()
        hung, outcome = _push_with_deadline(iot_lab.transport(dev, io_timeout=15), src,
                                            remote, deadline=120)
        took = time.monotonic() - start
    finally:
        iot_lab.heal(dev.name)
    print(f"{fault}: {type(outcome).__name__} after {took:.1f}s")
    assert not hung, "push hung past its deadline"
    if isinstance(outcome, TransferResult):
        assert Path(remote).read_bytes() == src.read_bytes()
        if "bandwidth" in fault:  # 2 MiB at 2 Mbit/s cannot take less than ~8 s
            assert took > 6
    else:
        assert isinstance(outcome, errors.TransportError)


def test_disk_full_before_push_is_refused_cleanly(iot_lab: IotLab, tmp_path: Path) -> None:
    dev = iot_lab.boards(2)[1]
    root = Path(dev.agent_root)
    filler = root / "filler"
    free = os.statvfs(root).f_bavail * os.statvfs(root).f_frsize
    try:
        with open(filler, "wb") as f:
            f.truncate(0)
            f.write(b"\0" * (free - (1 << 20)))
        src = _blob(tmp_path / "x.bin", 4 << 20)
        with iot_lab.transport(dev) as t, pytest.raises(errors.RemoteDiskFullError):
            t.push(src, f"{dev.agent_root}/incoming/x.bin")
        assert not Path(f"{dev.agent_root}/incoming/x.bin.part").exists()
    finally:
        filler.unlink(missing_ok=True)


def test_disk_full_mid_transfer_is_remote_disk_full(iot_lab: IotLab, tmp_path: Path) -> None:
    dev = iot_lab.boards(2)[1]
    root = Path(dev.agent_root)
    filler = root / "filler2"
    src = _blob(tmp_path / "y.bin", 16 << 20)
    remote = f"{dev.agent_root}/incoming/y.bin"

    def fill_up(done: int, total: int) -> None:
        if done >= 2 << 20 and not filler.exists():
            # another writer takes all the space while the push runs: ENOSPC for real
            with open(filler, "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * (1 << 20))
                except OSError:
                    pass

    try:
        with iot_lab.transport(dev) as t, pytest.raises(errors.RemoteDiskFullError):
            t.push(src, remote, progress=fill_up)
        assert filler.exists()
        assert not Path(remote + ".part").exists()  # the useless partial file is gone
        assert not Path(remote).exists()
    finally:
        filler.unlink(missing_ok=True)


def test_sshd_killed_is_a_connect_error(iot_lab: IotLab) -> None:
    dev = iot_lab.boards(2)[1]
    try:
        faults.apply_fault(iot_lab.home, dev.name, stop_sshd=True)
        assert {r["name"]: r["sshd"] for r in iot.status(iot_lab.home)}[dev.name] == "stopped"
        with pytest.raises(errors.ConnectError) as info:
            iot_lab.transport(dev).run(["true"], timeout=10)
        assert info.value.retryable
    finally:
        iot_lab.heal(dev.name)
    with iot_lab.transport(dev) as t:  # same host key after the restart
        assert t.run(["true"], timeout=10).ok


def test_link_down_at_connect_is_a_connect_error(iot_lab: IotLab) -> None:
    dev = iot_lab.boards(2)[1]
    try:
        faults.apply_fault(iot_lab.home, dev.name, down=True)
        start = time.monotonic()
        with pytest.raises(errors.ConnectError):
            iot_lab.transport(dev, connect_timeout=2.0).run(["true"], timeout=10)
        assert time.monotonic() - start < 15
    finally:
        iot_lab.heal(dev.name)
