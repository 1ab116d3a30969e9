"""``fleet package MODEL --for GROUP|DEVICE... -o OUT.fpkg``: sign and encrypt a model.

MODEL is an ``.mnn`` file (validated by loading it with MNN), an ONNX/TFLite model
(converted and checked, ``--variant``), or a folder (an MNN-LLM export: every file in it,
``llm.mnn`` the entry). Recipients come from the registry: a ``--for`` value that names a
group means its members, anything else a device. The version defaults to one more than
the highest version of that name the registry has recorded (1 for a new name).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from fleet.artifacts import base_binding, build_package, load_signing_key, read_manifest
from fleet.artifacts.keys import public_pem
from fleet.cli._ctx import state
from fleet.cli._output import emit, err, table
from fleet.cli.app import app
from fleet.core import errors
from fleet.core.fsutil import sha256_file
from fleet.core.package import Recipient
from fleet.core.package.keyid import load_trusted_public_key
from fleet.registry import Device, Registry

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
_PROGRESS_MIN = 8 << 20  # show a bar for payloads from 8 MiB


def resolve_recipients(reg: Registry, targets: list[str]) -> list[Device]:
    """Group names mean their members; other names are devices. Unknown: NotFoundError."""
    groups = {g.name for g, _ in reg.list_groups()}
    devices = reg.resolve_targets(groups=[t for t in targets if t in groups],
                                  devices=[t for t in targets if t not in groups])
    if not devices:
        raise errors.UsageError(f"no devices in {', '.join(targets)}", targets=targets)
    missing = [d.name for d in devices if not d.public_key or not d.fingerprint]
    if missing:
        raise errors.KeyMaterialError(f"not enrolled (no device key): {', '.join(missing)}",
                                      devices=missing)
    return devices


def _folder_files(folder: Path) -> list[tuple[str, Path]]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if not files:
        raise errors.InvalidModelError(f"{folder} holds no files", path=str(folder))
    return [(p.relative_to(folder).as_posix(), p) for p in files]


def _pick_entry(files: list[tuple[str, Path]], entry: str | None) -> str:
    names = [rel for rel, _ in files]
    if entry is not None:
        if entry not in names:
            raise errors.UsageError(f"--entry {entry!r} is not in the model folder")
        return entry
    if "llm.mnn" in names:
        return "llm.mnn"
    mnn = [n for n in names if n.endswith(".mnn")]
    if len(mnn) != 1:
        raise errors.UsageError("cannot tell the main model file; pass --entry",
                                candidates=mnn)
    return mnn[0]


@contextmanager
def _byte_progress(total: int, label: str) -> Iterator[Callable[[int], None] | None]:
    if total < _PROGRESS_MIN:
        yield None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), console=err, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def _prepare(model: Path, work: Path, *, name: str, variant: str | None,
             golden: Path | None, entry: str | None) -> tuple[list[tuple[str, Path]], str,
                                                              str | None]:
    """(payload files, entry, golden file name) for what the operator gave."""
    suffix = model.suffix.lower()
    golden_name: str | None = None
    if model.is_dir():
        files = _folder_files(model)
        entry = _pick_entry(files, entry)
    elif suffix in (".onnx", ".tflite"):
        from fleet.artifacts.convert import convert_model
        from fleet.artifacts.reference import make_golden

        converted = work / f"{name}.mnn"
        err.print(f"converting {model.name} ({variant or 'fp32'})")
        convert_model(model, converted, variant=variant)
        gpath = work / "golden.npz"
        gpath.write_bytes(make_golden(model))
        files, entry, golden_name = [(converted.name, converted), ("golden.npz", gpath)], \
            converted.name, "golden.npz"
    elif suffix == ".mnn":
        if variant:
            raise errors.UsageError("--variant needs the original ONNX/TFLite model")
        files, entry = [(model.name, model)], model.name
    else:
        raise errors.InvalidModelError(
            f"{model.name}: expected an .mnn, .onnx or .tflite file or a model folder",
            path=str(model))
    if golden is not None:
        files = [f for f in files if f[0] != "golden.npz"] + [("golden.npz", golden)]
        golden_name = "golden.npz"
    return files, entry, golden_name


@app.command("package")
def package(
    model: Annotated[Path, typer.Argument(help=".mnn, .onnx, .tflite, or a model folder.")],
    targets: Annotated[list[str], typer.Option("--for", help="Group or device (repeat).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Package file to write.")],
    name: Annotated[str | None, typer.Option(help="Model name (default: file stem).")] = None,
    version: Annotated[int | None, typer.Option(help="Version (default: registry's + 1).")
                       ] = None,
    kind: Annotated[str, typer.Option(help="model or lora.")] = "model",
    base: Annotated[Path | None, typer.Option(help="lora: the base model's .fpkg.")] = None,
    golden: Annotated[Path | None, typer.Option(help="Reference inputs/outputs (.npz).")
                      ] = None,
    entry: Annotated[str | None, typer.Option(help="Main file of a model folder.")] = None,
    variant: Annotated[str | None, typer.Option(help="fp16, wq8 or wq4 (ONNX/TFLite).")
                       ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Validate MODEL with MNN, encrypt it for each target device, sign it."""
    from fleet.artifacts.mnninfo import inspect_llm_folder, is_llm_folder, validate_mnn
    from fleet.registry import history

    home = state().home
    if not model.exists():
        raise errors.ModelError(f"no model at {model}", path=str(model))
    if kind not in ("model", "lora"):
        raise errors.UsageError("--kind must be model or lora")
    if kind == "lora" and base is None:
        raise errors.UsageError("a LoRA package must name its base package (--base)")
    signing_key = load_signing_key(home)
    reg = Registry.open(home)
    try:
        devices = resolve_recipients(reg, targets)
        name = name or (model.name if model.is_dir() else model.stem)
        with tempfile.TemporaryDirectory(prefix="fleet-package-") as tmp:
            files, entry_name, golden_name = _prepare(model, Path(tmp), name=name,
                                                      variant=variant, golden=golden,
                                                      entry=entry)
            facts = (inspect_llm_folder(model) if model.is_dir() and is_llm_folder(model)
                     else validate_mnn(dict(files)[entry_name]))
            binding: dict[str, Any] | None = None
            if base is not None:
                pub = load_trusted_public_key(public_pem(signing_key.public_key()))
                binding = base_binding(read_manifest(base, pub))
            ver = version if version is not None else history.next_version(reg, name)
            recipients = [Recipient.from_pem(d.public_key or "", name=d.name,
                                             fingerprint=d.fingerprint) for d in devices]
            total = 2 * sum(p.stat().st_size for _, p in files)
            with _byte_progress(total, f"packaging {name} v{ver}") as progress:
                manifest = build_package(files, out, name=name, version=ver, kind=kind,
                                         recipients=recipients, signing_key=signing_key,
                                         entry=entry_name, mnn_facts=facts, base=binding,
                                         golden=golden_name, progress=progress)
        pkg_sha = sha256_file(out)
        history.record_artifact(reg, name=name, kind=kind, version=ver, digest=manifest.sha256,
                                package_sha256=pkg_sha, size=out.stat().st_size,
                                path=str(out.resolve()), manifest=manifest.to_dict())
    finally:
        reg.close()
    data = {"path": str(out), "name": name, "version": ver, "kind": kind,
            "sequence": manifest.sequence, "package_sha256": pkg_sha,
            "payload_sha256": manifest.sha256, "size": manifest.size,
            "files": [f.to_dict() for f in manifest.files], "entry": manifest.entry,
            "golden": manifest.golden, "mnn": facts, "base": binding,
            "recipients": [{"device": d.name, "fingerprint": d.fingerprint} for d in devices]}

    def render(c: Console) -> None:
        c.print(f"{out}: {name} v{ver} ({manifest.size} bytes, sha256 "
                f"{manifest.sha256[:16]}...) for {len(devices)} devices")
        c.print(table(None, ["device", "fingerprint"],
                      [(d.name, d.fingerprint) for d in devices]))

    emit(data, as_json=as_json, render=render)

