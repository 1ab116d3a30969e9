"""One packaging path, step 1: whatever the operator gave, as a payload spec.

``prepare(source, options)`` accepts an ``.mnn`` (validated by loading it), an ``.onnx`` or
``.tflite`` (converted by :mod:`.convert`, checked, optionally as a ``--variant``; golden
data from the ORIGINAL model by :mod:`.reference`), an MNN-LLM export folder (checked
against its config), a folder with ``--entry``, or a split LoRA adapter (``kind="lora"``,
checked against its base's export). It returns a :class:`PreparedPayload`: the payload
files, name, kind, variant, entry, golden/reference file, input specs and the facts the
manifest records. Step 2, signing and encrypting for recipients, is :mod:`.publish`.
``fleet package``, ``fleet deploy`` and ``fleet lora package`` all go through both, so
what one accepts the others accept.

Nothing here reads a symbolic link (:mod:`.sources`), and a converted payload is kept in
the prepared cache (:mod:`.prepcache`) so the same source, options and MNN version give
the same bytes, the same digest and so the same version.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet.artifacts import names, prepcache, sources
from fleet.artifacts.build import base_binding
from fleet.core import errors
from fleet.core.fsutil import sha256_file
from fleet.core.lora_reference import LORA_FILE, REFERENCE_FILE, Reference
from fleet.core.package.manifest import Manifest

__all__ = ["GOLDEN_FILE", "LLM_REFERENCE_FILE", "PrepareOptions", "PreparedPayload",
           "prepare"]

GOLDEN_FILE = "golden.npz"
LLM_REFERENCE_FILE = "reference.json"
_CONVERTED = (".onnx", ".tflite")


@dataclass(frozen=True)
class PrepareOptions:
    """What the operator asked for. ``work_dir`` holds files made for this run (the
    caller removes it after the build); ``cache_dir`` keeps converted payloads."""

    work_dir: Path
    name: str | None = None
    kind: str = "model"  #: model | lora
    variant: str | None = None  #: fp32 | fp16 | wq8 | wq4 (ONNX/TFLite only)
    golden: Path | None = None  #: golden .npz (models) or reference .json (LLM folders)
    reference: Path | None = None  #: LoRA reference outputs (.json)
    entry: str | None = None  #: main file of a plain model folder
    input_shapes: Mapping[str, Sequence[int]] | None = None  #: NAME -> dims
    inputs: Path | None = None  #: sample inputs .npz (checked to be a regular file)
    base: Manifest | None = None  #: LoRA: the base package's manifest
    cache_dir: Path | None = None
    say: Callable[[str], None] = field(default=lambda _m: None)


@dataclass(frozen=True)
class PreparedPayload:
    """A payload ready to be signed and encrypted (files are read by the build step)."""

    name: str
    kind: str
    files: tuple[tuple[str, Path], ...]  #: (payload path, local file), in payload order
    entry: str
    facts: dict[str, Any]  #: the manifest's ``mnn`` facts
    golden: str | None = None  #: payload path of the golden/reference file
    variant: str | None = None
    input_spec: dict[str, Any] | None = None  #: ``{name: {"shape": [...]}}``
    base: dict[str, Any] | None = None  #: LoRA: binding to the base export
    source: dict[str, Any] = field(default_factory=dict)  #: kind, name, sha256, cache key

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for _, p in self.files)


def _input_spec(options: PrepareOptions) -> dict[str, Any] | None:
    if not options.input_shapes:
        return None
    return {k: {"shape": [int(d) for d in v]} for k, v in sorted(options.input_shapes.items())}


def _shapes(options: PrepareOptions) -> dict[str, list[int]] | None:
    spec = _input_spec(options)
    return {k: v["shape"] for k, v in spec.items()} if spec else None


def _name(source: Path, options: PrepareOptions) -> tuple[str, str | None]:
    if options.name is not None:
        return names.check_name(options.name), names.split_name(source)[1]
    return names.default_name(source)


def prepare(source: Path, options: PrepareOptions) -> PreparedPayload:
    """The payload spec for ``source`` (see the module docstring).

    Raises ModelError (no such source), InvalidModelError (exit 9: not a model MNN loads, a
    link, an incomplete LLM folder, no LoRA layers), ConversionError (exit 10),
    UsageError (exit 2: bad name, option that does not apply), BaseMismatchError."""
    if os.path.islink(source):
        sources.regular_file(source, "model")  # raises: links are never followed
    if not source.exists():
        raise errors.ModelError(f"no model at {source}", path=str(source))
    if options.kind not in ("model", "lora"):
        raise errors.UsageError("--kind must be model or lora", kind=options.kind)
    if options.inputs is not None:
        sources.reference_file(options.inputs, "--inputs")
    name, file_variant = _name(source, options)
    if options.kind == "lora":
        return _lora(source, name, options)
    if source.is_dir():
        if options.variant:
            raise errors.UsageError("--variant applies to ONNX/TFLite models, not a folder")
        if options.entry is None and sources.is_llm_folder(source):
            return _llm_folder(source, name, options)
        return _plain_folder(source, name, options)
    suffix = source.suffix.lower()
    sources.regular_file(source, "model")
    if suffix in _CONVERTED:
        return _converted(source, name, options)
    if suffix == ".mnn":
        if options.variant:
            raise errors.UsageError("--variant needs the original ONNX/TFLite model, not an "
                                    ".mnn", variant=options.variant)
        return _mnn(source, name, file_variant, options)
    if suffix == ".fpkg":
        raise errors.UsageError(f"{source.name} is a built package: deploy it as it is, or "
                                "package the model it was made from")
    raise errors.InvalidModelError(
        f"{source.name}: expected an .mnn, .onnx or .tflite file or a model folder",
        path=str(source))


def _golden_given(options: PrepareOptions) -> Path | None:
    return sources.reference_file(options.golden, "--golden") if options.golden else None


def _mnn(source: Path, name: str, variant: str | None, options: PrepareOptions
         ) -> PreparedPayload:
    from fleet.artifacts.mnninfo import validate_mnn

    facts = dict(validate_mnn(source))
    golden = _golden_given(options)
    sibling = source.with_name(source.stem + ".golden.npz")
    if golden is None and os.path.lexists(sibling):
        golden = sources.reference_file(sibling, "golden file")
        options.say(f"using golden reference {sibling.name}")
    if golden is not None and options.input_shapes:
        # the golden file's inputs are what the device is fed; the shapes given must still
        # name this model's inputs and fit them (UsageError, exit 2), never pass unread
        from fleet.artifacts.reference import resolve_input_shapes

        resolve_input_shapes(source, options.input_shapes)
    if golden is None and (options.inputs is not None or options.input_shapes):
        from fleet.artifacts.inputs import load_inputs_npz
        from fleet.artifacts.reference import make_golden

        options.say("golden reference from the model on the inputs given")
        golden = options.work_dir / GOLDEN_FILE
        golden.write_bytes(make_golden(
            source, input_shapes=_shapes(options),
            inputs=load_inputs_npz(options.inputs) if options.inputs else None))
    elif golden is None:  # a dynamic dim without --input-shape: exit 9 here, not on devices
        from fleet.artifacts.reference import resolve_input_shapes

        resolve_input_shapes(source)
    files: list[tuple[str, Path]] = [(f"{name}.mnn", source)]
    if golden is not None:
        files.append((GOLDEN_FILE, golden))
    if variant:
        facts["variant"] = variant
    return PreparedPayload(name=name, kind="model", files=tuple(files), entry=f"{name}.mnn",
                           facts=facts, golden=GOLDEN_FILE if golden else None,
                           variant=variant, input_spec=_input_spec(options),
                           source={"kind": "mnn", "name": source.name})


def _converted(source: Path, name: str, options: PrepareOptions) -> PreparedPayload:
    """ONNX/TFLite: convert once per (source, options, MNN version); reuse after."""
    spec = _input_spec(options)
    golden = _golden_given(options)
    model_file = f"{name}.mnn"
    key = prepcache.cache_key({
        "source_sha256": sha256_file(source), "format": source.suffix.lower(),
        "name": name, "variant": options.variant, "input_spec": spec,
        "golden_sha256": sha256_file(golden) if golden else None,
        "inputs_sha256": sha256_file(options.inputs) if options.inputs else None})
    hit = prepcache.load_entry(options.cache_dir, key) if options.cache_dir else None
    if hit is not None:
        folder, meta = hit
        options.say(f"using {source.name} as converted before ({options.variant or 'fp32'}, "
                    f"{prepcache.converter_version()})")
    else:
        folder, meta = _convert_fresh(source, name, golden, spec, options)
        if options.cache_dir is not None:
            folder = prepcache.store_entry(options.cache_dir, key,
                                           {rel: folder / rel for rel in meta["payload"]},
                                           meta)
    files = tuple((rel, folder / rel) for rel in meta["payload"])
    return PreparedPayload(name=name, kind="model", files=files, entry=model_file,
                           facts=meta["facts"], golden=meta["golden"],
                           variant=options.variant, input_spec=spec,
                           source={"kind": source.suffix.lower().lstrip("."),
                                   "name": source.name, "cache_key": key})


def _convert_fresh(source: Path, name: str, golden: Path | None,
                   spec: dict[str, Any] | None, options: PrepareOptions
                   ) -> tuple[Path, dict[str, Any]]:
    from fleet.artifacts.convert import convert_model
    from fleet.artifacts.inputs import load_inputs_npz
    from fleet.artifacts.mnninfo import validate_mnn

    out = options.work_dir / "converted"
    out.mkdir(parents=True, exist_ok=True)
    model = out / f"{name}.mnn"
    options.say(f"converting {source.name} ({options.variant or 'fp32'})")
    samples = load_inputs_npz(options.inputs) if options.inputs else None
    result = convert_model(source, model, variant=options.variant, input_spec=spec,
                           inputs=samples)
    gpath = out / GOLDEN_FILE
    if golden is not None:
        gpath.write_bytes(golden.read_bytes())
    else:  # the conversion check's reference run: the original model runs once per input
        assert result.golden is not None
        gpath.write_bytes(result.golden)
    facts = dict(validate_mnn(model))
    if options.variant:
        facts["variant"] = options.variant
    return out, {"payload": [model.name, GOLDEN_FILE], "golden": GOLDEN_FILE,
                 "facts": facts}


def _plain_folder(folder: Path, name: str, options: PrepareOptions) -> PreparedPayload:
    from fleet.artifacts.mnninfo import validate_mnn

    files = sources.folder_files(folder)
    entry = _pick_entry(files, options.entry)
    facts = dict(validate_mnn(dict(files)[entry]))
    golden = _golden_given(options)
    golden_name = None
    if golden is not None:
        files = [f for f in files if f[0] != GOLDEN_FILE] + [(GOLDEN_FILE, golden)]
        golden_name = GOLDEN_FILE
    return PreparedPayload(name=name, kind="model", files=tuple(files), entry=entry,
                           facts=facts, golden=golden_name, input_spec=_input_spec(options),
                           source={"kind": "folder", "name": folder.name})


def _pick_entry(files: list[tuple[str, Path]], entry: str | None) -> str:
    names_ = [rel for rel, _ in files]
    if entry is not None:
        if entry not in names_:
            raise errors.UsageError(f"--entry {entry!r} is not in the model folder")
        return entry
    mnn = [n for n in names_ if n.endswith(".mnn")]
    if len(mnn) != 1:
        raise errors.UsageError("cannot tell the main model file; pass --entry",
                                candidates=mnn)
    return mnn[0]


def _llm_folder(folder: Path, name: str, options: PrepareOptions) -> PreparedPayload:
    """Every file of the export, checked against its config, plus its reference outputs
    (``--golden``, else ``<folder>.ref.json`` beside it)."""
    from fleet.artifacts.mnninfo import inspect_llm_folder

    files = sources.folder_files(folder)
    nested = [rel for rel, _ in files if "/" in rel]
    if nested:
        raise errors.InvalidModelError(f"{folder}: nested folders are not supported in an "
                                       f"MNN-LLM package ({nested[0]})", path=str(folder))
    config = sources.check_llm_folder(folder, files)
    facts = dict(inspect_llm_folder(folder))
    ref = _golden_given(options) or (sources.reference_file(options.reference, "--reference")
                                     if options.reference else None)
    sibling = folder.with_name(folder.name + ".ref.json")
    if ref is None and os.path.lexists(sibling):
        ref = sources.reference_file(sibling, "reference file")
        options.say(f"using reference outputs {sibling.name}")
    golden_name = None
    if ref is not None:
        files.append((LLM_REFERENCE_FILE, ref))
        golden_name = LLM_REFERENCE_FILE
    return PreparedPayload(name=name, kind="model", files=tuple(files),
                           entry=str(config.get("llm_model", "llm.mnn")), facts=facts,
                           golden=golden_name, source={"kind": "mnn-llm",
                                                       "name": folder.name})


def _lora(lora: Path, name: str, options: PrepareOptions) -> PreparedPayload:
    """A split LoRA bound to ``options.base``, with its reference outputs."""
    from fleet.artifacts.lora_export import check_export, lora_facts

    sources.regular_file(lora, "LoRA file")
    if options.base is None:
        raise errors.UsageError("a LoRA package must name its base package (--base)")
    binding = base_binding(options.base)
    if not binding.get("llm_weight_sha256"):
        raise errors.InvalidModelError(f"base {options.base.name} v{options.base.version} "
                                       "has no llm.mnn.weight: not an MNN-LLM export")
    facts = lora_facts(lora)
    ref_doc: dict[str, Any] = {}
    if options.reference is not None:
        raw = sources.reference_file(options.reference, "--reference").read_text()
        try:
            ref_doc = Reference.from_dict(json.loads(raw)).to_dict()
        except ValueError as exc:
            raise errors.InvalidModelError(f"{options.reference}: not JSON ({exc})") from exc
    check_export(options.base.mnn, facts, ref_doc)
    files: list[tuple[str, Path]] = [(LORA_FILE, lora)]
    golden = None
    if ref_doc:
        rp = options.work_dir / REFERENCE_FILE
        rp.write_text(json.dumps(ref_doc, sort_keys=True))
        files.append((REFERENCE_FILE, rp))
        golden = REFERENCE_FILE
    return PreparedPayload(name=name, kind="lora", files=tuple(files), entry=LORA_FILE,
                           facts=facts, golden=golden, base=binding,
                           source={"kind": "lora", "name": lora.name})
