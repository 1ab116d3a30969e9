"""``fleet package MODEL -g G|-d D|-l SEL ... -o OUT.fpkg``: sign and encrypt a model.

MODEL is whatever ``fleet deploy`` accepts (one path: :mod:`fleet.artifacts.prepare`
then :mod:`fleet.artifacts.publish`): an ``.mnn``, an ONNX/TFLite model (converted and
checked, ``--variant``), an MNN-LLM folder, a folder with ``--entry``, or with ``--kind
lora --base BASE.fpkg`` a split LoRA. Recipients are the devices the target options
select (:mod:`fleet.cli._targets`); the older ``--for NAME`` (a group if one is so named,
else a device) still works and is hidden from the help. The default name follows
the rule in ``docs/package-format.md``; the version is the registry's for the same
payload, else one more than the highest of that name.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from fleet.cli._ctx import state
from fleet.cli._output import emit, err, human_bytes, table
from fleet.cli._targets import DeviceOpt, GroupOpt, SelectorOpt, Targets
from fleet.cli.app import app
from fleet.core import errors
from fleet.registry import Registry

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
InputShapeOpt = Annotated[list[str] | None, typer.Option(
    "--input-shape", help="NAME=D0,D1,.. for an input with dynamic dims (repeat).")]
InputsOpt = Annotated[Path | None, typer.Option(
    "--inputs", help="Sample inputs (.npz) for the conversion check and the golden data.")]
_PROGRESS_MIN = 8 << 20  # show a bar for payloads from 8 MiB


@contextmanager
def _byte_progress(total: int, label: str) -> Iterator[Callable[[int], None] | None]:
    from fleet.cli._progress import byte_progress  # binary units, no "?" for unknowns

    with byte_progress(total, label, minimum=_PROGRESS_MIN) as advance:
        yield advance


@app.command("package")
def package(
    model: Annotated[Path, typer.Argument(help=".mnn, .onnx, .tflite, or a model folder.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Package file to write.")],
    group: GroupOpt = [],  # noqa: B006 (typer reads the default)
    device: DeviceOpt = [],  # noqa: B006
    selector: SelectorOpt = [],  # noqa: B006
    for_: Annotated[list[str], typer.Option(
        "--for", hidden=True, help="Deprecated: a group or device (use -g/-d).")] = [],  # noqa: B006
    name: Annotated[str | None, typer.Option(
        help="Model name (default: from the file name, see docs/package-format.md).")
                    ] = None,
    version: Annotated[int | None, typer.Option(min=1,
                                                help="Version (default: registry's + 1).")
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
    """Validate MODEL, encrypt it for each target device, sign it.

    Examples:

    \b
      fleet package model.onnx -g phones -o model.fpkg --variant fp16
      fleet package models/tiny/tiny.mnn -d pixel7 -o tiny.fpkg --json
    """
    from fleet.cli.cmd_deploy import check_variant

    tg = Targets.parse(group, device, selector, either=for_)
    check_variant(variant)
    if kind not in ("model", "lora"):
        raise errors.UsageError(f"--kind {kind!r}: model or lora")
    from fleet.artifacts import load_signing_key, read_manifest
    from fleet.artifacts.inputs import parse_input_shapes
    from fleet.artifacts.keys import public_pem
    from fleet.artifacts.prepare import PrepareOptions, prepare
    from fleet.artifacts.publish import build, prepared_cache_dir
    from fleet.artifacts.recipients import require_enrolled
    from fleet.core.package.keyid import load_trusted_public_key

    home = state().home
    base_m = None
    if base is not None:
        pub = load_trusted_public_key(public_pem(load_signing_key(home).public_key()))
        base_m = read_manifest(base, pub)
    reg = Registry.open(home)
    try:
        devices = tg.resolve(reg)
        require_enrolled(devices)
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
            from fleet.artifacts.envelopes import copy_package
            copy_package(built.path, out)  # and its key envelopes, OUT.envelopes
    finally:
        reg.close()
    m = built.manifest
    data: dict[str, Any] = {"path": str(out), "name": built.name, "version": built.version,
            "kind": built.kind, "sequence": m.get("sequence"),
            "package_sha256": built.package_sha256, "payload_sha256": built.digest,
            "size": (m.get("payload") or {}).get("size"), "files": m.get("files"),
            "entry": m.get("entry"), "golden": m.get("golden"), "mnn": m.get("mnn"),
            "base": m.get("base"), "variant": payload.variant, "reused": built.reused,
            "recipients": [{"device": d.name, "fingerprint": d.fingerprint}
                           for d in devices]}

    def render(c: Console) -> None:
        c.print(f"{out}: {built.name} v{built.version} ({human_bytes(data['size'])}, sha256 "
                f"{built.digest[:16]}...) for {len(devices)} devices")
        c.print(table(None, ["device", "fingerprint"],
                      [(d.name, d.fingerprint) for d in devices]))

    emit(data, as_json=as_json, render=render)

