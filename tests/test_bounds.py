"""Finding 8, controller side (``cases/unbounded-agent-output``, ``cases/golden-memory``):
the controller keeps at most a cap of what a device prints (``OutputLimitError`` past it),
and refuses an oversized golden / reference / inputs file by its size before reading it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from fleet.artifacts import sources
from fleet.artifacts.prepare import PrepareOptions, prepare
from fleet.core import errors
from fleet.core.limits import MAX_GOLDEN_BYTES, MAX_OUTPUT_ENV, agent_output_limit
from fleet.transports._bounded import CappedBuffer, run_capped
from fleet.transports.local import LocalTransport

TINY = Path(__file__).resolve().parents[1] / "models" / "tiny" / "tiny.mnn"


def _big(path: Path, size: int) -> Path:
    with open(path, "wb") as f:  # sparse: no disk, no memory
        f.truncate(size)
    return path


def test_default_cap_is_16_mib_and_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    assert agent_output_limit() == 16 << 20
    monkeypatch.setenv(MAX_OUTPUT_ENV, "4096")
    assert agent_output_limit() == 4096


def test_capped_buffer_refuses_to_grow_past_its_cap() -> None:
    buf = CappedBuffer("stdout", limit=10)
    buf.add(b"0123456789")
    with pytest.raises(errors.OutputLimitError) as info:
        buf.add(b"x")
    assert info.value.details["limit"] == 10 and bytes(buf) == b"0123456789"


def test_an_agent_printing_past_the_cap_is_an_output_limit_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MAX_OUTPUT_ENV, str(1 << 20))
    noisy = [sys.executable, "-c", "import sys\nfor _ in range(64): "
             "sys.stdout.write('x' * (1 << 20))"]
    with LocalTransport(f"local://x?root={tmp_path}") as t, \
            pytest.raises(errors.OutputLimitError, match="more than 1048576 bytes"):
        t.run(noisy, timeout=30)


def test_output_within_the_cap_and_stdin_pass_through() -> None:
    code, out, err = run_capped(["sh", "-c", "cat; echo e >&2"], stdin=b"ab" * 100_000,
                                timeout=10)
    assert code == 0 and out == b"ab" * 100_000 and err == b"e\n"


def test_oversized_golden_is_refused_by_size_before_reading(tmp_path: Path) -> None:
    big = _big(tmp_path / "big.golden.npz", MAX_GOLDEN_BYTES + 1)
    with pytest.raises(errors.UnsafeFileError) as info:
        prepare(TINY, PrepareOptions(work_dir=tmp_path / "w", golden=big))
    assert info.value.details["reason"] == "too_large"


def test_oversized_sibling_golden_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "tiny.mnn"
    model.write_bytes(TINY.read_bytes())
    _big(tmp_path / "tiny.golden.npz", MAX_GOLDEN_BYTES + 1)
    with pytest.raises(errors.UnsafeFileError, match="refused before reading"):
        prepare(model, PrepareOptions(work_dir=tmp_path / "w"))


def test_oversized_inputs_file_is_refused(tmp_path: Path) -> None:
    big = _big(tmp_path / "in.npz", MAX_GOLDEN_BYTES + 1)
    with pytest.raises(errors.UnsafeFileError):
        prepare(TINY, PrepareOptions(work_dir=tmp_path / "w", inputs=big))


def test_reference_file_at_the_cap_is_accepted(tmp_path: Path) -> None:
    ok = _big(tmp_path / "ok.ref.json", MAX_GOLDEN_BYTES)
    assert sources.reference_file(ok, "--golden") == ok
    assert os.path.getsize(ok) == MAX_GOLDEN_BYTES
