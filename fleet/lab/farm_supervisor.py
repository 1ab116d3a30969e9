"""One lab farm host's supervisor: a small process that keeps its worker running.

``python -m fleet.lab.farm_supervisor SPEC.json`` (started by :mod:`fleet.lab.farm`, in
its own session) does three things until SIGTERM:

- **plugs the host's devices in**: for each Android phone of the host, a TCP listener on
  ``127.0.0.1:PORT`` *inside the host's network namespace* relaying to the phone's
  emulated adbd (the only way in from that namespace); for the iPhones, the host's own
  usbmuxd socket relaying to the lab's emulated usbmuxd. The listeners are made with
  ``setns(2)`` into the namespace and back, so one process serves both sides;
- **runs the worker** (``fleet worker --host NAME`` under ``nsenter --net``) and starts it
  again when it exits, whatever the reason (a crash, SIGKILL), at most once a second;
- **obeys**: SIGUSR1 stops the worker and keeps it stopped (a host down), SIGUSR2 starts
  it again, SIGTERM stops it (SIGTERM, then SIGKILL after ``stop_timeout_s``) and exits.

The worker's pid is in ``DIR/worker.pid`` while it runs; every start is a line in
``DIR/starts`` (tests count restarts).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["in_netns", "main"]

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(netns_path: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` with this thread in network namespace ``netns_path``, then come back:
    sockets it makes stay in that namespace."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(netns_path, os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({netns_path}): {os.strerror(err)}")
        try:
            return fn()
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns back: {os.strerror(err)}")
    finally:
        os.close(own)
        os.close(target)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def _relay(listener: socket.socket, connect: Callable[[], socket.socket]) -> None:
    """Accept forever; each connection is joined to a new one from ``connect``."""
    while True:
        try:
            inbound, _ = listener.accept()
        except OSError:
            return
        try:
            outbound = connect()
        except OSError:
            inbound.close()
            continue

        def join(a: socket.socket = inbound, b: socket.socket = outbound) -> None:
            t = threading.Thread(target=_pump, args=(b, a), daemon=True)
            t.start()
            _pump(a, b)
            t.join()
            a.close()
            b.close()

        threading.Thread(target=join, daemon=True).start()


def _tcp_listener(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(64)
    return s


def _unix_listener(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    os.chmod(path, 0o600)
    s.listen(64)
    return s


def _tcp_to(port: int) -> Callable[[], socket.socket]:
    return lambda: socket.create_connection(("127.0.0.1", port), timeout=10)


def _unix_to(path: str) -> Callable[[], socket.socket]:
    def connect() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        return s

    return connect


def _plug_in(spec: dict[str, Any]) -> None:
    netns_path = spec["netns_path"]
    for port in spec.get("adb_ports", []):
        listener = in_netns(netns_path, functools.partial(_tcp_listener, int(port)))
        threading.Thread(target=_relay, args=(listener, _tcp_to(port)), daemon=True).start()
    if spec.get("usbmux_socket") and spec.get("lab_usbmux_socket"):
        listener = _unix_listener(spec["usbmux_socket"])
        threading.Thread(target=_relay, args=(listener, _unix_to(spec["lab_usbmux_socket"])),
                         daemon=True).start()


class Supervisor:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.dir = Path(spec["dir"])
        self.child: subprocess.Popen[bytes] | None = None
        self.hold = False
        self.stopping = False
        self.last_start = 0.0

    def start_worker(self) -> None:
        wait = 1.0 - (time.monotonic() - self.last_start)
        if wait > 0:
            time.sleep(wait)
        self.last_start = time.monotonic()
        log = open(self.dir / "worker.log", "ab")  # noqa: SIM115 - handed to the child
        with log:
            self.child = subprocess.Popen(
                ["nsenter", f"--net={self.spec['netns_path']}", "--", *self.spec["argv"]],
                env=self.spec["env"], stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        (self.dir / "worker.pid").write_text(f"{self.child.pid}\n")
        with (self.dir / "starts").open("a") as f:
            f.write(f"{time.time():.3f} {self.child.pid}\n")

    def stop_worker(self) -> None:
        child, self.child = self.child, None
        (self.dir / "worker.pid").unlink(missing_ok=True)
        if child is None or child.poll() is not None:
            return
        child.terminate()
        try:
            child.wait(float(self.spec.get("stop_timeout_s", 15)))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stopping", True))
        signal.signal(signal.SIGINT, lambda *_: setattr(self, "stopping", True))
        signal.signal(signal.SIGUSR1, lambda *_: setattr(self, "hold", True))
        signal.signal(signal.SIGUSR2, lambda *_: setattr(self, "hold", False))
        _plug_in(self.spec)
        (self.dir / "supervisor.ready").write_text(f"{os.getpid()}\n")
        while not self.stopping:
            if self.hold:
                if self.child is not None:
                    self.stop_worker()
            elif self.child is None or self.child.poll() is not None:
                if self.child is not None:
                    (self.dir / "worker.pid").unlink(missing_ok=True)
                self.start_worker()
            time.sleep(0.1)
        self.stop_worker()
        return 0


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m fleet.lab.farm_supervisor SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    return Supervisor(spec).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
