"""``fleet package MODEL --for GROUP|DEVICE... -o OUT.fpkg``: sign and encrypt a model.

MODEL is whatever ``fleet deploy`` accepts (one path: :mod:`fleet.artifacts.prepare`
then :mod:`fleet.artifacts.publish`): an ``.mnn``, an ONNX/TFLite model (converted and
checked, ``--variant``), an MNN-LLM folder, a folder with ``--entry``, or with ``--kind
lora --base BASE.fpkg`` a split LoRA. Recipients come from the registry: a ``--for`` value
that names a group means its members, anything else a device. The default name follows
the rule in ``docs/package-format.md``; the version is the registry's for the same
payload, else one more than the highest of that name.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from fleet.cli._ctx import state
from fleet.cli._output import emit, err, table
from fleet.cli.app import app
from fleet.registry import Registry

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
InputShapeOpt = Annotated[list[str] | None, typer.Option(
    "--input-shape", help="NAME=D0,D1,.. for an input with dynamic dims (repeat).")]
InputsOpt = Annotated[Path | None, typer.Option(
    "--inputs", help="Sample inputs (.npz) for the conversion check and the golden data.")]
_PROGRESS_MIN = 8 << 20  # show a bar for payloads from 8 MiB


@contextmanager
def _byte_progress(total: int, label: str) -> Iterator[Callable[[int], None] | None]:
    if total < _PROGRESS_MIN:
        yield None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), console=err, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


@app.command("package")
def package(
    model: Annotated[Path, typer.Argument(help=".mnn, .onnx, .tflite, or a model folder.")],
    targets: Annotated[list[str], typer.Option("--for", help="Group or device (repeat).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Package file to write.")],
    name: Annotated[str | None, typer.Option(
        help="Model name (default: from the file name, see docs/package-format.md).")
                    ] = None,
    version: Annotated[int | None, typer.Option(help="Version (default: registry's + 1).")
                       ] = None,
    kind: Annotated[str, typer.Option(help="model or lora.")] = "model",
    base: Annotated[Path | None, typer.Option(help="lora: the base model's .fpkg.")] = None,
    golden: Annotated[Path | None, typer.Option(help="Reference inputs/outputs (.npz).")
                      ] = None,
    entry: Annotated[str | None, typer.Option(help="Main file of a model folder.")] = None,
    variant: Annotated[str | None, typer.Option(help="fp16, wq8 or wq4 (ONNX/TFLite).")
                       ] = None,
    input_shape: InputShapeOpt = None,
    inputs: InputsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Validate MODEL, encrypt it for each target device, sign it."""
    from fleet.artifacts import load_signing_key, read_manifest
    from fleet.artifacts.inputs import parse_input_shapes
    from fleet.artifacts.keys import public_pem
    from fleet.artifacts.prepare import PrepareOptions, prepare
    from fleet.artifacts.publish import build, prepared_cache_dir
    from fleet.artifacts.recipients import resolve_recipients
    from fleet.core.package.keyid import load_trusted_public_key

    home = state().home
    base_m = None
    if base is not None:
        pub = load_trusted_public_key(public_pem(load_signing_key(home).public_key()))
        base_m = read_manifest(base, pub)
    reg = Registry.open(home)
    try:
        devices = resolve_recipients(reg, targets)
        with tempfile.TemporaryDirectory(prefix="fleet-package-") as tmp:
            payload = prepare(model, PrepareOptions(
                work_dir=Path(tmp), name=name, kind=kind, variant=variant, golden=golden,
                entry=entry, base=base_m, inputs=inputs,
                input_shapes=parse_input_shapes(input_shape or []) or None,
                reference=golden if kind == "lora" else None,
                cache_dir=prepared_cache_dir(home),
                say=lambda m: err.print(m, highlight=False)))
            with _byte_progress(2 * payload.size, f"packaging {payload.name}") as progress:
                built = build(home, reg, payload, devices, version=version,
                              exact_recipients=True, progress=progress,
                              say=lambda m: err.print(m, highlight=False))
        if out.resolve() != built.path.resolve():
            tmp_out = out.with_name(f".{out.name}.tmp")
            shutil.copyfile(built.path, tmp_out)
            tmp_out.replace(out)
    finally:
        reg.close()
    m = built.manifest
    data = {"path": str(out), "name": built.name, "version": built.version,
            "kind": built.kind, "sequence": m.get("sequence"),
            "package_sha256": built.package_sha256, "payload_sha256": built.digest,
            "size": (m.get("payload") or {}).get("size"), "files": m.get("files"),
            "entry": m.get("entry"), "golden": m.get("golden"), "mnn": m.get("mnn"),
            "base": m.get("base"), "variant": payload.variant, "reused": built.reused,
            "recipients": [{"device": d.name, "fingerprint": d.fingerprint}
                           for d in devices]}

    def render(c: Console) -> None:
        c.print(f"{out}: {built.name} v{built.version} ({data['size']} bytes, sha256 "
                f"{built.digest[:16]}...) for {len(devices)} devices")
        c.print(table(None, ["device", "fingerprint"],
                      [(d.name, d.fingerprint) for d in devices]))

    emit(data, as_json=as_json, render=render)

