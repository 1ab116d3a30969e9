"""MNN-LLM folders are checked against their config before anything is packaged (case
``llm-folder-missing-weight``), and no file is read through a symbolic link."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from fleet.artifacts.sources import check_llm_folder, folder_files, llm_config
from fleet.core import errors
from tests.conftest import REPO

BASE = REPO / "models" / "llm" / "base"


@pytest.fixture
def export(tmp_path: Path) -> Path:
    dst = tmp_path / "llm"
    shutil.copytree(BASE, dst)
    return dst


def _check(folder: Path) -> dict:  # type: ignore[type-arg]
    return check_llm_folder(folder, folder_files(folder))


def test_the_real_export_passes_and_llm_config_is_merged_over_config(export: Path) -> None:
    cfg = _check(export)
    assert cfg["llm_weight"] == "llm.mnn.weight" and cfg["model_type"] == "qwen2"
    assert llm_config(export)["tokenizer_file"] == "tokenizer.mtok"


@pytest.mark.parametrize(("missing", "key"), [
    ("llm.mnn.weight", "llm_weight"), ("tokenizer.mtok", "tokenizer_file"),
    ("embeddings_bf16.bin", "embedding_file"), ("llm.mnn", "llm_model")])
def test_a_missing_file_is_named(export: Path, missing: str, key: str) -> None:
    (export / missing).unlink()
    with pytest.raises(errors.InvalidModelError) as info:
        _check(export)
    assert missing in info.value.message and info.value.details["key"] == key


def test_empty_file_outside_path_and_default_tokenizer(export: Path) -> None:
    (export / "llm.mnn.weight").write_bytes(b"")
    with pytest.raises(errors.InvalidModelError, match="empty"):
        _check(export)
    shutil.copy(BASE / "llm.mnn.weight", export / "llm.mnn.weight")
    cfg = json.loads((export / "config.json").read_text())
    (export / "config.json").write_text(json.dumps({**cfg, "visual_model": "../v.mnn"}))
    with pytest.raises(errors.InvalidModelError, match="outside"):
        _check(export)
    del cfg["tokenizer_file"]  # MNN-LLM's default, tokenizer.txt, is then required
    (export / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(errors.InvalidModelError, match=r"tokenizer\.txt"):
        _check(export)


def test_tied_embeddings_need_no_embedding_file(export: Path) -> None:
    cfg = json.loads((export / "llm_config.json").read_text())
    (export / "llm_config.json").write_text(json.dumps({**cfg, "tie_embeddings": [1, 2]}))
    (export / "embeddings_bf16.bin").unlink()
    _check(export)


def test_links_are_refused_never_followed(export: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.pem"
    secret.write_text("KEY")
    os.symlink(secret, export / "NOTICE.txt")
    with pytest.raises(errors.InvalidModelError, match="symbolic link"):
        folder_files(export)
    (export / "NOTICE.txt").unlink()
    os.symlink(tmp_path, export / "sub")
    with pytest.raises(errors.InvalidModelError, match="symbolic link"):
        folder_files(export)


def test_fleet_package_refuses_before_packaging(run_fleet, home, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                export: Path) -> None:
    from fleet.artifacts import load_signing_key
    from fleet.registry import Registry
    from tests.package_kit import make_device

    assert run_fleet("init").exit_code == 0 and run_fleet("keys", "init").exit_code == 0
    from fleet_agent.identity import public_pem

    d = make_device(tmp_path / "a", load_signing_key(home))
    pem, fp = public_pem(d.key)
    reg = Registry.open(home)
    reg.add_device("a", f"local://a?root={d.ctx.root}", public_key=pem, fingerprint=fp)
    reg.close()
    (export / "llm.mnn.weight").unlink()
    out = tmp_path / "x.fpkg"
    r = run_fleet("package", str(export), "--for", "a", "-o", str(out))
    assert r.exit_code == 9 and "llm.mnn.weight" in r.stderr
    assert not out.exists() and not list(home.artifacts_dir.glob("*.fpkg"))
    r = run_fleet("deploy", str(export), "--device", "a", "--name", "llm")
    assert r.exit_code == 9 and "llm.mnn.weight" in r.stderr
