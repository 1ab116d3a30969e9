"""The byte-level pieces of :class:`fleet.transports.adb.AdbTransport`: sync requests and the
shell v2 packet stream, spoken over an adbutils connection to the adb server.

adbutils gives the connection (``host:transport`` / ``tport`` selection, ``OKAY``/``FAIL``)
and this module the rest, because adbutils' own sync writes 4 KiB blocks without progress
and its shell v2 has no stdin. Everything raises plain ``OSError`` subclasses or
:class:`SyncFailure`; the transport maps them to fleet errors.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["ShellOutput", "SyncFailure", "SyncStat", "quit_sync", "recv_file", "send_file",
           "shell_v2", "stat"]

SYNC_DATA_MAX = 64 * 1024
_STAT_V2 = struct.Struct("<IQQIIIIQqqq")
ID_STDIN, ID_STDOUT, ID_STDERR, ID_EXIT, ID_CLOSE_STDIN = range(5)


class SyncFailure(Exception):
    """The device answered ``FAIL`` (its message is the argument)."""


@dataclass(frozen=True)
class SyncStat:
    mode: int
    size: int
    mtime: int
    error: int = 0


def read_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionResetError("adb server closed the connection (device gone?)")
        buf += chunk
    return bytes(buf)


def _request(sock: socket.socket, ident: bytes, arg: str) -> None:
    raw = arg.encode()
    sock.sendall(ident + struct.pack("<I", len(raw)) + raw)


def _fail_message(sock: socket.socket) -> str:
    (length,) = struct.unpack("<I", read_exact(sock, 4))
    return read_exact(sock, length).decode(errors="replace")


def stat(sock: socket.socket, path: str, *, v2: bool) -> SyncStat:
    """``STA2`` (64-bit sizes, errno) when the device has ``stat_v2``, else ``STAT``."""
    if v2:
        _request(sock, b"STA2", path)
        ident = read_exact(sock, 4)
        if ident != b"STA2":
            raise SyncFailure(f"unexpected reply {ident!r} to STA2")
        fields = _STAT_V2.unpack(read_exact(sock, _STAT_V2.size))
        error, mode, size, mtime = fields[0], fields[3], fields[7], fields[9]
        return SyncStat(mode, size, mtime, error)
    _request(sock, b"STAT", path)
    ident = read_exact(sock, 4)
    if ident != b"STAT":
        raise SyncFailure(f"unexpected reply {ident!r} to STAT")
    mode, size, mtime = struct.unpack("<III", read_exact(sock, 12))
    return SyncStat(mode, size, mtime, 0 if mode else 2)


def send_file(sock: socket.socket, source: BinaryIO, remote: str, mode: int, mtime: int,
              total: int, progress: Callable[[int, int], None] | None = None) -> int:
    """``SEND remote,mode`` + ``DATA`` blocks + ``DONE mtime``; returns bytes sent."""
    _request(sock, b"SEND", f"{remote},{mode}")
    sent = 0
    while block := source.read(SYNC_DATA_MAX):
        sock.sendall(b"DATA" + struct.pack("<I", len(block)) + block)
        sent += len(block)
        if progress is not None:
            progress(sent, total)
    sock.sendall(b"DONE" + struct.pack("<I", mtime))
    ident = read_exact(sock, 4)
    if ident == b"OKAY":
        read_exact(sock, 4)
        return sent
    if ident == b"FAIL":
        raise SyncFailure(_fail_message(sock))
    raise SyncFailure(f"unexpected reply {ident!r} to SEND")


def recv_file(sock: socket.socket, remote: str, sink: BinaryIO) -> int:
    """``RECV remote``: ``DATA`` blocks until ``DONE``; returns bytes received."""
    _request(sock, b"RECV", remote)
    got = 0
    while True:
        ident = read_exact(sock, 4)
        (length,) = struct.unpack("<I", read_exact(sock, 4))
        if ident == b"DATA":
            sink.write(read_exact(sock, length))
            got += length
        elif ident == b"DONE":
            return got
        elif ident == b"FAIL":
            raise SyncFailure(read_exact(sock, length).decode(errors="replace"))
        else:
            raise SyncFailure(f"unexpected reply {ident!r} to RECV")


def quit_sync(sock: socket.socket) -> None:
    sock.sendall(b"QUIT" + bytes(4))


@dataclass(frozen=True)
class ShellOutput:
    exit_code: int
    stdout: bytes
    stderr: bytes


def shell_v2(sock: socket.socket, stdin: bytes | None, deadline: float, *,
             out: Any = None, err: Any = None) -> ShellOutput:
    """Drive an opened ``shell,v2`` stream: stdin packets, close-stdin, then collect
    stdout/stderr packets until the exit packet. Raises ``TimeoutError`` at the deadline.
    ``out``/``err``: collectors with ``add(bytes)`` (the transport's capped buffers, which
    raise past their cap); plain bytearrays by default."""
    if stdin:
        view = memoryview(stdin)
        for start in range(0, len(view), SYNC_DATA_MAX):
            block = bytes(view[start:start + SYNC_DATA_MAX])
            sock.sendall(struct.pack("<BI", ID_STDIN, len(block)) + block)
    sock.sendall(struct.pack("<BI", ID_CLOSE_STDIN, 0))
    sink_out = out if out is not None else _Plain()
    sink_err = err if err is not None else _Plain()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("command did not finish before its deadline")
        sock.settimeout(remaining)
        kind, length = struct.unpack("<BI", read_exact(sock, 5))
        data = read_exact(sock, length) if length else b""
        if kind == ID_STDOUT:
            sink_out.add(data)
        elif kind == ID_STDERR:
            sink_err.add(data)
        elif kind == ID_EXIT:
            return ShellOutput(data[0] if data else 255, bytes(sink_out), bytes(sink_err))


class _Plain(bytearray):
    def add(self, data: bytes) -> None:
        self += data


def write_atomic(path: Path, chunks: Callable[[BinaryIO], int]) -> int:
    """Fill ``path`` through a temp file in the same folder, renamed only when complete."""
    tmp = path.with_name(f".{path.name}.part")
    try:
        with open(tmp, "wb") as f:
            n = chunks(f)
        tmp.replace(path)
        return n
    finally:
        tmp.unlink(missing_ok=True)
