"""``make demo``: the main job, end to end, on this machine's virtual lab.

1. a fresh controller home, signing key, three local devices in group ``demo``;
2. ``fleet deploy models/tiny/tiny.mnn --group demo`` and ``fleet audit --group demo``;
3. as root: lab IoT boards (real sshd in network namespaces) and lab phones (emulated
   adbd behind Debian's adb server, emulated usbmuxd driven by tidevice) in group
   ``phones``; ``fleet deploy ... --group phones`` and the audit;
4. an MNN-LLM base deployed to a lab board and served there; a LoRA adapter hot-swapped in,
   and the reference prompts show the outputs changed to the adapter's;
5. the lab is taken down again, whatever happened.

Every step is the real CLI in a subprocess; its output is what an operator sees.
"""

from __future__ import annotations

import json
import os
import shutil
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
    print("\ndemo finished: models deployed, reports stored, audit shown.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
