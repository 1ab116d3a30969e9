"""The emulated phone's ``am`` and ``pm``, and the emulated app that embeds the agent.

Runs inside a phone's namespace (``/system/bin/am`` and ``/system/bin/pm`` exec this
module). An app is "installed" when ``/data/data/<package>`` exists. Its mailbox is
``/sdcard/Android/data/<package>/files/fleet/{inbox,outbox}`` (the documents are
:mod:`fleet.mailbox`'s). ``am force-stop <package>`` stops the app: as on Android, a stopped
app receives no broadcasts (its mailbox goes unanswered) until ``am start -n <package>/...``.
``am broadcast -a <package>.FLEET_WAKE`` returns at once, as on Android, and the app works
through its inbox in the background: one request at a time (``flock`` on
``/data/data/<package>/mailbox.lock``), each checked and answered by the agent's mailbox
handler (:mod:`fleet_agent.mailbox_auth`: signed requests only, signed answers; through
:func:`fleet.lab.ios_app.handle_request`, shared with the emulated iOS app).

Output mimics the real tools closely enough for scripts: ``Broadcasting: Intent {...}`` /
``Broadcast completed: result=0``; ``pm path`` prints ``package:<apk>`` or exits 1.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["installed_packages", "mailbox_dir", "main", "serve_inbox"]

WAKE_SUFFIX = ".FLEET_WAKE"
#: the app's agent root, relative to its files folder (the controller names it by its
#: absolute path, ``/sdcard/Android/data/<package>/files/fleet/agent``)
AGENT_ROOT = "fleet/agent"


def installed_packages() -> list[str]:
    try:
        return sorted(p.name for p in Path("/data/data").iterdir() if p.is_dir())
    except FileNotFoundError:
        return []


def mailbox_dir(package: str) -> Path:
    return Path("/sdcard/Android/data") / package / "files" / "fleet"


def serve_inbox(package: str, *, linger_s: float = 0.3) -> int:
    """Answer every request in the package's inbox; returns how many were answered."""
    from fleet.lab.ios_app import handle_request

    base = mailbox_dir(package)
    inbox, outbox = base / "inbox", base / "outbox"
    outbox.mkdir(parents=True, exist_ok=True)
    lock_path = Path("/data/data") / package / "mailbox.lock"
    answered = 0
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        idle_since = time.monotonic()
        while time.monotonic() - idle_since < linger_s:
            entries = sorted(p for p in inbox.glob("*.json") if not p.name.startswith("."))
            if not entries:
                time.sleep(0.05)
                continue
            for path in entries:
                rid = path.name[:-5]
                try:
                    data = path.read_bytes()
                except OSError:
                    data = b""
                answer = handle_request(base.parent, data, rid, root=AGENT_ROOT,
                                        python=sys.executable)
                if answer is not None:
                    tmp = outbox / f".{rid}.json.tmp"
                    tmp.write_bytes(answer)
                    os.replace(tmp, outbox / f"{rid}.json")
                path.unlink(missing_ok=True)
                answered += 1
            idle_since = time.monotonic()
    return answered


def _stopped_flag(package: str) -> Path:
    return Path("/data/data") / package / "stopped"


def _am(args: list[str]) -> int:
    if args[:1] == ["force-stop"] and len(args) > 1:
        # Android delivers no broadcasts to a stopped app until it is launched again
        if args[1] in installed_packages():
            _stopped_flag(args[1]).touch()
        return 0
    if args[:1] == ["start"]:
        component = next((a for a in args if "/" in a), "")
        started = component.split("/", 1)[0]
        if started not in installed_packages():
            print(f"Error: Activity not started, unable to resolve {component}",
                  file=sys.stderr)
            return 1
        _stopped_flag(started).unlink(missing_ok=True)
        print(f"Starting: Intent {{ cmp={component} }}")
        return 0
    if not args or args[0] != "broadcast":
        print(f"Error: am {' '.join(args[:1]) or '(nothing)'}: not emulated in the lab",
              file=sys.stderr)
        return 1
    action: str | None = None
    package: str | None = None
    it = iter(args[1:])
    for word in it:
        if word == "-a":
            action = next(it, None)
        elif word == "-p":
            package = next(it, None)
    print(f"Broadcasting: Intent {{ act={action} flg=0x400000"
          f"{f' pkg={package}' if package else ''} }}")
    if action and action.endswith(WAKE_SUFFIX):
        target = package or action[: -len(WAKE_SUFFIX)]
        if target in installed_packages() and not _stopped_flag(target).exists():
            log = open(Path("/data/data") / target / "app.log", "ab")  # noqa: SIM115
            with log:
                subprocess.Popen([sys.executable, "-m", "fleet.lab.android_app", "serve",
                                  target], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                 start_new_session=True, close_fds=True)
    print("Broadcast completed: result=0")
    return 0


def _pm(args: list[str]) -> int:
    packages = installed_packages()
    if args[:1] == ["path"] and len(args) > 1:
        if args[1] in packages:
            print(f"package:/data/app/{args[1]}-1/base.apk")
            return 0
        return 1
    if args[:2] == ["list", "packages"]:
        for name in packages:
            print(f"package:{name}")
        return 0
    print(f"Error: pm {' '.join(args[:1])}: not emulated in the lab", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    tool, rest = (args[0], args[1:]) if args else ("", [])
    if tool == "am":
        return _am(rest)
    if tool == "pm":
        return _pm(rest)
    if tool == "serve" and rest:
        with contextlib.suppress(KeyboardInterrupt):
            serve_inbox(rest[0])
        return 0
    print("usage: python -m fleet.lab.android_app am|pm|serve ...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
