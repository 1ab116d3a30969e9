"""The default model name of a source file or folder, and its variant suffix.

Why a rule of its own: the name is the identity of a model on every device (its slot
directory, its versions), so two different sources must never fall on one name. The old
rule dropped every character outside ``[A-Za-z0-9._-]`` and fell back to ``model``: two
Chinese file names, or ``face detect`` and ``face+detect``, became one model and the
second silently replaced the first.

The rule (``docs/package-format.md``, "Model names"):

1. Take the file or folder name; drop a model suffix (``.mnn``, ``.onnx``, ``.tflite``,
   ``.fpkg``), then one known variant suffix (``.fp32``, ``.fp16``, ``.wq8``, ``.wq4``,
   any case): ``mtcnn_onet.fp32.mnn`` is the model ``mtcnn_onet``, variant ``fp32``.
2. Normalise to Unicode NFC (the same text typed on Linux or macOS is one name).
3. Keep the result as it is when it is a valid name (:meth:`Manifest.valid_name`:
   Unicode letters, combining marks and digits, ``.``, ``_``, ``-``; starting with a
   letter or digit; 64 characters and 192 UTF-8 bytes at most). Otherwise refuse with
   :class:`UsageError` (exit 2) asking for ``--name``; nothing is dropped or folded, so
   the mapping is one-to-one: ``模型`` and ``人脸`` stay two models, ``face detect`` is
   refused rather than merged with ``face+detect``.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

from fleet.core import errors
from fleet.core.package.manifest import Manifest

__all__ = ["MODEL_SUFFIXES", "VARIANT_SUFFIXES", "check_name", "default_name", "split_name"]

MODEL_SUFFIXES = (".mnn", ".onnx", ".tflite", ".fpkg")
VARIANT_SUFFIXES = ("fp32", "fp16", "wq8", "wq4")


def split_name(source: Path) -> tuple[str, str | None]:
    """(stem without model and variant suffix, variant or None) of ``source``'s name."""
    stem = source.name
    for suffix in MODEL_SUFFIXES:
        if stem.lower().endswith(suffix) and len(stem) > len(suffix):
            stem = stem[: -len(suffix)]
            break
    head, dot, tail = stem.rpartition(".")
    if dot and head and tail.lower() in VARIANT_SUFFIXES:
        return head, tail.lower()
    return stem, None


def _why_not(name: str) -> str:
    bad = sorted({c for c in name
                  if not Manifest.valid_name(unicodedata.normalize("NFC", f"a{c}"))})
    if bad:
        return "it holds " + ", ".join(repr(c) for c in bad[:5])
    if not name or not Manifest.valid_name(name[0]):
        return "it must start with a letter or digit"
    return "it is too long (64 characters, 192 UTF-8 bytes at most)"


def check_name(name: str, *, source: Path | None = None) -> str:
    """``name`` in NFC if it is a valid model name; else UsageError saying why."""
    norm = unicodedata.normalize("NFC", name)
    if Manifest.valid_name(norm):
        return norm
    what = f"from {source.name!r}" if source is not None else f"{name!r}"
    if source is None:
        raise errors.UsageError(f"bad model name {name!r}: {_why_not(norm)} (letters, "
                                "digits, . _ - ; starting with a letter or digit)", name=name)
    raise errors.UsageError(f"cannot derive a model name {what}: {_why_not(norm)}; pass "
                            "--name (letters, digits, . _ -)", name=name, path=str(source))


def default_name(source: Path) -> tuple[str, str | None]:
    """(model name, variant from the file name) by the rule in the module docstring."""
    stem, variant = split_name(source)
    return check_name(stem, source=source), variant
