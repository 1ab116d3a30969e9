"""The Android lab's background process: every emulated phone of one controller home.

``python -m fleet.lab.android_daemon --state FILE --control SOCK`` serves the phones listed
in the lab state file and takes orders on a Unix socket, one JSON line in, one JSON line
out: ``ping``, ``status``, ``add`` (a phone config), ``online`` / ``offline`` (name),
``drop_after`` (name, bytes), ``auth`` (name, mode), ``stop``. The orders are how tests
and ``fleet lab`` cause faults for real (a phone leaving the network mid-push, a phone
that never authorizes the server's key) instead of mocking them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from fleet.lab.adbd import AUTH_MODES, Phone, PhoneConfig

__all__ = ["Daemon", "config_from_dict", "main"]

log = logging.getLogger("fleet.lab.android")


def config_from_dict(name: str, data: dict[str, Any]) -> PhoneConfig:
    return PhoneConfig(name=name, port=int(data["port"]), sandbox=Path(data["sandbox"]),
                       serial=str(data.get("serial", "")),
                       model=str(data.get("model", "Lab Phone")),
                       product=str(data.get("product", "fleetlab")),
                       device=str(data.get("device", "fleetlab")),
                       auth=str(data.get("auth", "allow")),
                       props=dict(data.get("props", {})))


class Daemon:
    def __init__(self, control: Path) -> None:
        self.control = control
        self.phones: dict[str, Phone] = {}
        self._stop = threading.Event()

    def add(self, config: PhoneConfig) -> None:
        if config.name in self.phones:
            return
        phone = Phone(config)
        phone.start()
        self.phones[config.name] = phone
        log.info("phone %s listening on 127.0.0.1:%d", config.name, config.port)

    def _phone(self, req: dict[str, Any]) -> Phone:
        name = str(req.get("name", ""))
        if name not in self.phones:
            raise KeyError(f"no phone named {name!r}")
        return self.phones[name]

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "ping":
            return {"ok": True, "pid": os.getpid()}
        if op == "status":
            return {"ok": True, "phones": [p.status() for p in self.phones.values()]}
        if op == "add":
            self.add(config_from_dict(str(req["name"]), req["config"]))
            return {"ok": True}
        if op in ("online", "offline"):
            self._phone(req).set_online(op == "online")
            return {"ok": True}
        if op == "drop_after":
            nbytes = req.get("bytes")
            self._phone(req).drop_after(None if nbytes is None else int(nbytes))
            return {"ok": True}
        if op == "auth":
            mode = str(req.get("mode"))
            if mode not in AUTH_MODES:
                raise ValueError(f"auth mode must be one of {AUTH_MODES}")
            self._phone(req).set_auth(mode)
            return {"ok": True}
        if op == "stop":
            self._stop.set()
            return {"ok": True}
        raise ValueError(f"unknown op {op!r}")

    def _client(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:
            for line in f:
                try:
                    reply = self.handle(json.loads(line))
                except Exception as exc:
                    reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                f.write(json.dumps(reply).encode() + b"\n")
                f.flush()

    def serve(self) -> None:
        self.control.unlink(missing_ok=True)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(self.control))
        os.chmod(self.control, 0o600)
        server.listen(8)
        server.settimeout(0.5)
        try:
            while not self._stop.is_set():
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                threading.Thread(target=self._client, args=(conn,), daemon=True).start()
        finally:
            server.close()
            self.control.unlink(missing_ok=True)
            for phone in self.phones.values():
                phone.set_online(False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleet.lab.android_daemon")
    parser.add_argument("--state", required=True, type=Path)
    parser.add_argument("--control", required=True, type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    daemon = Daemon(args.control)
    signal.signal(signal.SIGTERM, lambda *_: daemon._stop.set())
    state = json.loads(args.state.read_text())
    for name, data in sorted(state.get("phones", {}).items()):
        try:
            daemon.add(config_from_dict(name, data))
        except OSError as exc:
            log.error("phone %s cannot start: %s", name, exc)
    daemon.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
