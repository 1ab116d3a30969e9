"""Device-side LoRA logic: reference checks, base binding, memory-only model folders, the
serve state file, and the ``lora add|swap|remove|list`` agent verbs.

Why each piece exists (FIELD-NOTES, "LoRA on MNN-LLM"):

- A split LoRA (``lora.mnn``) reads the base's ``llm.mnn.weight`` by byte offset. MNN checks
  nothing: a LoRA made for another base export loads and produces garbage (or crashes), so
  the pack's binding (base digests, quantization) is compared with the loaded base first.
- A known exporter bug silently drops part of an adapter, so every adapter must reproduce
  the reference outputs it carries (prompt ids -> expected greedy ids) before it serves.
- A failed ``create_lora`` returns an object that segfaults on first use; the only signal
  is a log line on the native stdout, so creation runs under an fd capture.
- MNN-LLM opens its files by path, relative to the folder of ``config.json`` (absolute
  names are prefixed with that folder too). :class:`LinkDir` is a private folder of
  symbolic links to ``/proc/self/fd/N`` (the decrypted memfds): MNN reads the plaintext
  from memory, and the folder holds links, never model bytes.

The agent verbs are thin: ``lora add`` stages a pack in the store (signature, recipient,
version and base binding checked there); ``swap``/``remove``/``list`` talk to the local
serve daemon over its socket (:mod:`fleet_agent.serve_protocol`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fleet.core import errors
from fleet_agent.context import AgentContext

__all__ = [
    "LLM_CONFIG_FILES",
    "MEMORY_ONLY",
    "REFERENCE_FILE",
    "REFERENCE_SCHEMA",
    "LinkDir",
    "Reference",
    "check_binding",
    "check_reference",
    "dir_base_facts",
    "lora_add",
    "lora_list",
    "lora_remove",
    "lora_swap",
    "memory_only_config",
    "read_json",
    "serve_socket",
    "serve_state_file",
    "write_json_atomic",
]

from fleet.core.lora_reference import REFERENCE_FILE, REFERENCE_SCHEMA, Reference


def check_reference(generate: Callable[[list[int], int], list[int]], ref: Reference, *,
                    adapter: str) -> dict[str, Any]:
    """Run every reference prompt through ``generate``; ReferenceMismatchError at the first
    prompt whose greedy tokens differ. ``generate`` must start from a clean context."""
    for i, (prompt, want) in enumerate(zip(ref.prompts, ref.expected, strict=True)):
        got = [int(t) for t in generate(list(prompt), ref.max_new_tokens)]
        if got != list(want):
            first = next((k for k, (a, b) in enumerate(zip(got, want, strict=False))
                          if a != b), min(len(got), len(want)))
            raise errors.ReferenceMismatchError(
                f"adapter {adapter} does not reproduce its reference outputs (prompt {i}, "
                f"token {first}); the adapter export is broken or not for this base",
                adapter=adapter, prompt=i, first_mismatch=first, expected=list(want),
                got=got)
    return {"prompts": len(ref.prompts), "tokens": len(ref.prompts) * ref.max_new_tokens}


# -- base binding ------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dir_base_facts(model_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The binding facts of a plain model folder (``--model-dir``): digests of the files
    ``config.json`` names, and the weight quantization read from ``llm.mnn``."""
    from fleet.core.mnn.weights import inspect_weights

    model = model_dir / str(config.get("llm_model", "llm.mnn"))
    weight = model_dir / str(config.get("llm_weight", "llm.mnn.weight"))
    info = inspect_weights(model)
    bits, blocks = info.get("bits") or [], info.get("blocks") or []
    return {"name": model_dir.name, "version": None, "llm_mnn_sha256": _sha256(model),
            "llm_weight_sha256": _sha256(weight) if weight.exists() else None,
            "quant_bits": bits[0] if len(bits) == 1 else (bits or None),
            "quant_block": blocks[0] if len(blocks) == 1 else (blocks or None)}


