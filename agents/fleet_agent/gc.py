"""Store hygiene: what a device keeps, what it deletes, and the ``gc`` verb.

Policy (ARCHITECTURE.md "Device store"): per model name the active version, the previous
one, every version staged but not yet activated (newer than the active one: a
``--no-activate`` deploy waits there) and up to ``keep`` more, newest first (default 1;
per root, ``state.json`` ``policy.keep``). Everything else goes: its package in
``store/``, its record, its per-version runtime config. A name with no active slot (LoRA
packs, stage-only models) is left alone. A version the device *refuses* at activation is
deleted at once and its floor raise undone, so a fixed build of that version can come.

Deleted versions are remembered by number (``deleted``: why), so a rollback to one fails
with a clear :class:`~fleet.core.errors.NotFoundError` instead of "missing file".

``gc`` also removes what no record names: orphan ``store/*.fpkg`` (a crash between the
rename and the state write), stage temp files, and uploads in ``incoming/`` untouched for
``incoming_grace_s`` seconds (interrupted pushes; a live push keeps its file fresh).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from fleet.core import errors
from fleet.core.fsutil import disk_space
from fleet_agent.context import AgentContext

if TYPE_CHECKING:
    from fleet_agent.store import Store

__all__ = ["DEFAULT_INCOMING_GRACE_S", "DEFAULT_KEEP", "gc", "gc_verb", "prune", "refuse",
           "versions_to_delete"]

#: versions kept beyond the active and the previous one, unless the root says otherwise
DEFAULT_KEEP = 1
#: an upload untouched this long (seconds) is an interrupted push's leftover
DEFAULT_INCOMING_GRACE_S = 3600.0
_MAX_DELETED = 32  # deleted/refused version numbers remembered per name


def versions_to_delete(versions: Iterable[int], *, active: int | None,
                       previous: int | None, keep: int) -> list[int]:
    """The versions the keep policy deletes, ascending. Pure.

    Kept: ``active``, ``previous``, every version newer than ``active`` (staged, waiting)
    and the ``keep`` newest of the rest. Nothing is deleted while nothing is active.
    Raises :class:`UsageError` for a negative ``keep``."""
    if keep < 0:
        raise errors.UsageError(f"keep must be >= 0, got {keep}", keep=keep)
    if active is None:
        return []
    rest = sorted((v for v in set(versions) if v not in (active, previous) and v < active),
                  reverse=True)
    return sorted(rest[keep:])


def keep_of(state: dict[str, Any]) -> int:
    return int(state.get("policy", {}).get("keep", DEFAULT_KEEP))


def _drop_version(store: Store, state: dict[str, Any], name: str, version: int,
                  why: str) -> int:
    """Forget ``name@version`` in ``state`` (the caller saves it) and delete its package
    and runtime config; returns the bytes freed."""
    st = state["models"][name]
    rec = st["versions"].pop(str(version))
    deleted = st.setdefault("deleted", {})
    deleted[str(version)] = why
    for old in sorted(deleted, key=int)[:-_MAX_DELETED]:
        deleted.pop(old)
    still_used = {r["package"] for s in state["models"].values()
                  for r in s.get("versions", {}).values()}
    freed = 0
    if rec["package"] not in still_used:
        path = store.ctx.store / rec["package"]
        with contextlib.suppress(FileNotFoundError):
            freed = path.stat().st_size
            path.unlink()
    shutil.rmtree(store.ctx.slots / name / f"v{version}", ignore_errors=True)
    return freed


def prune(store: Store, name: str, keep: int | None = None) -> dict[str, Any]:
    """Apply the keep policy to ``name`` (``keep`` None: the root's). Holds the root's
    lock. Returns ``{"name", "deleted": [versions], "freed": bytes}``; raises
    :class:`BusyError`, :class:`DiskFullError` (state.json could not be rewritten)."""
    with store.locked():
        state = store.load_state()
        st = state["models"].get(name)
        if st is None:
            return {"name": name, "deleted": [], "freed": 0}
        keep = keep_of(state) if keep is None else keep
        cur, prev = store.active(name), store.previous(name)
        doomed = versions_to_delete((int(v) for v in st.get("versions", {})),
                                    active=cur.version if cur else None,
                                    previous=prev.version if prev else None, keep=keep)
        freed = sum(_drop_version(store, state, name, v, f"pruned (keep={keep})")
                    for v in doomed)
        if doomed:
            store.save_state(state)
        return {"name": name, "deleted": doomed, "freed": freed}


def refuse(store: Store, name: str, version: int, reason: str) -> dict[str, Any]:
    """The device refused ``name@version`` at activation: delete it and lower the floor
    back to what it was before that version was staged (never below the active, previous
    or another staged version). The active and previous versions are never touched.
    Returns ``{"deleted": bool, "floor": int}``."""
    with store.locked():
        state = store.load_state()
        st = state["models"].get(name)
        if st is None:
            return {"deleted": False, "floor": 0}
        slots = {s.version for s in (store.active(name), store.previous(name)) if s}
        rec = st.get("versions", {}).get(str(version))
        if rec is None or version in slots:
            return {"deleted": False, "floor": int(st["floor"])}
        _drop_version(store, state, name, version, f"refused: {reason}"[:200])
        if int(st["floor"]) == version:
            st["floor"] = max([int(rec.get("floor_before", 0)), *slots,
                               *(int(v) for v in st.get("versions", {}))])
        store.save_state(state)
        return {"deleted": True, "floor": int(st["floor"])}


def _unlink(path: os.PathLike[str], out: list[str]) -> int:
    try:
        size = os.lstat(path).st_size
        os.unlink(path)
    except FileNotFoundError:
        return 0
    out.append(os.fspath(path))
    return size


def gc(store: Store, *, keep: int | None = None,
       incoming_grace_s: float = DEFAULT_INCOMING_GRACE_S) -> dict[str, Any]:
    """Prune every model name, then delete orphans, stage temp files and stale uploads.
    Holds the root's lock throughout. Returns what went and the bytes freed."""
    ctx = store.ctx
    with store.locked():
        models = [prune(store, name, keep) for name in sorted(store.load_state()["models"])]
        state = store.load_state()
        used = {r["package"] for s in state["models"].values()
                for r in s.get("versions", {}).values()}
        removed: list[str] = []
        freed = sum(m["freed"] for m in models)
        for p in sorted(ctx.store.iterdir()):
            if (p.name.endswith(".fpkg") and p.name not in used) or \
                    (p.name.startswith(".incoming-") and p.name.endswith(".tmp")):
                freed += _unlink(p, removed)
        cutoff = time.time() - incoming_grace_s
        for p in sorted(ctx.incoming.iterdir()):
            with contextlib.suppress(FileNotFoundError):
                if p.is_file() and p.lstat().st_mtime <= cutoff:
                    freed += _unlink(p, removed)
    return {"keep": keep_of(state) if keep is None else keep,
            "models": [m for m in models if m["deleted"]],
            "removed": [os.path.relpath(r, ctx.root) for r in removed], "freed": freed}


def gc_verb(ctx: AgentContext, args: dict[str, Any]) -> dict[str, Any]:
    """``fleet-agent gc``: args ``keep`` (this run; with ``save: true`` also the root's
    policy from now on), ``incoming_grace_s``. Answer: ``keep``, ``models`` (name,
    deleted versions, freed bytes), ``removed`` (paths under the root), ``freed``,
    ``disk`` (free/total bytes after)."""
    from fleet_agent.store import Store

    store = Store(ctx)
    keep = args.get("keep")
    if keep is not None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise errors.UsageError(f"keep must be an integer >= 0, got {keep!r}", keep=keep)
        if args.get("save"):
            with store.locked():
                state = store.load_state()
                state.setdefault("policy", {})["keep"] = keep
                store.save_state(state)
    grace = float(args.get("incoming_grace_s", DEFAULT_INCOMING_GRACE_S))
    out = gc(store, keep=keep, incoming_grace_s=max(0.0, grace))
    out["disk"] = disk_space(ctx.root).to_dict()
    return out
