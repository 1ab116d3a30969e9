"""``fleet-agent [--root DIR] VERB [SUB] [--args-b64 B64]``: one JSON document out.

Exit status: 0 when ``ok`` is true, 1 when the verb failed (the error is in the JSON),
2 for a malformed invocation (also answered with a JSON document).
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from fleet.core import errors
from fleet.core.protocol import decode_args, fail, ok
from fleet_agent.context import AgentContext

__all__ = ["VERBS", "dispatch", "main"]

VerbFn = Callable[[AgentContext, dict[str, Any]], dict[str, Any]]

#: verb -> "module:function", imported lazily (``status`` must not pay for importing MNN).
VERBS: dict[str, str] = {
    "status": "fleet_agent.verbs_basic:status",
    "enroll": "fleet_agent.verbs_basic:enroll",
    "probe": "fleet_agent.probe:probe_verb",
    "stage": "fleet_agent.verbs_install:stage",
    "activate": "fleet_agent.verbs_install:activate",
    "rollback": "fleet_agent.verbs_install:rollback",
    "bench": "fleet_agent.verbs_install:bench",
    "audit": "fleet_agent.verbs_install:audit",
    "serve": "fleet_agent.serve:serve",
    "lora add": "fleet_agent.lora_packs:lora_add",
    "lora swap": "fleet_agent.lora_packs:lora_swap",
    "lora remove": "fleet_agent.lora_packs:lora_remove",
    "lora list": "fleet_agent.lora_packs:lora_list",
    "lora serve": "fleet_agent.serve_ctl:serve_start",
    "lora generate": "fleet_agent.serve_ctl:generate",
}


def _resolve(verb: str) -> VerbFn:
    target = VERBS.get(verb)
    if target is None:
        raise errors.UsageError(f"unknown verb {verb!r}; known: {', '.join(sorted(VERBS))}",
                                verb=verb)
    module, _, fn = target.partition(":")
    resolved: VerbFn = getattr(importlib.import_module(module), fn)
    return resolved


def dispatch(ctx: AgentContext, verb: str, args: dict[str, Any]) -> dict[str, Any]:
    """Run one verb; never raises: failures come back as an error document."""
    try:
        data = _resolve(verb)(ctx, args)
        return ok(verb, **data)
    except Exception as exc:  # errors are data in this protocol
        return fail(verb, exc)


def _parse(argv: Sequence[str]) -> tuple[str | None, str, dict[str, Any]]:
    root: str | None = None
    words: list[str] = []
    args: dict[str, Any] | None = None
    it = iter(argv)
    for word in it:
        if word == "--root":
            root = next(it, None)
        elif word.startswith("--root="):
            root = word.split("=", 1)[1]
        elif word == "--args-b64":
            args = decode_args(next(it, ""))
        elif word == "--args":
            parsed = json.loads(next(it, "{}"))
            if not isinstance(parsed, dict):
                raise ValueError("--args must be a JSON object")
            args = parsed
        else:
            words.append(word)
    if not words:
        raise errors.UsageError("no verb given")
    verb = " ".join(words[:2]) if words[0] in ("lora",) and len(words) > 1 else words[0]
    if args is None:
        args = {}
        if not sys.stdin.isatty():
            text = sys.stdin.read()
            if text.strip():
                parsed = json.loads(text)
                if not isinstance(parsed, dict):
                    raise ValueError("arguments on stdin must be a JSON object")
                args = parsed
    return root, verb, args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        root, verb, args = _parse(argv)
    except Exception as exc:
        print(json.dumps(fail(" ".join(argv[:1]) or "", exc)))
        return 2
    doc = dispatch(AgentContext.from_env(root), verb, args)
    sys.stdout.write(json.dumps(doc, sort_keys=True) + "\n")
    sys.stdout.flush()
    return 0 if doc["ok"] else 1
