"""One packaging path: ``prepare`` then ``build``, shared by package, deploy and lora
package. LoRA export settings (issue 12 fault 8) and reproducible re-deploys of converted
models (case ``nondeterministic-onnx-redeploy``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from fleet.artifacts import init_signing_key
from fleet.artifacts.lora_export import check_export, lora_facts
from fleet.artifacts.prepare import PrepareOptions, prepare
from fleet.core import errors
from fleet.home import FleetHome
from tests.conftest import REPO, local_uri
from tests.package_kit import make_tiny_mnn

LLM = REPO / "models" / "llm"
TINY_ONNX = REPO / "models" / "tiny" / "tiny.onnx"
INT8 = {"quant_layers": 15, "quant_bits": 8, "quant_block": 64}


def test_export_check_compares_every_witness_and_refuses_when_it_cannot_tell() -> None:
    adapter = lora_facts(LLM / "lora" / "adapter_a.mnn")
    ref = json.loads((LLM / "lora" / "adapter_a.ref.json").read_text())
    check_export(INT8, adapter, ref)  # the fixture's own base: same settings
    float_base = {"quant_layers": 0, "quant_bits": None, "quant_block": None}
    with pytest.raises(errors.BaseMismatchError) as info:  # int8 adapter, fp16 base
        check_export(float_base, adapter, {})
    assert info.value.details["mismatches"]["quant_bits"] == ["float", 8]
    with pytest.raises(errors.BaseMismatchError, match="cannot tell the base"):
        check_export({"quant_bits": None}, adapter, ref)
    unknown = {**adapter, "quant_bits": None, "quant_layers": 3}
    with pytest.raises(errors.BaseMismatchError, match="cannot tell the adapter"):
        check_export(INT8, unknown, {})
    check_export(INT8, unknown, ref)  # the reference's export block speaks for it
    with pytest.raises(errors.BaseMismatchError) as info:
        check_export(INT8, adapter, {**ref, "export": {"quant_bit": 4, "quant_block": 64}})
    assert "reference.quant_bits" in info.value.details["mismatches"]
    mixed = {"quant_layers": 15, "quant_bits": [4, 8], "quant_block": 64}
    check_export(mixed, {**adapter, "quant_bits": [8, 4]}, ref)


def _enrolled_home(run_fleet: Any, home: FleetHome, tmp_path: Path) -> None:
    assert run_fleet("init").exit_code == 0
    init_signing_key(home)
    r = run_fleet("device", "add", local_uri(tmp_path, "d1"), "--name", "d1")
    assert r.exit_code == 0, r.output


def test_lora_package_refuses_an_int8_adapter_for_a_float_base(run_fleet, home: FleetHome,  # type: ignore[no-untyped-def]
                                                               tmp_path: Path) -> None:
    _enrolled_home(run_fleet, home, tmp_path)
    base = tmp_path / "fbase"
    shutil.copytree(LLM / "base", base)
    make_tiny_mnn(base / "llm.mnn")  # float weights: the base export is not quantized
    r = run_fleet("package", str(base), "--for", "d1", "-o", str(tmp_path / "b.fpkg"),
                  "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["mnn"]["quant_layers"] == 0
    r = run_fleet("lora", "package", str(LLM / "lora" / "adapter_a.mnn"), "--base",
                  "fbase@1", "-o", str(tmp_path / "a.fpkg"))
    assert r.exit_code != 0 and "quantization" in r.output
    assert not (tmp_path / "a.fpkg").exists()


def test_prepare_names_variants_and_sibling_golden(tmp_path: Path) -> None:
    src = make_tiny_mnn(tmp_path / "mtcnn_onet.fp32.mnn")
    p = prepare(src, PrepareOptions(work_dir=tmp_path))
    assert (p.name, p.variant, p.entry, p.golden) == ("mtcnn_onet", "fp32", "mtcnn_onet.mnn",
                                                      None)
    assert p.facts["variant"] == "fp32" and p.files == (("mtcnn_onet.mnn", src),)
    with pytest.raises(errors.UsageError, match="--variant"):
        prepare(src, PrepareOptions(work_dir=tmp_path, variant="fp16"))
    with pytest.raises(errors.UsageError, match="--name"):
        prepare(make_tiny_mnn(tmp_path / "a b.mnn"), PrepareOptions(work_dir=tmp_path))
    link = tmp_path / "link.mnn"
    link.symlink_to(src)
    with pytest.raises(errors.InvalidModelError, match="symbolic link"):
        prepare(link, PrepareOptions(work_dir=tmp_path))


def test_converted_payload_is_cached_by_source_options_and_converter(tmp_path: Path) -> None:
    said: list[str] = []
    cache = tmp_path / "cache"
    opts = PrepareOptions(work_dir=tmp_path / "w1", cache_dir=cache, say=said.append)
    first = prepare(TINY_ONNX, opts)
    assert any("converting" in m for m in said)
    said.clear()
    again = prepare(TINY_ONNX, PrepareOptions(work_dir=tmp_path / "w2", cache_dir=cache,
                                              say=said.append))
    assert not any("converting" in m for m in said)  # found, not converted again
    assert [(r, p.read_bytes()) for r, p in first.files] == \
        [(r, p.read_bytes()) for r, p in again.files]
    other = prepare(TINY_ONNX, PrepareOptions(work_dir=tmp_path / "w3", cache_dir=cache,
                                              variant="fp16"))
    assert other.source["cache_key"] != first.source["cache_key"]
    (Path(first.files[0][1])).write_bytes(b"tampered")  # a damaged entry is rebuilt
    fixed = prepare(TINY_ONNX, PrepareOptions(work_dir=tmp_path / "w4", cache_dir=cache))
    assert fixed.files[0][1].read_bytes() != b"tampered"


def test_redeploy_of_an_unchanged_onnx_sends_nothing(run_fleet, home: FleetHome,  # type: ignore[no-untyped-def]
                                                     tmp_path: Path) -> None:
    _enrolled_home(run_fleet, home, tmp_path)
    rows = []
    for _ in range(2):
        r = run_fleet("deploy", str(TINY_ONNX), "--device", "d1", "--json", "--iterations",
                      "2", "--warmup", "1")
        assert r.exit_code == 0, r.output
        rows.append(json.loads(r.stdout)["results"][0])
    assert rows[0]["status"] == "ok" and rows[0]["bytes_sent"] > 0
    assert rows[1]["status"] == "skipped" and rows[1]["bytes_sent"] == 0
    assert len(list(home.artifacts_dir.glob("tiny-*.fpkg"))) == 1  # tiny@1, built once
    # `fleet package` takes the same path: same payload, same version
    r = run_fleet("package", str(TINY_ONNX), "--for", "d1", "-o", str(tmp_path / "t.fpkg"),
                  "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert (doc["name"], doc["version"], doc["reused"]) == ("tiny", 1, True)


def test_an_input_shape_naming_no_input_is_refused_even_with_a_golden_file(
        tmp_path: Path) -> None:
    src = make_tiny_mnn(tmp_path / "m.mnn")
    sibling = REPO / "models" / "tiny" / "tiny.golden.npz"
    shutil.copyfile(sibling, tmp_path / "m.golden.npz")  # a golden file beside the model
    with pytest.raises(errors.UsageError, match="nosuch"):
        prepare(src, PrepareOptions(work_dir=tmp_path, input_shapes={"nosuch": (1, 3)}))
