"""``fleet-agent [--root DIR] VERB [SUB] [--args-b64 B64]``: one JSON document out.

``fleet-agent --version`` prints ``mnn-fleet <version>`` (for people; not a protocol verb).
``fleet-agent [--root DIR] pull --server URL --ca FILE ...`` is the pull-mode loop
(:mod:`fleet_agent.pull`), not a verb either.

Exit status: 0 when ``ok`` is true, 1 when the verb failed (the error is in the JSON),
2 for a malformed invocation (also answered with a JSON document).

Stdout holds the one JSON document and nothing else. MNN prints from C++ to fd 1 (the
``import MNN`` banner, ``Can't Find type=N backend``, ``getshape: unable to get variable
info``: FIELD-NOTES "Facts found since"), and any library may ``print``; the session wrapper
captures what it can, and on top of that the verb runs with fd 1 pointed at fd 2, so a
line from any code path lands on stderr. The document is written after fd 1 is restored.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from fleet.core import errors
from fleet.core.fsutil import DISK_FULL_ERRNOS, os_error
from fleet.core.protocol import decode_args, fail, ok
from fleet_agent.context import AgentContext
from fleet_agent.hardening import harden_process

__all__ = ["VERBS", "dispatch", "main"]

VerbFn = Callable[[AgentContext, dict[str, Any]], dict[str, Any]]

#: verb -> "module:function", imported lazily (``status`` must not pay for importing MNN).
VERBS: dict[str, str] = {
    "status": "fleet_agent.verbs_basic:status",
    "enroll": "fleet_agent.verbs_basic:enroll",
    "rekey": "fleet_agent.verbs_basic:rekey",
    "probe": "fleet_agent.probe:probe_verb",
    "stage": "fleet_agent.verbs_install:stage",
    "activate": "fleet_agent.verbs_install:activate",
    "rollback": "fleet_agent.verbs_install:rollback",
    "bench": "fleet_agent.verbs_install:bench",
    "audit": "fleet_agent.verbs_install:audit",
    "gc": "fleet_agent.gc:gc_verb",
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


#: verbs that change the store: one at a time per device root (the root's lock, waited
#: for up to ``lock_timeout`` seconds from the arguments, then ``busy``)
LOCKED_VERBS = frozenset({"stage", "activate", "rollback", "gc"})


def _serialised(ctx: AgentContext, verb: str, args: dict[str, Any]
                ) -> contextlib.AbstractContextManager[None]:
    if verb not in LOCKED_VERBS:
        return contextlib.nullcontext()
    from fleet_agent.store import root_lock  # lazy: status must stay cheap

    timeout = args.get("lock_timeout")
    return root_lock(ctx, None if timeout is None else float(timeout))


def dispatch(ctx: AgentContext, verb: str, args: dict[str, Any]) -> dict[str, Any]:
    """Run one verb; never raises: failures come back as an error document. A root that
    is not the agent's alone (links, foreign or loose folders) is refused before any verb
    (:meth:`AgentContext.check`)."""
    try:
        fn = _resolve(verb)
        ctx.check()
        with _serialised(ctx, verb, args):
            data = fn(ctx, args)
        return ok(verb, **data)
    except OSError as exc:  # a full disk anywhere is disk_full, never "internal"
        return fail(verb, os_error(exc, exc.filename or ctx.root)
                    if exc.errno in DISK_FULL_ERRNOS else exc)
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


def _first_word(argv: Sequence[str]) -> str | None:
    """The verb word (the first word that is neither an option nor ``--root``'s value)."""
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word == "--root":
            skip = True
        elif not word.startswith("-"):
            return word
    return None


def _dist_version() -> str:
    # Not fleet._version: the agent imports only fleet.core from fleet (import contract).
    from importlib import metadata

    try:
        return metadata.version("mnn-fleet")
    except metadata.PackageNotFoundError:
        return "unknown"


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """For the block, whatever is written to fd 1 (C or Python) goes to fd 2, and
    ``sys.stdout`` is ``sys.stderr``."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no stdout at all: nothing to protect
        yield
        return
    try:
        try:
            os.dup2(2, 1)
        except OSError:  # no stderr: discard instead
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.close(devnull)
        py_stdout, sys.stdout = sys.stdout, sys.stderr
        try:
            yield
        finally:
            sys.stdout = py_stdout
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv: Sequence[str] | None = None) -> int:
    harden_process()  # no core dumps, private umask: before anything is decrypted
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--version" in argv:
        print(f"mnn-fleet {_dist_version()}")
        return 0
    if _first_word(argv) == "pull":  # the pull loop has options of its own
        from fleet_agent.pull import main as pull_main

        rest = list(argv)
        rest.remove("pull")
        return pull_main(rest)
    try:
        root, verb, args = _parse(argv)
    except Exception as exc:
        print(json.dumps(fail(" ".join(argv[:1]) or "", exc)))
        return 2
    with stdout_to_stderr():
        doc = dispatch(AgentContext.from_env(root), verb, args)
    sys.stdout.write(json.dumps(doc, sort_keys=True) + "\n")
    sys.stdout.flush()
    return 0 if doc["ok"] else 1
