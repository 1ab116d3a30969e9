"""The emulated adbd's services: ``shell:``, ``shell,v2:``, ``exec:`` and ``sync:``.

- ``shell:CMD`` and ``exec:CMD``: raw byte streams, stdout and stderr mixed, no exit status
  (as adbd's ``SubprocessProtocol::kNone``). The host closing the stream kills the command.
- ``shell,v2[,OPTS]:CMD``: packets ``<id:u8, length:u32le, data>``; ids 0 stdin, 1 stdout,
  2 stderr, 3 exit (one byte), 4 close-stdin, 5 window size (ignored). ``pty`` is accepted
  but not emulated: commands always get pipes.
- ``sync:``: ``STAT``/``STA2``/``LST2``, ``LIST``/``LIS2``, ``SEND``, ``RECV``, ``QUIT`` after
  AOSP's ``file_sync_protocol.h`` (``SEND`` makes missing parents, as with
  ``fixed_push_mkdir``; a partial file is removed when a push fails, as adbd does).

Commands run through :func:`fleet.lab.android_sandbox.shell_argv` (the phone's namespace).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat as stat_mod
import struct
import subprocess
import threading
from collections.abc import Callable
from typing import IO, TYPE_CHECKING

from fleet.lab.android_sandbox import PhoneFs, shell_argv

if TYPE_CHECKING:
    from fleet.lab.adbd import Phone, Stream

__all__ = ["find_service"]

SYNC_DATA_MAX = 64 * 1024
ID_STDIN, ID_STDOUT, ID_STDERR, ID_EXIT, ID_CLOSE_STDIN, ID_WINSIZE = range(6)


class _Reader:
    """Exact reads over a stream whose ``WRTE`` chunks ignore message boundaries."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.buf = bytearray()

    def read_exact(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            chunk = self.stream.recv()
            if not chunk:
                return None
            self.buf += chunk
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


def _spawn(phone: Phone, command: str, *, split_stderr: bool) -> subprocess.Popen[bytes]:
    argv = shell_argv(phone.sandbox, command or None)
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE if split_stderr else subprocess.STDOUT,
                            start_new_session=True)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, 9)
    proc.wait()


# -- shell v1 / exec ----------------------------------------------------------------------
def _shell_raw(phone: Phone, stream: Stream, command: str) -> None:
    proc = _spawn(phone, command, split_stderr=False)
    assert proc.stdin is not None and proc.stdout is not None

    def feed() -> None:
        assert proc.stdin is not None
        while data := stream.recv():
            try:
                proc.stdin.write(data)
                proc.stdin.flush()
            except OSError:
                break
        # v1 has no half-close: the host closing the stream ends the command
        with contextlib.suppress(OSError):
            proc.stdin.close()
        if stream.closed:
            _kill(proc)

    threading.Thread(target=feed, daemon=True).start()
    try:
        while data := os.read(proc.stdout.fileno(), SYNC_DATA_MAX):
            stream.send(data)
    finally:
        _kill(proc)


# -- shell v2 -----------------------------------------------------------------------------
def _packet(kind: int, data: bytes) -> bytes:
    return struct.pack("<BI", kind, len(data)) + data


def _shell_v2(phone: Phone, stream: Stream, command: str) -> None:
    proc = _spawn(phone, command, split_stderr=True)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    send_lock = threading.Lock()

    def send(kind: int, data: bytes) -> None:
        with send_lock:
            stream.send(_packet(kind, data))

    def feed() -> None:
        assert proc.stdin is not None
        reader = _Reader(stream)
        while (header := reader.read_exact(5)) is not None:
            kind, length = struct.unpack("<BI", header)
            data = reader.read_exact(length) if length else b""
            if data is None:
                break
            if kind == ID_STDIN:
                try:
                    proc.stdin.write(data)
                    proc.stdin.flush()
                except OSError:
                    pass
            elif kind == ID_CLOSE_STDIN:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
        with contextlib.suppress(OSError):
            proc.stdin.close()
        if stream.closed:
            _kill(proc)

    def pump(pipe: IO[bytes], kind: int) -> None:
        with contextlib.suppress(OSError):
            while data := os.read(pipe.fileno(), SYNC_DATA_MAX):
                send(kind, data)

    threading.Thread(target=feed, daemon=True).start()
    err = threading.Thread(target=pump, args=(proc.stderr, ID_STDERR), daemon=True)
    err.start()
    pump(proc.stdout, ID_STDOUT)
    err.join()
    code = proc.wait()
    send(ID_EXIT, bytes([code & 0xFF if code >= 0 else (128 - code) & 0xFF]))


# -- sync ---------------------------------------------------------------------------------
def _fail(stream: Stream, message: str) -> None:
    data = message.encode()
    stream.send(b"FAIL" + struct.pack("<I", len(data)) + data)


