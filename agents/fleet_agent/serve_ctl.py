"""``fleet-agent lora serve``: make sure the serving daemon runs for a base model.

Idempotent: if the daemon answers on its socket it is left alone. Otherwise the agent
starts ``fleet-agent serve`` in a new session (so it outlives this verb and the transport's
command), logs to ``run/serve.log`` and returns once the daemon answers ``ping``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from fleet.core import errors
from fleet_agent.context import AgentContext
from fleet_agent.lora_packs import serve_socket

__all__ = ["generate", "serve_start"]


def _ping(sock: Any) -> dict[str, Any] | None:
    from fleet_agent.serve_protocol import call

    try:
        return call(sock, "status", timeout=5)
    except errors.FleetError:
        return None


def serve_start(ctx: AgentContext, args: dict[str, Any]) -> dict[str, Any]:
    model = args.get("model")
    if not model:
        raise errors.UsageError("lora serve needs model (the base model's name)")
    sock = serve_socket(ctx)
    running = _ping(sock)
    if running is not None:
        return {"started": False, "socket": str(sock), "status": running}
    ctx.ensure()
    (ctx.root / "run").mkdir(parents=True, exist_ok=True, mode=0o700)
    log = ctx.root / "run" / "serve.log"
    daemon_args = {"model": model, **({"thread_num": int(args["thread_num"])}
                                      if args.get("thread_num") else {})}
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fleet_agent", "--root", str(ctx.root), "serve",
             "--args", json.dumps(daemon_args)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
            close_fds=True)
    deadline = time.monotonic() + float(args.get("timeout", 120))
    while time.monotonic() < deadline:
        status = _ping(sock)
        if status is not None:
            return {"started": True, "pid": proc.pid, "socket": str(sock), "status": status}
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-800:]
            raise errors.DeviceError(f"serve daemon for {model} exited with {proc.returncode}: "
                                     f"{tail}", model=model)
        time.sleep(0.2)
    proc.terminate()
    raise errors.DeviceError(f"serve daemon for {model} did not answer in time", model=model)


def generate(ctx: AgentContext, args: dict[str, Any]) -> dict[str, Any]:
    """Greedy generation through the running daemon: ``prompts`` (lists of token ids),
    ``max_new_tokens``. Every answer names the adapter that produced it."""
    from fleet_agent.serve_protocol import call

    prompts = args.get("prompts")
    n = int(args.get("max_new_tokens", 8))
    if not isinstance(prompts, list) or not prompts:
        raise errors.UsageError("lora generate needs prompts (lists of token ids)")
    outputs, adapters = [], set()
    for ids in prompts:
        doc = call(serve_socket(ctx), "generate", ids=[int(t) for t in ids],
                   max_new_tokens=n, timeout=float(args.get("timeout", 120)))
        outputs.append(doc["ids"])
        adapters.add(doc.get("adapter"))
    return {"outputs": outputs, "adapter": ", ".join(sorted(str(a) for a in adapters))}
