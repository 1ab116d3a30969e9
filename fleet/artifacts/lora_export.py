"""Whether a split LoRA export was made with its base's export settings.

A split ``lora.mnn`` references the base's ``llm.mnn.weight`` by byte offset, so it works
only with the exact base export (same quantization bits and block). Nothing checks this at
run time, so the controller refuses a mismatch before packaging and the device refuses it
again (``docs/lora.md``).

Three witnesses of the settings, each possibly silent: the base package's facts, the
adapter file's own weights (a split LoRA carries the base graph with the base's
quantization), and the reference's ``export`` block (the llmexport arguments). The check
runs whenever the base's settings are known at all, compares every witness that speaks,
and refuses when no witness of the adapter speaks (it cannot tell). A base whose settings
are unknown is refused too: a pack must never be bound blind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fleet.core import errors
from fleet.core.mnn.weights import inspect_weights

__all__ = ["FLOAT", "check_export", "export_settings", "lora_facts"]

#: the bits of an export whose weights are not quantized (fp32 or fp16 storage)
FLOAT = "float"


def lora_facts(lora: Path) -> dict[str, Any]:
    """Manifest facts of a split LoRA file (read from its flatbuffer, no MNN run)."""
    info = inspect_weights(lora)
    bits, blocks = info.get("bits") or [], info.get("blocks") or []
    return {"format": "mnn-llm-lora", "lora_layers": info.get("float_layers", 0),
            "quant_layers": info.get("quant_layers", 0),
            "quant_bits": bits[0] if len(bits) == 1 else (bits or None),
            "quant_block": blocks[0] if len(blocks) == 1 else (blocks or None)}


def export_settings(facts: dict[str, Any] | None) -> dict[str, Any] | None:
    """``{"quant_bits": int | "float", "quant_block": int | None}`` or None (unknown).

    Known when the bits are recorded, or when the layer count says nothing is quantized
    (``quant_layers == 0``: a float export)."""
    facts = facts or {}
    bits, block = _norm(facts.get("quant_bits")), _norm(facts.get("quant_block"))
    if bits is not None:
        return {"quant_bits": bits, "quant_block": block}
    if facts.get("quant_layers") == 0:
        return {"quant_bits": FLOAT, "quant_block": None}
    return None  # nothing recorded: cannot tell


def _norm(value: Any) -> int | tuple[int, ...] | None:
    """An int, or a sorted tuple for mixed values (e.g. lm head 8 bits, the rest 4)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, list | tuple) and value and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return value[0] if len(value) == 1 else tuple(sorted(value))
    return None


def _reference_settings(ref: dict[str, Any]) -> dict[str, Any] | None:
    export = ref.get("export") or {}
    bits = export.get("quant_bit")
    if not isinstance(bits, int) or isinstance(bits, bool):
        return None
    return {"quant_bits": FLOAT if bits >= 16 else bits,
            "quant_block": export.get("quant_block") or None}


def _same(base: Any, other: Any, loose: bool) -> bool:
    """Equal; ``loose`` (a reference names one value): a member of the base's mix."""
    if loose and isinstance(base, tuple):
        return other in base
    return bool(base == other)


def _differences(base: dict[str, Any], other: dict[str, Any], prefix: str
                 ) -> dict[str, Any]:
    out: dict[str, Any] = {}
    loose = bool(prefix)
    if not _same(base["quant_bits"], other["quant_bits"], loose):
        out[f"{prefix}quant_bits"] = [base["quant_bits"], other["quant_bits"]]
    elif base["quant_bits"] != FLOAT and not _same(base["quant_block"], other["quant_block"],
                                                   loose):
        out[f"{prefix}quant_block"] = [base["quant_block"], other["quant_block"]]
    return out


def check_export(base_facts: dict[str, Any] | None, facts: dict[str, Any],
                 ref: dict[str, Any]) -> None:
    """Refuse an adapter whose export settings are not (provably) the base's.

    ``base_facts``: the base package's ``mnn`` facts (or its binding); ``facts``: from
    :func:`lora_facts`; ``ref``: the reference document (may be empty). Raises
    InvalidModelError when the file holds no LoRA layers, BaseMismatchError (code
    ``base_mismatch``) when a witness differs or when the settings cannot be told."""
    if facts.get("lora_layers", 0) == 0:
        raise errors.InvalidModelError("the file holds no LoRA layers (is it a split LoRA "
                                       "export?)")
    base = export_settings(base_facts)
    if base is None:
        raise errors.BaseMismatchError(
            "cannot tell the base package's export settings (quantization bits and block), "
            "so the adapter cannot be checked against them; package the base again with "
            "this version of fleet", base=base_facts)
    own, by_ref = export_settings(facts), _reference_settings(ref)
    if own is None and by_ref is None:
        raise errors.BaseMismatchError(
            "cannot tell the adapter's export settings (its weights do not say and the "
            "reference has no export block); pass a --reference with export.quant_bit",
            base=base)
    mism: dict[str, Any] = {}
    if own is not None:
        mism.update(_differences(base, own, ""))
    if by_ref is not None:
        mism.update(_differences(base, by_ref, "reference."))
    if mism:
        raise errors.BaseMismatchError("the adapter was exported with other quantization "
                                       "settings than the base", mismatches=mism)