def _stat_v2(ident: bytes, st: os.stat_result | None, err: int) -> bytes:
    if st is None:
        return ident + struct.pack("<IQQIIIIQqqq", err, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    return ident + struct.pack("<IQQIIIIQqqq", 0, st.st_dev, st.st_ino, st.st_mode,
                               st.st_nlink, st.st_uid, st.st_gid, st.st_size,
                               int(st.st_atime), int(st.st_mtime), int(st.st_ctime))


def _lstat(fs: PhoneFs, path: str, *, follow: bool) -> tuple[os.stat_result | None, int]:
    try:
        host = fs.host_path(path)
        return (os.stat(host) if follow else os.lstat(host)), 0
    except PermissionError:
        return None, errno.EACCES
    except OSError as exc:
        return None, exc.errno or errno.ENOENT


def _do_list(fs: PhoneFs, stream: Stream, path: str, v2: bool) -> None:
    try:
        host = fs.host_path(path)
        names = sorted(os.listdir(host))
    except OSError:
        names = []
        host = None
    for name in names:
        assert host is not None
        try:
            st = os.lstat(host / name)
        except OSError:
            continue
        raw = name.encode()
        if v2:
            stream.send(_stat_v2(b"DNT2", st, 0) + struct.pack("<I", len(raw)) + raw)
        else:
            stream.send(b"DENT" + struct.pack("<IIII", st.st_mode & 0xFFFFFFFF,
                                              st.st_size & 0xFFFFFFFF,
                                              int(st.st_mtime), len(raw)) + raw)
    stream.send(b"DONE" + bytes(72 if v2 else 16))


def _do_send(phone: Phone, fs: PhoneFs, stream: Stream, reader: _Reader, spec: str) -> bool:
    path, _, mode_text = spec.rpartition(",")
    if not path:
        path, mode_text = spec, "33188"
    try:
        mode = int(mode_text)
    except ValueError:
        mode = 0o100644
    error: str | None = None
    host = None
    out = None
    try:
        host = fs.host_path(path, write=True)
        host.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            host.unlink()
        if not stat_mod.S_ISLNK(mode):
            out = open(host, "xb")  # noqa: SIM115 - closed below, on every path
    except OSError as exc:
        error = f"{path}: {exc.strerror or exc}"
    link_target = bytearray()
    ok = False
    try:
        while True:
            header = reader.read_exact(8)
            if header is None:
                return False  # connection gone mid-transfer
            ident, length = header[:4], struct.unpack("<I", header[4:])[0]
            if ident == b"DATA":
                if length > SYNC_DATA_MAX:
                    error = error or "sync DATA block too large"
                    break
                data = reader.read_exact(length)
                if data is None:
                    return False
                phone.count_received(len(data))
                if error is None:
                    if out is not None:
                        out.write(data)
                    else:
                        link_target += data
            elif ident == b"DONE":
                if error is None and host is not None:
                    if out is not None:
                        out.close()
                        out = None
                        os.chmod(host, stat_mod.S_IMODE(mode))
                        os.utime(host, (length, length))
                    else:
                        os.symlink(link_target.decode(), host)
                    ok = True
                break
            else:
                error = error or f"unexpected sync id {ident!r} during SEND"
                break
    finally:
        if out is not None:
            out.close()
        if not ok and host is not None and error is None:
            with contextlib.suppress(OSError):
                host.unlink()  # adbd removes a partial file
    if ok:
        stream.send(b"OKAY" + bytes(4))
        return True
    if error is not None and host is not None and not stat_mod.S_ISLNK(mode):
        with contextlib.suppress(OSError):
            host.unlink()
    _fail(stream, error or "push failed")
    return False


def _do_recv(fs: PhoneFs, stream: Stream, path: str) -> bool:
    try:
        with open(fs.host_path(path), "rb") as f:
            while block := f.read(SYNC_DATA_MAX):
                stream.send(b"DATA" + struct.pack("<I", len(block)) + block)
    except OSError as exc:
        _fail(stream, f"{path}: {exc.strerror or exc}")
        return False
    stream.send(b"DONE" + bytes(4))
    return True


def _sync(phone: Phone, stream: Stream, _service: str) -> None:
    fs = PhoneFs(phone.sandbox)
    reader = _Reader(stream)
    while (header := reader.read_exact(8)) is not None:
        ident, length = header[:4], struct.unpack("<I", header[4:])[0]
        if ident == b"QUIT":
            return
        if length > 1024:
            _fail(stream, "path too long")
            return
        raw = reader.read_exact(length)
        if raw is None:
            return
        arg = raw.decode(errors="surrogateescape")
        if ident == b"STAT":
            st, _err = _lstat(fs, arg, follow=False)
            if st is None:
                stream.send(b"STAT" + bytes(12))
            else:
                stream.send(b"STAT" + struct.pack("<III", st.st_mode, st.st_size & 0xFFFFFFFF,
                                                  int(st.st_mtime)))
        elif ident in (b"STA2", b"LST2"):
            st, err = _lstat(fs, arg, follow=ident == b"STA2")
            stream.send(_stat_v2(ident, st, err))
        elif ident in (b"LIST", b"LIS2"):
            _do_list(fs, stream, arg, ident == b"LIS2")
        elif ident == b"SEND":
            if not _do_send(phone, fs, stream, reader, arg):
                return
        elif ident == b"RECV":
            if not _do_recv(fs, stream, arg):
                return
        else:
            _fail(stream, f"unknown sync command {ident!r}")
            return


ServiceFn = Callable[["Phone", "Stream", str], None]


def find_service(name: str) -> ServiceFn | None:
    """The handler for an ``OPEN`` service string, or ``None`` (the open is refused)."""
    if name.startswith("sync:"):
        return _sync
    if name.startswith("exec:"):
        return lambda phone, stream, svc: _shell_raw(phone, stream, svc[len("exec:"):])
    if name.startswith("shell"):
        head, sep, command = name.partition(":")
        if not sep:
            return None
        options = head.split(",")[1:]
        if head.split(",")[0] != "shell":
            return None
        if "v2" in options:
            return lambda phone, stream, _svc: _shell_v2(phone, stream, command)
        return lambda phone, stream, _svc: _shell_raw(phone, stream, command)
    return None
