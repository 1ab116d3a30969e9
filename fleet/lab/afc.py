"""Emulated AFC (Apple File Conduit) server over a sandbox directory.

Why it exists: house_arrest hands its connection over to AFC, and both tidevice's
``Sync`` and libimobiledevice's ``afc_client`` must move real bytes through it. Packets
are a 40-byte little-endian header (``CFA6LPAA``, entire length, header+data length,
packet number, operation) followed by data and payload; the reply carries the same
packet number and is ``STATUS`` (u64 code), ``DATA`` (bytes in the payload) or
``FILE_OPEN_RES`` (u64 handle). Paths are resolved inside the sandbox only: ``..`` and
symlinks that point outside are refused with ``PERM_DENIED``.
"""

from __future__ import annotations

import errno
import os
import posixpath
import shutil
import socket
import stat as stat_mod
import struct
from pathlib import Path

__all__ = ["AFC_MAGIC", "AfcServer", "AfcStatus"]

AFC_MAGIC = b"CFA6LPAA"
_HEADER = struct.Struct("<8sQQQQ")
_MAX_PACKET = 64 << 20
_MAX_READ = 4 << 20
_MAX_HANDLES = 64


class AfcStatus:
    SUCCESS = 0
    UNKNOWN_ERROR = 1
    OP_HEADER_INVALID = 2
    READ_ERROR = 4
    WRITE_ERROR = 5
    INVALID_ARG = 7
    OBJECT_NOT_FOUND = 8
    OBJECT_IS_DIR = 9
    PERM_DENIED = 10
    OP_NOT_SUPPORTED = 15
    OBJECT_EXISTS = 16
    NO_SPACE_LEFT = 18
    IO_ERROR = 20
    NO_MEM = 31
    DIR_NOT_EMPTY = 33


class _Op:
    STATUS = 0x01
    DATA = 0x02
    READ_DIR = 0x03
    REMOVE_PATH = 0x08
    MAKE_DIR = 0x09
    GET_FILE_INFO = 0x0A
    GET_DEVINFO = 0x0B
    FILE_OPEN = 0x0D
    FILE_OPEN_RES = 0x0E
    READ = 0x0F
    WRITE = 0x10
    FILE_SEEK = 0x11
    FILE_TELL = 0x12
    FILE_TELL_RES = 0x13
    FILE_CLOSE = 0x14
    FILE_SET_SIZE = 0x15
    RENAME_PATH = 0x18
    REMOVE_PATH_AND_CONTENTS = 0x22


#: AFC open modes -> os.open flags
_MODES = {
    1: os.O_RDONLY,
    2: os.O_RDWR | os.O_CREAT,
    3: os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    4: os.O_RDWR | os.O_CREAT | os.O_TRUNC,
    5: os.O_WRONLY | os.O_APPEND | os.O_CREAT,
    6: os.O_RDWR | os.O_APPEND | os.O_CREAT,
}

_ERRNO_STATUS = {
    errno.ENOENT: AfcStatus.OBJECT_NOT_FOUND,
    errno.ENOTDIR: AfcStatus.OBJECT_NOT_FOUND,
    errno.EISDIR: AfcStatus.OBJECT_IS_DIR,
    errno.EACCES: AfcStatus.PERM_DENIED,
    errno.EPERM: AfcStatus.PERM_DENIED,
    errno.EEXIST: AfcStatus.OBJECT_EXISTS,
    errno.ENOSPC: AfcStatus.NO_SPACE_LEFT,
    errno.EDQUOT: AfcStatus.NO_SPACE_LEFT,
    errno.ENOTEMPTY: AfcStatus.DIR_NOT_EMPTY,
    errno.EINVAL: AfcStatus.INVALID_ARG,
}


