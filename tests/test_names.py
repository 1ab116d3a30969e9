"""Default model names (case ``unicode-name-collision``): one-to-one, variant suffixes
dropped, refused with "pass --name" when a name cannot be kept as it is."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest

from fleet.artifacts.names import check_name, default_name, split_name
from fleet.core import errors
from fleet.core.package.manifest import Manifest


@pytest.mark.parametrize(("file", "name", "variant"), [
    ("模型.mnn", "模型", None), ("人脸.mnn", "人脸", None),
    ("mtcnn_onet.fp32.mnn", "mtcnn_onet", "fp32"), ("net.FP16.mnn", "net", "fp16"),
    ("det.wq4.onnx", "det", "wq4"), ("m.wq8.tflite", "m", "wq8"),
    ("mobilenet-v2.mnn", "mobilenet-v2", None), ("qwen-0.5b", "qwen-0.5b", None),
    ("llm.fp16", "llm", "fp16"), ("Ελληνικά.onnx", "Ελληνικά", None),
    ("हिन्दी.mnn", "हिन्दी", None), ("fp16.mnn", "fp16", None),
])
def test_default_name_keeps_the_stem_and_drops_a_variant(file: str, name: str,
                                                         variant: str | None) -> None:
    assert default_name(Path("/x") / file) == (name, variant)


def test_different_stems_never_share_a_name() -> None:
    stems = ["模型", "人脸", "model", "Model", "ｍodel", "face-detect", "face_detect",
             "face.detect", "net", "café"]
    got = [default_name(Path(f"{s}.mnn"))[0] for s in stems]
    assert len(set(got)) == len(stems)


@pytest.mark.parametrize("file", ["face detect.mnn", "face+detect.mnn", "+++.mnn",
                                  "_hidden.mnn", "a\u202eb.mnn", "x" * 65 + ".mnn",
                                  "\U00020000" * 49 + ".mnn", "😀.mnn"])
def test_unusable_names_ask_for_name(file: str) -> None:
    with pytest.raises(errors.UsageError) as info:
        default_name(Path(file))
    assert type(info.value) is errors.UsageError and "--name" in info.value.message


def test_nfc_spellings_are_one_name_and_explicit_names_are_checked() -> None:
    decomposed = unicodedata.normalize("NFD", "café")
    assert default_name(Path(f"{decomposed}.mnn"))[0] == "café"
    assert check_name(decomposed) == "café"
    with pytest.raises(errors.UsageError):
        check_name("a/b")
    assert split_name(Path("x.fpkg")) == ("x", None)


def test_manifest_name_rule_is_a_full_match() -> None:
    assert Manifest.valid_name("模型") and Manifest.valid_name("हिन्दी")
    for bad in ("m\n", "m ", "", ".m", "-m", "m/x", unicodedata.normalize("NFD", "café"),
                "a" * 65, None, 3):
        assert not Manifest.valid_name(bad), repr(bad)
