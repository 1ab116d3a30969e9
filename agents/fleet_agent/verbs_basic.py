"""Verbs that need neither MNN nor a package: ``status``, ``enroll`` and ``rekey``.

``status`` takes no lock: every file it reads is replaced atomically, so it answers while
a stage or an activation runs (the controller polls it; it must never wait or be busy).
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

from fleet.core import errors
from fleet.core.fsutil import atomic_write, disk_space, fsync_dir
from fleet_agent import AGENT_VERSION
from fleet_agent.context import AgentContext
from fleet_agent.identity import load_or_create_device_key, public_pem

__all__ = ["enroll", "rekey", "status"]


def _mnn_version() -> str | None:
    try:
        return metadata.version("mnn")
    except metadata.PackageNotFoundError:
        return None


def _installed(ctx: AgentContext) -> dict[str, Any]:
    """Per model name: the store's view plus ``version``/``digest`` of the active slot."""
    if not ctx.state_file.exists():
        return {}
    from fleet_agent.store import Store

    store = Store(ctx)
    out: dict[str, Any] = {}
    for name, info in store.installed().items():
        row = dict(info)
        if info.get("active") is not None:
            row["version"] = info["active"]
            row["digest"] = store.manifest(name, info["active"]).sha256
        out[name] = row
    return out


def _keep(ctx: AgentContext) -> int:
    from fleet_agent.gc import DEFAULT_KEEP
    from fleet_agent.store import Store

    if not ctx.state_file.exists():
        return DEFAULT_KEEP
    return Store(ctx).keep


def status(ctx: AgentContext, args: dict[str, Any]) -> dict[str, Any]:
    """The agent, its root's room (``disk``: ``free``/``total`` bytes of the root's
    filesystem; the controller compares ``free`` with
    :func:`fleet.core.fsutil.room_needed` before it pushes), the keep policy, and what is
    installed."""
    return {
        "agent_version": AGENT_VERSION,
        "root": str(ctx.root),
        "enrolled": ctx.device_key.exists(),
        "os": platform.system().lower(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "mnn_version": _mnn_version(),
        "pid": os.getpid(),
        "disk": disk_space(ctx.root).to_dict(),
        "keep": _keep(ctx),
        "installed": _installed(ctx),
        "trust": _trust_view(ctx) if ctx.identity_dir.exists() else None,
    }


def _trust_view(ctx: AgentContext) -> dict[str, Any]:
    from fleet_agent.store import Store

    store = Store(ctx)
    try:
        ring = store.trusted_signer
    except errors.KeyMaterialError:
        return {"root_version": None, "online_keys": []}
    return {"root_version": ring.version, "online_keys": sorted(ring)}


def enroll(ctx: AgentContext, args: dict[str, Any]) -> dict[str, Any]:
    """Make (or reuse) the device key and pin the controller's root of trust.

    ``trust``: the controller's root chain (v1 first). A device with no root pins v1 (trust
    on first use) and applies the rest; a device with a root only applies the versions
    that chain from it (threshold of the old and the new root keys). ``controller_pub``
    (a bare key, agents before roots) is pinned only when nothing is pinned yet.
    ``replace_trust`` never changes trust on its own: without a chain that verifies it is
    refused (:class:`TrustChainError`), so whoever can run the agent cannot swap the key."""
    from fleet_agent.store import Store

    ctx.ensure()
    key, created = load_or_create_device_key(ctx.device_key)
    pem, fp = public_pem(key)
    store = Store(ctx)
    chain = args.get("trust")
    controller_pub = args.get("controller_pub")
    if chain:
        store.update_trust(chain, pin=True)
    elif args.get("replace_trust"):
        raise errors.TrustChainError(
            "replace_trust without a root chain is refused: trust changes only through a "
            "root update signed by the current root keys", reason="no_chain")
    elif controller_pub:
        if store.root_version is not None:
            known = controller_pub.strip() in _online_pems(store)
        elif ctx.trust_file.exists():
            known = ctx.trust_file.read_text() == controller_pub
        else:
            atomic_write(ctx.trust_file, controller_pub.encode(), mode=0o600)
            known = True
        if not known:
            raise errors.TrustChainError(
                "device already trusts a controller; a new key needs a root chain signed "
                "by the current root keys", reason="no_chain", trust_file=str(ctx.trust_file))
    view = _trust_view(ctx)
    return {"public_key": pem, "fingerprint": fp, "created": created,
            "agent_version": AGENT_VERSION,
            "trusts_controller": view["root_version"] is not None or ctx.trust_file.exists(),
            **view}


def _online_pems(store: Any) -> set[str]:
    from cryptography.hazmat.primitives import serialization

    return {k.public_bytes(serialization.Encoding.PEM,
                           serialization.PublicFormat.SubjectPublicKeyInfo).decode().strip()
            for k in store.trusted_signer.values()}


def rekey(ctx: AgentContext, args: dict[str, Any]) -> dict[str, Any]:
    """Replace the device key: a new P-256 key is made here and its public part returned
    (the controller records it). The old key is kept only to open packages already in the
    store (``device_key.retired-<n>.pem``); a new package addressed to it is refused
    (:class:`NotRecipientError`: it is no longer this device's fingerprint)."""
    from fleet_agent.store import Store

    ctx.ensure()
    store = Store(ctx)
    with store.locked():
        old, _ = load_or_create_device_key(ctx.device_key)
        _old_pem, old_fp = public_pem(old)
        n = 1 + len(list(ctx.identity_dir.glob("device_key.retired-*.pem")))
        retired = ctx.identity_dir / f"device_key.retired-{n}.pem"
        staged = ctx.identity_dir / "device_key.next.pem"
        staged.unlink(missing_ok=True)
        key, _ = load_or_create_device_key(staged)  # written first: a full disk changes nothing
        os.link(ctx.device_key, retired)  # the old key, same bytes and mode, for the store
        os.replace(staged, ctx.device_key)
        fsync_dir(ctx.identity_dir)
    pem, fp = public_pem(key)
    return {"public_key": pem, "fingerprint": fp, "previous_fingerprint": old_fp,
            "created": True, "agent_version": AGENT_VERSION,
            "trusts_controller": True, **_trust_view(ctx)}