def check_binding(binding: dict[str, Any] | None, facts: dict[str, Any], *, adapter: str
                  ) -> None:
    """Refuse an adapter bound to another base (digests or quantization differ). An adapter
    with no binding at all is refused too: nothing else would catch a wrong base."""
    if not binding:
        raise errors.BaseMismatchError(
            f"adapter {adapter} carries no base binding; refusing to guess",
            reason="unbound", adapter=adapter)
    mismatches: dict[str, Any] = {}
    for key in ("llm_mnn_sha256", "llm_weight_sha256", "quant_bits", "quant_block"):
        want, have = binding.get(key), facts.get(key)
        if want is not None and have is not None and want != have:
            mismatches[key] = [want, have]
    if binding.get("llm_weight_sha256") is None and binding.get("llm_mnn_sha256") is None:
        mismatches["digests"] = "binding names no base digest"
    if mismatches:
        raise errors.BaseMismatchError(
            f"adapter {adapter} is bound to another base than the one serving "
            f"({facts.get('name')} v{facts.get('version')})", reason="digest_mismatch",
            adapter=adapter, mismatches=mismatches)


# -- memory-only model folders ------------------------------------------------------------
#: MNN-LLM config files (``llm_config.json`` is merged over ``config.json``)
LLM_CONFIG_FILES = ("config.json", "llm_config.json")
#: MNN-LLM keys that make MNN spill model data to files (FIELD-NOTES: ``use_mmap`` writes
#: the decrypted, repacked weights to ``tmp_path``; ``kvcache_mmap`` the KV cache), and the
#: value the agent forces. ``tmp_path`` is dropped: with both off nothing is written there.
MEMORY_ONLY: dict[str, Any] = {"use_mmap": False, "kvcache_mmap": False}
_SPILL_PATH_KEYS = ("tmp_path",)


def memory_only_config(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``config`` with MNN's file-spilling options forced off (:data:`MEMORY_ONLY`, no
    ``tmp_path``), and what was changed (key -> {"asked", "forced"}) for the report.
    Pure."""
    out = dict(config)
    changed: dict[str, Any] = {}
    for key, value in MEMORY_ONLY.items():
        if key in out and out[key] != value:
            changed[key] = {"asked": out[key], "forced": value}
        out[key] = value
    for key in _SPILL_PATH_KEYS:
        if key in out:
            changed[key] = {"asked": out.pop(key), "forced": None}
    return out, changed


class LinkDir:
    """A private (0700) folder whose entries are symbolic links, for MNN-LLM to open.

    Links point at ``/proc/self/fd/N`` for decrypted payloads (so a reader outside this
    process resolves its own fd table, not ours) or at plain files for ``--model-dir``.
    An MNN-LLM config (:data:`LLM_CONFIG_FILES`) is linked to a memfd copy with
    :func:`memory_only_config` applied, so no package can switch MNN's mmap caches on;
    :attr:`forced` says what was overridden (the health report and ``status`` carry it)."""

    def __init__(self, parent: Path) -> None:
        parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = parent / f"serve-{os.getpid()}-{secrets.token_hex(4)}"
        self.path.mkdir(mode=0o700)
        self.forced: dict[str, Any] = {}
        self._fds: list[int] = []

    def link(self, name: str, target: str) -> str:
        """Add ``name`` -> ``target``; returns ``name`` (relative: MNN prefixes the folder)."""
        if "/" in name or name in ("", ".", ".."):
            raise errors.UsageError(f"bad link name {name!r}")
        if name in LLM_CONFIG_FILES:
            target = self._memory_only(name, target)
        p = self.path / name
        if p.is_symlink():
            p.unlink()
        os.symlink(target, p)
        return name

    def _memory_only(self, name: str, target: str) -> str:
        """A memfd holding ``target``'s JSON with the spilling options forced off."""
        try:
            with open(target, "rb") as f:
                doc = json.loads(f.read(1 << 20))
        except (OSError, ValueError) as exc:
            raise errors.InvalidModelError(f"{name}: not a readable JSON config ({exc})",
                                           file=name) from exc
        if not isinstance(doc, dict):
            raise errors.InvalidModelError(f"{name}: not a JSON object", file=name)
        safe, changed = memory_only_config(doc)
        self.forced.update({k: {**v, "file": name} for k, v in changed.items()})
        fd = os.memfd_create(f"fleet-{name}", os.MFD_CLOEXEC)
        self._fds.append(fd)
        os.write(fd, json.dumps(safe).encode())
        return f"/proc/self/fd/{fd}"

    def unlink(self, name: str) -> None:
        (self.path / name).unlink(missing_ok=True)

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


