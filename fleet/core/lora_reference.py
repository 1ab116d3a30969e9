"""A LoRA pack's reference outputs: prompt token ids and the greedy tokens expected.

Both sides read it: the controller validates it before packaging, the agent checks an
adapter against it after loading (FIELD-NOTES: a bad ``--lora_split`` export exists in the
wild, so nothing serves unchecked). Bounds: at most 64 prompts, 4096 tokens each.
Malformed documents raise :class:`~fleet.core.errors.FormatError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fleet.core import errors

__all__ = ["LORA_FILE", "REFERENCE_FILE", "REFERENCE_SCHEMA", "Reference"]

REFERENCE_SCHEMA = "fleet.lora-reference/1"
#: Payload names inside a LoRA pack.
LORA_FILE = "lora.mnn"
REFERENCE_FILE = "reference.json"
_MAX_PROMPTS = 64
_MAX_TOKENS = 4096


@dataclass(frozen=True)
class Reference:
    """Prompt token ids and the greedy tokens the adapter must produce for each."""

    prompts: tuple[tuple[int, ...], ...]
    expected: tuple[tuple[int, ...], ...]
    max_new_tokens: int
    export: dict[str, Any]

    @classmethod
    def from_dict(cls, doc: Any) -> Reference:
        if not isinstance(doc, dict):
            raise errors.FormatError("reference must be a JSON object")
        prompts, expected = doc.get("prompts"), doc.get("expected")
        n = doc.get("max_new_tokens")

        def ids(v: Any, what: str) -> tuple[int, ...]:
            if not isinstance(v, list) or not v or len(v) > _MAX_TOKENS \
                    or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                               for t in v):
                raise errors.FormatError(f"reference {what} must be non-empty token id lists")
            return tuple(v)

        if not isinstance(prompts, list) or not isinstance(expected, list) \
                or not prompts or len(prompts) != len(expected) or len(prompts) > _MAX_PROMPTS:
            raise errors.FormatError("reference needs as many expected lists as prompts")
        if not isinstance(n, int) or not 0 < n <= _MAX_TOKENS:
            raise errors.FormatError("reference max_new_tokens must be a positive integer")
        exp = tuple(ids(e, "expected") for e in expected)
        if any(len(e) != n for e in exp):
            raise errors.FormatError("each expected list must hold max_new_tokens ids")
        raw_export = doc.get("export")
        export: dict[str, Any] = dict(raw_export) if isinstance(raw_export, dict) else {}
        return cls(tuple(ids(p, "prompts") for p in prompts), exp, n, export)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": REFERENCE_SCHEMA, "prompts": [list(p) for p in self.prompts],
                "expected": [list(e) for e in self.expected],
                "max_new_tokens": self.max_new_tokens, "export": self.export}
