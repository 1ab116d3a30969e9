"""``make demo``: the main job, end to end, on this machine's virtual lab.

1. a fresh controller home, signing key, three local devices in group ``demo``;
2. ``fleet deploy models/tiny/tiny.mnn --group demo`` and ``fleet audit --group demo``;
3. as root: lab IoT boards (real sshd in network namespaces) and lab phones (emulated
   adbd behind Debian's adb server, emulated usbmuxd driven by tidevice) in group
   ``phones``; ``fleet deploy ... --group phones`` and the audit;
4. an MNN-LLM base deployed to a lab board and served there; a LoRA adapter hot-swapped in,
   and the reference prompts show the outputs changed to the adapter's;
5. pull mode: ``fleet server`` (TLS, its own CA) on the lab's root-namespace address; one
   lab board's agent, run inside the board's network namespace, enrolls with a one-time
   token, checks in, downloads the model the deployment put in its desired state and
   activates it (:func:`pull_part`);
6. the lab is taken down again, whatever happened.

Every step is the real CLI in a subprocess; its output is what an operator sees.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOME = REPO / ".demo" / "home"
TINY = REPO / "models" / "tiny" / "tiny.mnn"


def fleet(*args: str, check: bool = True) -> int:
    cmd = [sys.executable, "-m", "fleet", *args]
    print(f"\n$ fleet {' '.join(args)}", flush=True)
    rc = subprocess.call(cmd, env=dict(os.environ, FLEET_HOME=str(HOME),
                                       COLUMNS=os.environ.get("COLUMNS", "150")))
    if check and rc != 0:
        raise SystemExit(f"demo step failed (exit {rc}): fleet {' '.join(args)}")
    return rc


def members(group: str) -> list[str]:
    out = subprocess.run([sys.executable, "-m", "fleet", "device", "list", "--group", group,
                          "--json"], env=dict(os.environ, FLEET_HOME=str(HOME)),
                         capture_output=True, text=True, check=True).stdout
    return [d["name"] for d in json.loads(out)]


def local_part() -> None:
    fleet("init")
    fleet("keys", "init")
    fleet("group", "create", "demo")
    for i in (1, 2, 3):
        root = REPO / ".demo" / "devices" / f"local{i}"
        fleet("device", "add", f"local://local{i}?root={root}", "--name", f"local{i}",
              "--group", "demo", "--tag", "site=desk")
    fleet("device", "list")
    fleet("deploy", str(TINY), "--group", "demo")
    fleet("audit", "--group", "demo")


def lab_part() -> None:
    fleet("lab", "up", "--iot", "2", "--android", "3", "--ios", "2")
    fleet("group", "create", "phones")
    names = members("lab-android") + members("lab-ios")
    fleet("group", "add", "phones", *names)
    fleet("deploy", str(TINY), "--group", "lab-iot", "--waves", "1,100%")
    fleet("deploy", str(TINY), "--group", "phones")
    fleet("audit", "--group", "phones")
    lora_part("iot0")
    fleet("status")
    pull_part("iot1")


def lora_part(board: str) -> None:
    """An MNN-LLM base on a lab board, its serving daemon, then an adapter hot-swapped in:
    the reference prompts' outputs change from the base's to the adapter's."""
    llm = REPO / "models" / "llm"
    fleet("deploy", str(llm / "base"), "--name", "qwen-tiny", "--device", board)
    fleet("lora", "serve", "qwen-tiny", "--device", board)
    fleet("lora", "check", str(llm / "base.ref.json"), "--device", board)
    pack = REPO / ".demo" / "adapter_a.fpkg"
    fleet("lora", "package", str(llm / "lora" / "adapter_a.mnn"), "--base", "qwen-tiny@1",
          "--reference", str(llm / "lora" / "adapter_a.ref.json"), "-o", str(pack))
    fleet("lora", "push", str(pack), "--device", board, "--swap")
    fleet("lora", "check", str(llm / "lora" / "adapter_a.ref.json"), "--device", board)
    fleet("lora", "check", str(llm / "base.ref.json"), "--device", board, check=False)
    fleet("audit", "--device", board)


def fleet_json(*args: str) -> object:
    print(f"\n$ fleet {' '.join(args)} --json", flush=True)
    out = subprocess.run([sys.executable, "-m", "fleet", *args, "--json"],
                         env=dict(os.environ, FLEET_HOME=str(HOME)), capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out)


def pull_part(board: str) -> None:
    """A lab board in pull mode: the server on the root-namespace side of the board's
    veth, the board's agent (in its network namespace) enrolls, checks in, downloads the
    deployed model (HTTP Range, verified as it arrives) and activates it."""
    from fleet.home import FleetHome
    from fleet.lab import pull

    home = FleetHome(HOME)
    addr = pull.server_address(home, board)
    port = pull.free_port(addr)
    url, ca = f"https://{addr}:{port}", HOME / "tls" / "ca.pem"
    fleet("server", "init-tls", "--san", addr)
    print(f"\n$ fleet server --listen {addr}:{port} &", flush=True)
    server = subprocess.Popen([sys.executable, "-m", "fleet", "server", "--listen",
                               f"{addr}:{port}"], env=dict(os.environ, FLEET_HOME=str(HOME)),
                              start_new_session=True)
    try:
        pull.wait_ready(url, ca, proc=server)
        fleet("group", "create", "field")
        dev = fleet_json("device", "add", f"pull://field-{board}", "--group", "field")
        token = str(dev["token"]) if isinstance(dev, dict) else ""
        print(f"(enrollment token for field-{board}: {token[:12]}…)")

        def agent(*extra: str) -> dict[str, object]:
            argv = pull.agent_argv(home, board, url, ca, "--once", *extra)
            shown = [a if a != token else token[:12] + "…" for a in argv]
            print(f"\n[{board}]$ {' '.join(shown)}", flush=True)
            rc, doc = pull.run_agent(home, board, url, ca, "--once", *extra)
            print(json.dumps(doc, indent=1, default=str)[:1500])
            if rc != 0:
                raise SystemExit(f"demo step failed: the pull agent on {board} (exit {rc})")
            return doc

        agent("--token", token)  # enroll and a first, empty check-in
        fleet("deploy", str(TINY), "--group", "field", "--name", "tiny-field")
        doc = agent()
        if doc.get("models") != ["tiny-field"]:
            raise SystemExit(f"demo step failed: {board} was not given tiny-field")
        deps = fleet_json("deployment", "list", "--limit", "5")
        dep = next((d for d in deps if isinstance(d, dict) and d.get("name") == "tiny-field"),
                   None) if isinstance(deps, list) else None
        if dep is None or dep.get("status") != "completed":
            raise SystemExit(f"demo step failed: the pull deployment did not complete: {dep}")
        fleet("deployment", "show", str(dep["id"]))  # field-iot1: active
        fleet("device", "show", f"field-{board}")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(15)


def main() -> int:
    if HOME.exists():
        fleet("lab", "down", check=False)
        shutil.rmtree(REPO / ".demo")
    local_part()
    if os.geteuid() != 0:
        print("\n(not root: the lab part of the demo needs network namespaces; skipped)")
        return 0
    try:
        lab_part()
    finally:
        fleet("lab", "down", check=False)
    print("\ndemo finished: models deployed (pushed and pulled), reports stored, audit "
          "shown.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
