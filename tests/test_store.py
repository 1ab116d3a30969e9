"""The device store: staging, atomic slots, decrypt into memory only, crash safety, disk
full. A real MNN model is loaded from a memfd path."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from fleet_agent.context import AgentContext
from fleet_agent.store import CRASH_ENV, Store

from fleet.core import errors
from tests.package_kit import (
    CHUNK,
    Device,
    make_device,
    make_package,
    make_tiny_mnn,
    payload_bytes,
    split,
)

REPO = Path(__file__).resolve().parents[1]


def _all_bytes_under(root: Path) -> list[bytes]:
    return [p.read_bytes() for p in root.rglob("*") if p.is_file()]


def test_real_model_loads_from_memfd_and_no_plaintext_touches_disk(
        tmp_path: Path, signer: ed25519.Ed25519PrivateKey, dev: Device) -> None:
    import MNN
    import numpy as np

    model = make_tiny_mnn(tmp_path / "tiny.mnn")
    plain = model.read_bytes()
    pkg, _ = make_package(tmp_path, signer, [dev], version=1, files=[("tiny.mnn", plain)])
    st = dev.store()
    st.stage(pkg)
    st.activate("m", 1)
    x = np.random.default_rng(1).standard_normal((1, 3, 4, 4)).astype(np.float32)

    def run(path: str) -> np.ndarray:
        mod = MNN.nn.load_module_from_file(path, ["input"], ["output"])
        out = mod.forward([MNN.expr.const(x, [1, 3, 4, 4], MNN.expr.NCHW)])
        return np.array(out[0].read())

    with st.open_payload("m") as opened:
        assert opened.entry.startswith("/proc/self/fd/")
        fd = opened.fds["tiny.mnn"]
        assert Path(opened.entry).read_bytes() == plain
        with pytest.raises(OSError):  # sealed: the verified bytes cannot change
            os.write(fd, b"x")
        got = run(opened.entry)
    with pytest.raises(OSError) as closed:
        os.fstat(fd)
    assert closed.value.errno == errno.EBADF
    np.testing.assert_allclose(got, run(str(model)), rtol=1e-6)
    needle = plain[len(plain) // 2: len(plain) // 2 + 64]
    assert not any(needle in blob for blob in _all_bytes_under(dev.ctx.root))


def test_as_dir_puts_files_side_by_side_on_tmpfs_and_removes_them(
        tmp_path: Path, signer: ed25519.Ed25519PrivateKey, dev: Device) -> None:
    files = [("config.json", b'{"backend_type":"cpu"}'), ("llm.mnn", payload_bytes(5000, 3)),
             ("sub/empty.bin", b"")]
    pkg, _ = make_package(tmp_path, signer, [dev], version=1, files=files, entry="llm.mnn")
    st = dev.store()
    st.stage(pkg)
    st.activate("m", 1)
    with st.open_payload("m", as_dir=True) as opened:
        assert opened.directory is not None and opened.directory.startswith("/dev/shm/")
        d = Path(opened.directory)
        assert (d / "config.json").read_bytes() == files[0][1]
        assert (d / "llm.mnn").read_bytes() == files[1][1]
        assert (d / "sub/empty.bin").read_bytes() == b""
        assert oct(d.stat().st_mode & 0o777) == oct(0o700)
    assert not d.exists()


def test_a_corrupted_stored_package_does_not_open(tmp_path: Path,
                                                  signer: ed25519.Ed25519PrivateKey,
                                                  dev: Device) -> None:
    pkg, _ = make_package(tmp_path, signer, [dev], version=1)
    st = dev.store()
    staged = st.stage(pkg)
    st.activate("m", 1)
    stored = dev.ctx.store / staged.package
    data = bytearray(stored.read_bytes())
    data[-5] ^= 1  # bit rot at rest
    stored.write_bytes(bytes(data))
    fds_before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(errors.ChunkAuthError), st.open_payload("m"):
        pass
    assert set(os.listdir("/proc/self/fd")) <= fds_before  # nothing leaked


def test_activate_keeps_previous_and_local_rollback_swaps(
        tmp_path: Path, signer: ed25519.Ed25519PrivateKey, dev: Device) -> None:
    st = dev.store()
    for v in (1, 2, 3):
        st.stage(make_package(tmp_path, signer, [dev], version=v)[0])
    with pytest.raises(errors.NoActiveModelError), st.open_payload("m"):
        pass
    assert st.activate("m", 1).changed
    change = st.activate("m", 3)
    assert (change.current, change.previous, change.changed) == (3, 1, True)
    assert not st.activate("m", 3).changed  # idempotent
    with pytest.raises(errors.RollbackError):
        st.activate("m", 2)  # going down is rollback's job
    with pytest.raises(errors.NotFoundError):
        st.activate("m", 7)
    back = st.rollback("m")
    assert (back.current, back.previous) == (1, 3)
    with st.open_payload("m") as opened:
        assert Path(opened.entry).read_bytes() == payload_bytes(4 * CHUNK, 1)
    info = st.installed()["m"]
    assert info == {"kind": "model", "active": 1, "previous": 3, "versions": [1, 2, 3],
                    "floor": 3, "sequence": info["sequence"]}
    # A rolled-back-from version is still the floor: a re-offered v3 build is a replay.
    with pytest.raises(errors.ReplayError):
        st.stage(make_package(tmp_path, signer, [dev], version=3, seed=8)[0])


def test_rollback_without_previous(tmp_path: Path, signer: ed25519.Ed25519PrivateKey,
                                   dev: Device) -> None:
    st = dev.store()
    st.stage(make_package(tmp_path, signer, [dev], version=1)[0])
    st.activate("m", 1)
    with pytest.raises(errors.StoreError):
        st.rollback("m")


def test_unenrolled_device_refuses_to_stage(tmp_path: Path, signer: ed25519.Ed25519PrivateKey,
                                            dev: Device) -> None:
    pkg, _ = make_package(tmp_path, signer, [dev], version=1)
    dev.ctx.trust_file.unlink()
    with pytest.raises(errors.KeyMaterialError):
        dev.store().stage(pkg)


_CHILD = """
import sys
from pathlib import Path
from fleet_agent.context import AgentContext
from fleet_agent.store import Store
st = Store(AgentContext(Path(sys.argv[1])))
st.stage(sys.argv[2])
st.activate("m", 2)
"""

STEPS = ["stage:written", "stage:stored", "stage:state", "activate:previous",
         "activate:current", "activate:state"]


@pytest.mark.parametrize("step", STEPS)
def test_crash_at_each_step_leaves_old_or_new_active(tmp_path: Path,
                                                     signer: ed25519.Ed25519PrivateKey,
                                                     dev: Device, step: str) -> None:
    st = dev.store()
    st.stage(make_package(tmp_path, signer, [dev], version=1)[0])
    st.activate("m", 1)
    v2, _ = make_package(tmp_path, signer, [dev], version=2)
    env = dict(os.environ, **{CRASH_ENV: step})
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(dev.ctx.root), str(v2)],
                          env=env, cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == 137, proc.stderr.decode()[-2000:]
    st = Store(AgentContext(dev.ctx.root))
    slot = st.active("m")
    assert slot is not None
    expect = 2 if step in ("activate:current", "activate:state") else 1
    assert slot.version == expect
    with st.open_payload("m") as opened:  # the active one really opens
        assert Path(opened.entry).read_bytes() == payload_bytes(4 * CHUNK, expect)
    # And the agent recovers: the same operation, run again without a crash, completes.
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(dev.ctx.root), str(v2)],
                          cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert Store(dev.ctx).active("m").version == 2  # type: ignore[union-attr]
    assert not list(dev.ctx.store.glob(".incoming-*"))


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> object:
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                    str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full_while_staging_keeps_the_previous_model(tmp_path: Path,
                                                          signer: ed25519.Ed25519PrivateKey
                                                          ) -> None:
    """A real ENOSPC: the device root is a 1 MiB tmpfs (the tests run as root)."""
    with _tmpfs(tmp_path / "small", "1m") as root:
        d = make_device(root / "dev", signer)  # type: ignore[operator]
        st = d.store()
        st.stage(make_package(tmp_path, signer, [d], version=1)[0])
        st.activate("m", 1)
        before = d.stored_files()
        big, _ = make_package(tmp_path, signer, [d], version=2, size=2 << 20)
        with pytest.raises(errors.DiskFullError):
            st.stage(big)
        assert d.stored_files() == before  # the partial copy is gone
        assert st.active("m").version == 1  # type: ignore[union-attr]
        with st.open_payload("m") as opened:
            assert opened.manifest.version == 1
        assert st.installed()["m"]["floor"] == 1  # the refused v2 was not recorded


def test_package_split_helper_sees_every_chunk(tmp_path: Path,
                                               signer: ed25519.Ed25519PrivateKey,
                                               dev: Device) -> None:
    pkg, m = make_package(tmp_path, signer, [dev], version=1, size=3 * CHUNK + 1)
    _, chunks = split(pkg)
    assert len(chunks) == m.chunks == 4