# -- small files ----------------------------------------------------------------------------
def write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    """Temp file, fsync, rename, fsync the folder: a crash leaves the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise errors.StoreError(f"{path} is not valid JSON", path=str(path)) from exc
    return doc if isinstance(doc, dict) else None


def serve_socket(ctx: AgentContext) -> Path:
    return ctx.root / "run" / "serve.sock"


def serve_state_file(ctx: AgentContext) -> Path:
    return ctx.root / "lora" / "serve-state.json"


# -- agent verbs -----------------------------------------------------------------------------
def _socket(ctx: AgentContext, args: dict[str, Any]) -> Path:
    return Path(args["socket"]) if args.get("socket") else serve_socket(ctx)


def _daemon(ctx: AgentContext, args: dict[str, Any], op: str, **req: Any) -> dict[str, Any]:
    from fleet_agent.serve_protocol import call

    timeout = float(args.get("timeout", 120.0))
    doc = call(_socket(ctx, args), op, timeout=timeout, **req)
    doc.pop("ok", None)
    return doc


def lora_add(ctx: AgentContext, args: dict[str, Any]) -> dict[str, Any]:
    """Stage a LoRA pack (``path`` on the device, ``envelope``: its key envelope, base64):
    verified, kept encrypted; with ``swap: true`` the daemon then serves it."""
    from fleet.core.package.envelope import envelope_from_text
    from fleet_agent.store import Store

    if not args.get("path"):
        raise errors.UsageError("lora add needs path")
    staged = Store(ctx).stage(args["path"], envelope=envelope_from_text(args.get("envelope")))
    if staged.kind != "lora":
        raise errors.UsageError(f"{staged.name} is a {staged.kind} package, not a LoRA pack",
                                name=staged.name)
    out: dict[str, Any] = {"staged": staged.to_dict()}
    if args.get("swap"):
        out["swap"] = _daemon(ctx, args, "swap", name=staged.name, version=staged.version)
    return out


def lora_swap(ctx: AgentContext, args: dict[str, Any]) -> dict[str, Any]:
    """Serve adapter ``name`` (``version``: newest staged by default), ``name: null`` for
    the base alone, or ``rollback: true`` for the adapter served before."""
    if args.get("rollback"):
        return _daemon(ctx, args, "swap", rollback=True)
    if "name" not in args:
        raise errors.UsageError("lora swap needs name (null: serve the base alone)")
    req: dict[str, Any] = {"name": args["name"]}
    if args.get("version") is not None:
        req["version"] = int(args["version"])
    return _daemon(ctx, args, "swap", **req)


def lora_remove(ctx: AgentContext, args: dict[str, Any]) -> dict[str, Any]:
    """Stop serving adapter ``name`` (the base serves alone). The encrypted pack stays in
    the store (a later ``lora swap`` can bring it back)."""
    name = args.get("name")
    if not name:
        raise errors.UsageError("lora remove needs name")
    status = _daemon(ctx, args, "status")
    serving = (status.get("adapter_info") or {}).get("name")
    if serving != name:
        return {"removed": False, "reason": f"{name} is not being served",
                "adapter": status.get("adapter")}
    out = _daemon(ctx, args, "swap", name=None)
    return {"removed": True, **out}


def lora_list(ctx: AgentContext, args: dict[str, Any]) -> dict[str, Any]:
    """Staged LoRA packs (from the store's state) and what the daemon serves, if it runs."""
    state = read_json(ctx.state_file) or {}
    packs = []
    for name, rec in sorted((state.get("models") or {}).items()):
        if rec.get("kind") == "lora":
            packs.append({"name": name, "versions": sorted(int(v) for v in rec.get("versions",
                                                                                   {}))})
    daemon: dict[str, Any] | None
    try:
        daemon = _daemon(ctx, {**args, "timeout": args.get("timeout", 10.0)}, "status")
    except errors.FleetError as exc:
        daemon = {"running": False, "error": exc.to_dict()}
    serving = read_json(serve_state_file(ctx))
    return {"packs": packs, "daemon": daemon, "persisted": serving}
