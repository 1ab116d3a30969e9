"""Reading what the operator gave without following links, and checking MNN-LLM folders.

Why: a model folder or a golden file can come from an untrusted place (a hub tarball). A
symbolic link inside it (``NOTICE.txt -> ~/.fleet/keys/signing_key.pem``) would make the
controller encrypt its own secret for every device. So every file read to build a package
is a regular file reached without a link, inside the folder it was named in; anything
else is :class:`~fleet.core.errors.UnsafeFileError` (exit 9). Golden, reference and
``--inputs`` files are also size-checked by ``lstat`` before anything reads them
(:func:`reference_file`), so an oversized file is refused before it is read or sent.

An MNN-LLM folder is checked against its ``config.json`` (``llm_config.json`` merged over
it, as MNN-LLM does) before anything is packaged, so a folder missing its weights fails on
the controller with the file named, not on every device with "no candidate reproduced the
reference outputs". The rules are in ``docs/package-format.md`` ("MNN-LLM folders").
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from fleet.core import errors
from fleet.core.limits import MAX_GOLDEN_BYTES

__all__ = ["LLM_FILE_KEYS", "check_llm_folder", "folder_files", "is_llm_folder",
           "llm_config", "reference_file", "regular_file"]

#: config keys naming a file, with MNN-LLM's default when the key is absent (None: the
#: file is needed only when the key is given). Any other top-level key ending in
#: ``_model``, ``_weight`` or ``_file`` with a string value names a file too.
LLM_FILE_KEYS: dict[str, str | None] = {
    "llm_model": "llm.mnn", "llm_weight": "llm.mnn.weight",
    "tokenizer_file": "tokenizer.txt", "embedding_file": "embeddings_bf16.bin",
    "visual_model": None, "audio_model": None,
}
_FILE_KEY_ENDINGS = ("_model", "_weight", "_file")


def regular_file(path: Path, what: str, *, max_bytes: int | None = None) -> Path:
    """``path`` if it is a regular file that is not a symbolic link (and, with
    ``max_bytes``, not larger: checked by ``lstat`` before anything reads it); else
    :class:`UnsafeFileError` (exit 9)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError as exc:
        raise errors.ModelError(f"{what}: no file at {path}", path=str(path)) from exc
    if stat.S_ISLNK(st.st_mode):
        raise errors.UnsafeFileError(
            f"{what} {path} is a symbolic link: packaging never follows links; pass the "
            "file it points to", path=str(path), reason="symlink")
    if not stat.S_ISREG(st.st_mode):
        raise errors.UnsafeFileError(f"{what} {path} is not a regular file", path=str(path),
                                     reason="not_regular")
    if max_bytes is not None and st.st_size > max_bytes:
        raise errors.UnsafeFileError(
            f"{what} {path} is {st.st_size} bytes, more than the {max_bytes} a device "
            "accepts; refused before reading it", path=str(path), reason="too_large",
            size=st.st_size, limit=max_bytes)
    return path


def reference_file(path: Path, what: str) -> Path:
    """A golden / reference / inputs file: :func:`regular_file` within
    :data:`~fleet.core.limits.MAX_GOLDEN_BYTES` (the device's own cap)."""
    return regular_file(path, what, max_bytes=MAX_GOLDEN_BYTES)


def folder_files(folder: Path) -> list[tuple[str, Path]]:
    """(payload path, file) of every file under ``folder``, sorted; links refused (exit 9).

    Raises InvalidModelError for a link (file or folder), a special file, or an empty
    folder."""
    if os.path.islink(folder):
        raise errors.UnsafeFileError(f"model folder {folder} is a symbolic link; pass the "
                                     "folder it points to", path=str(folder),
                                     reason="symlink")
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for d in dirnames:
            if os.path.islink(os.path.join(dirpath, d)):
                raise errors.UnsafeFileError(
                    f"{Path(dirpath, d)} is a symbolic link: a model folder may hold only "
                    "regular files", path=str(Path(dirpath, d)), reason="symlink")
        for f in filenames:
            p = Path(dirpath, f)
            regular_file(p, "model folder file")
            out.append((p.relative_to(folder).as_posix(), p))
    if not out:
        raise errors.InvalidModelError(f"{folder} holds no files", path=str(folder))
    return sorted(out)


def _load_json(path: Path) -> dict[str, Any]:
    regular_file(path, "MNN-LLM config")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.InvalidModelError(f"{path}: not JSON ({exc})", path=str(path)) from exc
    if not isinstance(doc, dict):
        raise errors.InvalidModelError(f"{path}: not a JSON object", path=str(path))
    return doc


def is_llm_folder(folder: Path) -> bool:
    """An MNN-LLM export: a folder with ``config.json`` (or ``llm_config.json``)."""
    return folder.is_dir() and ((folder / "config.json").exists()
                                or (folder / "llm_config.json").exists())


def llm_config(folder: Path) -> dict[str, Any]:
    """``config.json`` with ``llm_config.json`` merged over it (MNN-LLM's order)."""
    merged: dict[str, Any] = {}
    for name in ("config.json", "llm_config.json"):
        if os.path.lexists(folder / name):
            merged.update(_load_json(folder / name))
    return merged


def _referenced(config: dict[str, Any]) -> dict[str, str]:
    """config key -> file name, for every file the config makes MNN-LLM open."""
    refs: dict[str, str] = {}
    for key, default in LLM_FILE_KEYS.items():
        value = config.get(key, default)
        if key == "embedding_file" and key not in config and config.get("tie_embeddings"):
            continue  # tied embeddings are read from llm_weight
        if value is not None:
            refs[key] = value
    for key, value in config.items():
        if key not in refs and key.endswith(_FILE_KEY_ENDINGS) and isinstance(value, str):
            refs[key] = value
    return refs


def check_llm_folder(folder: Path, files: list[tuple[str, Path]]) -> dict[str, Any]:
    """Check an MNN-LLM folder against its config; return the merged config.

    Every file the config names (``llm_model``, ``llm_weight``, ``tokenizer_file``,
    ``embedding_file``, ``visual_model``, ...) must be a non-empty regular file inside the
    folder. Raises InvalidModelError (exit 9) naming the first key and file that fail."""
    config = llm_config(folder)
    have = {rel: p for rel, p in files}
    for key, value in _referenced(config).items():
        if not isinstance(value, str) or not value:
            raise errors.InvalidModelError(f"{folder.name}: {key} in config is not a file "
                                           "name", key=key)
        rel = PurePosixPath(value)
        if rel.is_absolute() or ".." in rel.parts or "\\" in value:
            raise errors.InvalidModelError(
                f"{folder.name}: {key} = {value!r} points outside the model folder",
                key=key, file=value)
        name = rel.as_posix()
        if name not in have:
            raise errors.InvalidModelError(
                f"{folder.name}: {name} is missing (named by {key} in the config); the "
                "folder is not a complete MNN-LLM export", key=key, file=name,
                path=str(folder))
        if have[name].stat().st_size == 0:
            raise errors.InvalidModelError(f"{folder.name}: {name} ({key}) is empty",
                                           key=key, file=name, path=str(folder))
    return config
