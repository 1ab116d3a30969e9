"""Verbs that need neither MNN nor a package: ``status`` and ``enroll``."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

from fleet.core import errors
from fleet_agent import AGENT_VERSION
from fleet_agent.context import AgentContext
from fleet_agent.identity import load_or_create_device_key, public_pem

__all__ = ["enroll", "status"]


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


def status(ctx: AgentContext, args: dict[str, Any]) -> dict[str, Any]:
    return {
        "agent_version": AGENT_VERSION,
        "root": str(ctx.root),
        "enrolled": ctx.device_key.exists(),
        "os": platform.system().lower(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "mnn_version": _mnn_version(),
        "pid": os.getpid(),
        "installed": _installed(ctx),
    }


def enroll(ctx: AgentContext, args: dict[str, Any]) -> dict[str, Any]:
    """Make (or reuse) the device key; pin the controller's signing key if given."""
    ctx.ensure()
    key, created = load_or_create_device_key(ctx.device_key)
    pem, fp = public_pem(key)
    controller_pub = args.get("controller_pub")
    if controller_pub:
        if (ctx.trust_file.exists() and ctx.trust_file.read_text() != controller_pub
                and not args.get("replace_trust")):
            raise errors.UntrustedSignerError(
                "device already trusts another controller key; re-enroll with "
                "replace_trust to change it", trust_file=str(ctx.trust_file))
        tmp = ctx.trust_file.with_suffix(".tmp")
        tmp.write_text(controller_pub)
        os.replace(tmp, ctx.trust_file)
    return {"public_key": pem, "fingerprint": fp, "created": created,
            "agent_version": AGENT_VERSION, "trusts_controller": ctx.trust_file.exists()}
