"""Emulated usbmuxd: the plist protocol on a Unix socket, as tidevice and libusbmuxd speak it.

Why it exists: every iOS client (tidevice, libimobiledevice, pymobiledevice3) reaches
a phone through usbmuxd. Each request is a 16-byte little-endian header (length,
version 1, message 8 = plist, tag) and an XML plist; the answer echoes the tag.
Supported: ``ListDevices``, ``Listen`` (``Attached`` events), ``ReadBUID``,
``ReadPairRecord`` / ``SavePairRecord`` / ``DeletePairRecord`` and ``Connect``, after
whose ``Result 0`` the socket carries raw bytes to the phone's port (``PortNumber`` in
network byte order, as on the wire of the real daemon).
"""

from __future__ import annotations

import contextlib
import os
import plistlib
import socket
import socketserver
import struct
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from fleet.lab.lockdown import recv_exact

__all__ = ["Phone", "PhoneTable", "ReplyCode", "UsbmuxServer", "parse_socket_address"]

_HEADER = struct.Struct("<IIII")
_PLIST_VERSION = 1
_MSG_RESULT = 1
_MSG_PLIST = 8
_MAX_MESSAGE = 1 << 20

PortHandler = Callable[[socket.socket], None]


class ReplyCode:
    OK = 0
    BAD_COMMAND = 1
    BAD_DEVICE = 2
    CONNECTION_REFUSED = 3
    BAD_VERSION = 6


class Phone(Protocol):
    """One attached phone, as usbmuxd sees it."""

    @property
    def udid(self) -> str: ...

    @property
    def device_id(self) -> int: ...

    def open_port(self, port: int) -> PortHandler | None:
        """The handler of a listening port on the phone, or ``None`` (refused)."""


class PhoneTable(Protocol):
    @property
    def buid(self) -> str: ...

    def phones(self) -> Sequence[Phone]: ...

    def read_pair_record(self, udid: str) -> bytes | None: ...

    def save_pair_record(self, udid: str, data: bytes) -> None: ...

    def delete_pair_record(self, udid: str) -> bool: ...


def parse_socket_address(value: str) -> str:
    """``UNIX:/path`` (libusbmuxd's ``USBMUXD_SOCKET_ADDRESS``) or a plain path -> path."""
    return value[5:] if value.upper().startswith("UNIX:") else value


def _device_entry(phone: Phone) -> dict[str, Any]:
    props = {
        "ConnectionSpeed": 480000000,
        "ConnectionType": "USB",
        "DeviceID": phone.device_id,
        "LocationID": 0x14100000 + phone.device_id,
        "ProductID": 0x12A8,
        "SerialNumber": phone.udid,
        "UDID": phone.udid,
        "USBSerialNumber": phone.udid.replace("-", ""),
    }
    return {"DeviceID": phone.device_id, "MessageType": "Attached", "Properties": props}


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        while True:
            try:
                header = recv_exact(sock, _HEADER.size)
            except (EOFError, OSError):
                return
            length, version, message, tag = _HEADER.unpack(header)
            if not _HEADER.size <= length <= _MAX_MESSAGE:
                return
            try:
                body = recv_exact(sock, length - _HEADER.size)
            except (EOFError, OSError):
                return
            if version != _PLIST_VERSION or message != _MSG_PLIST:
                # the binary protocol (version 0) is not spoken: clients fall back to plist
                sock.sendall(_HEADER.pack(_HEADER.size + 4, 0, _MSG_RESULT, tag)
                             + struct.pack("<I", ReplyCode.BAD_VERSION))
                continue
            try:
                req = plistlib.loads(body)
            except Exception:
                self._reply(tag, {"MessageType": "Result", "Number": ReplyCode.BAD_COMMAND})
                continue
            if not isinstance(req, dict):
                self._reply(tag, {"MessageType": "Result", "Number": ReplyCode.BAD_COMMAND})
                continue
            if self._one(req, tag):
                return  # the connection now belongs to a phone port or a listener

    def _reply(self, tag: int, payload: dict[str, Any]) -> None:
        body = plistlib.dumps(payload, fmt=plistlib.FMT_XML)
        self.request.sendall(_HEADER.pack(_HEADER.size + len(body), _PLIST_VERSION,
                                          _MSG_PLIST, tag) + body)

    def _result(self, tag: int, number: int) -> None:
        self._reply(tag, {"MessageType": "Result", "Number": number})

    def _one(self, req: dict[str, Any], tag: int) -> bool:
        table = self.server.table
        kind = req.get("MessageType")
        if kind == "ListDevices":
            self._reply(tag, {"DeviceList": [_device_entry(p) for p in table.phones()]})
        elif kind == "ListListeners":
            self._reply(tag, {"ListenerList": []})
        elif kind == "ReadBUID":
            self._reply(tag, {"BUID": table.buid})
        elif kind == "ReadPairRecord":
            data = table.read_pair_record(str(req.get("PairRecordID", "")))
            if data is None:
                self._result(tag, ReplyCode.BAD_DEVICE)
            else:
                self._reply(tag, {"PairRecordData": data})
        elif kind == "SavePairRecord":
            data = req.get("PairRecordData")
            if not isinstance(data, bytes):
                self._result(tag, ReplyCode.BAD_COMMAND)
            else:
                table.save_pair_record(str(req.get("PairRecordID", "")), data)
                self._result(tag, ReplyCode.OK)
        elif kind == "DeletePairRecord":
            ok = table.delete_pair_record(str(req.get("PairRecordID", "")))
            self._result(tag, ReplyCode.OK if ok else ReplyCode.BAD_DEVICE)
        elif kind == "Listen":
            self._result(tag, ReplyCode.OK)
            for phone in table.phones():
                self._reply(0, _device_entry(phone))
            with contextlib.suppress(OSError, EOFError):
                while self.request.recv(4096):
                    pass
            return True
        elif kind == "Connect":
            return self._connect(req, tag)
        else:
            self._result(tag, ReplyCode.BAD_COMMAND)
        return False

    def _connect(self, req: dict[str, Any], tag: int) -> bool:
        device_id, port_be = req.get("DeviceID"), req.get("PortNumber")
        if not isinstance(device_id, int) or not isinstance(port_be, int):
            self._result(tag, ReplyCode.BAD_COMMAND)
            return False
        port = socket.ntohs(port_be & 0xFFFF)
        phone = next((p for p in self.server.table.phones() if p.device_id == device_id), None)
        if phone is None:
            self._result(tag, ReplyCode.BAD_DEVICE)
            return False
        handler = phone.open_port(port)
        if handler is None:
            self._result(tag, ReplyCode.CONNECTION_REFUSED)
            return False
        self._result(tag, ReplyCode.OK)
        handler(self.request)
        return True


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    table: PhoneTable


class UsbmuxServer:
    """The daemon: one thread per client connection, like the real usbmuxd's clients."""

    def __init__(self, path: Path, table: PhoneTable) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._server = _Server(str(path), _Handler)
        self._server.table = table
        os.chmod(path, 0o600)
        self._thread: threading.Thread | None = None

    def serve_forever(self) -> None:
        self._server.serve_forever(poll_interval=0.2)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="usbmuxd",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