class _Refused(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(min(size - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("peer closed")
        buf += chunk
    return bytes(buf)


def _cstr(raw: bytes) -> str:
    return raw.split(b"\x00", 1)[0].decode("utf-8")


class AfcServer:
    """Serves AFC on one connection. ``visible`` limits access to one top folder
    (house_arrest ``VendDocuments`` shows ``/Documents`` only)."""

    def __init__(self, root: Path, *, visible: str | None = None,
                 model: str = "iPhone14,5") -> None:
        self.root = Path(os.path.realpath(root))
        self.visible = visible
        self.model = model
        self._handles: dict[int, int] = {}
        self._next_handle = 1

    # -- paths ---------------------------------------------------------------------------
    def _resolve(self, raw: str) -> Path:
        rel = posixpath.normpath("/" + raw).lstrip("/")
        if rel in ("", "."):
            return self.root
        if self.visible is not None and rel.split("/", 1)[0] != self.visible:
            raise _Refused(AfcStatus.PERM_DENIED)
        path = self.root / rel
        real_parent = os.path.realpath(path.parent)
        if real_parent != str(self.root) and not real_parent.startswith(str(self.root) + "/"):
            raise _Refused(AfcStatus.PERM_DENIED)
        if path.is_symlink():
            target = os.path.realpath(path)
            if target != str(self.root) and not target.startswith(str(self.root) + "/"):
                raise _Refused(AfcStatus.PERM_DENIED)
        return path

    # -- loop ----------------------------------------------------------------------------
    def serve(self, sock: socket.socket) -> None:
        try:
            while True:
                try:
                    header = _recv_exact(sock, _HEADER.size)
                except (EOFError, OSError):
                    return
                magic, entire, this_len, num, op = _HEADER.unpack(header)
                if magic != AFC_MAGIC or not (_HEADER.size <= this_len <= entire <= _MAX_PACKET):
                    return  # a real AFC daemon drops a connection that lost framing
                body = _recv_exact(sock, entire - _HEADER.size)
                data, payload = body[:this_len - _HEADER.size], body[this_len - _HEADER.size:]
                reply_op, reply_data, reply_payload = self._dispatch(op, data, payload)
                out = _HEADER.pack(AFC_MAGIC, _HEADER.size + len(reply_data) + len(reply_payload),
                                   _HEADER.size + len(reply_data), num, reply_op)
                sock.sendall(out + reply_data + reply_payload)
        except (EOFError, OSError):
            return
        finally:
            for fd in self._handles.values():
                os.close(fd)
            self._handles.clear()

    def _dispatch(self, op: int, data: bytes, payload: bytes) -> tuple[int, bytes, bytes]:
        handler = _HANDLERS.get(op)
        if handler is None:
            return self._status(AfcStatus.OP_NOT_SUPPORTED)
        try:
            return handler(self, data, payload)
        except _Refused as exc:
            return self._status(exc.status)
        except (struct.error, UnicodeDecodeError, KeyError, ValueError):
            return self._status(AfcStatus.INVALID_ARG)
        except OSError as exc:
            return self._status(_ERRNO_STATUS.get(exc.errno or 0, AfcStatus.IO_ERROR))

    @staticmethod
    def _status(code: int) -> tuple[int, bytes, bytes]:
        return _Op.STATUS, struct.pack("<Q", code), b""

    @staticmethod
    def _data(payload: bytes) -> tuple[int, bytes, bytes]:
        return _Op.DATA, b"", payload

    # -- operations ----------------------------------------------------------------------
    def _read_dir(self, data: bytes, _: bytes) -> tuple[int, bytes, bytes]:
        path = self._resolve(_cstr(data))
        names = [".", "..", *sorted(os.listdir(path))]
        if path == self.root and self.visible is not None:
            names = [".", "..", self.visible]
        return self._data(b"".join(n.encode() + b"\x00" for n in names))

    def _file_info(self, data: bytes, _: bytes) -> tuple[int, bytes, bytes]:
        path = self._resolve(_cstr(data))
        st = os.lstat(path)
        if stat_mod.S_ISDIR(st.st_mode):
            ifmt = "S_IFDIR"
        elif stat_mod.S_ISLNK(st.st_mode):
            ifmt = "S_IFLNK"
        else:
            ifmt = "S_IFREG"
        info = {
            "st_size": str(st.st_size), "st_blocks": str(st.st_blocks),
            "st_nlink": str(st.st_nlink), "st_ifmt": ifmt,
            "st_mtime": str(st.st_mtime_ns), "st_birthtime": str(st.st_ctime_ns),
        }
        if ifmt == "S_IFLNK":
            info["LinkTarget"] = os.readlink(path)
        return self._data(b"".join(k.encode() + b"\x00" + v.encode() + b"\x00"
                                   for k, v in info.items()))

    def _devinfo(self, _: bytes, __: bytes) -> tuple[int, bytes, bytes]:
        usage = shutil.disk_usage(self.root)
        info = {"Model": self.model, "FSTotalBytes": str(usage.total),
                "FSFreeBytes": str(usage.free), "FSBlockSize": "4096"}
        return self._data(b"".join(k.encode() + b"\x00" + v.encode() + b"\x00"
                                   for k, v in info.items()))

    def _mkdir(self, data: bytes, _: bytes) -> tuple[int, bytes, bytes]:
        self._resolve(_cstr(data)).mkdir(parents=True, exist_ok=True)
        return self._status(AfcStatus.SUCCESS)

    def _remove(self, data: bytes, _: bytes) -> tuple[int, bytes, bytes]:
        path = self._resolve(_cstr(data))
        if path == self.root:
            raise _Refused(AfcStatus.PERM_DENIED)
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink()
        return self._status(AfcStatus.SUCCESS)

    def _remove_all(self, data: bytes, _: bytes) -> tuple[int, bytes, bytes]:
        path = self._resolve(_cstr(data))
        if path == self.root:
            raise _Refused(AfcStatus.PERM_DENIED)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        return self._status(AfcStatus.SUCCESS)

    def _rename(self, data: bytes, _: bytes) -> tuple[int, bytes, bytes]:
        parts = data.split(b"\x00")
        if len(parts) < 2:
            raise _Refused(AfcStatus.INVALID_ARG)
        src, dst = self._resolve(parts[0].decode()), self._resolve(parts[1].decode())
        os.replace(src, dst)
        return self._status(AfcStatus.SUCCESS)

    def _open(self, data: bytes, _: bytes) -> tuple[int, bytes, bytes]:
        (mode,) = struct.unpack_from("<Q", data)
        flags = _MODES.get(mode)
        if flags is None:
            raise _Refused(AfcStatus.INVALID_ARG)
        if len(self._handles) >= _MAX_HANDLES:
            raise _Refused(AfcStatus.NO_MEM)
        path = self._resolve(_cstr(data[8:]))
        if path.is_dir():
            raise _Refused(AfcStatus.OBJECT_IS_DIR)
        fd = os.open(path, flags | os.O_NOFOLLOW, 0o644)
        handle = self._next_handle
        self._next_handle += 1
        self._handles[handle] = fd
        return _Op.FILE_OPEN_RES, struct.pack("<Q", handle), b""

    def _fd(self, data: bytes) -> int:
        (handle,) = struct.unpack_from("<Q", data)
        return self._handles[handle]

    def _read(self, data: bytes, _: bytes) -> tuple[int, bytes, bytes]:
        fd = self._fd(data)
        (size,) = struct.unpack_from("<Q", data, 8)
        return self._data(os.read(fd, min(size, _MAX_READ)))

    def _write(self, data: bytes, payload: bytes) -> tuple[int, bytes, bytes]:
        fd = self._fd(data)
        view = memoryview(data[8:] + payload)
        while view:
            view = view[os.write(fd, view):]
        return self._status(AfcStatus.SUCCESS)

    def _seek(self, data: bytes, _: bytes) -> tuple[int, bytes, bytes]:
        fd = self._fd(data)
        whence, offset = struct.unpack_from("<Qq", data, 8)
        os.lseek(fd, offset, {0: os.SEEK_SET, 1: os.SEEK_CUR, 2: os.SEEK_END}[whence])
        return self._status(AfcStatus.SUCCESS)

    def _tell(self, data: bytes, _: bytes) -> tuple[int, bytes, bytes]:
        pos = os.lseek(self._fd(data), 0, os.SEEK_CUR)
        return _Op.FILE_TELL_RES, struct.pack("<Q", pos), b""

    def _set_size(self, data: bytes, _: bytes) -> tuple[int, bytes, bytes]:
        fd = self._fd(data)
        (size,) = struct.unpack_from("<Q", data, 8)
        os.ftruncate(fd, size)
        return self._status(AfcStatus.SUCCESS)

    def _close(self, data: bytes, _: bytes) -> tuple[int, bytes, bytes]:
        (handle,) = struct.unpack_from("<Q", data)
        fd = self._handles.pop(handle)
        os.fsync(fd)
        os.close(fd)
        return self._status(AfcStatus.SUCCESS)


_HANDLERS = {
    _Op.READ_DIR: AfcServer._read_dir,
    _Op.GET_FILE_INFO: AfcServer._file_info,
    _Op.GET_DEVINFO: AfcServer._devinfo,
    _Op.MAKE_DIR: AfcServer._mkdir,
    _Op.REMOVE_PATH: AfcServer._remove,
    _Op.REMOVE_PATH_AND_CONTENTS: AfcServer._remove_all,
    _Op.RENAME_PATH: AfcServer._rename,
    _Op.FILE_OPEN: AfcServer._open,
    _Op.READ: AfcServer._read,
    _Op.WRITE: AfcServer._write,
    _Op.FILE_SEEK: AfcServer._seek,
    _Op.FILE_TELL: AfcServer._tell,
    _Op.FILE_SET_SIZE: AfcServer._set_size,
    _Op.FILE_CLOSE: AfcServer._close,
}
