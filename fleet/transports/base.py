"""The one narrow contract every device kind implements.

A transport moves bytes and runs commands; it knows nothing of packages, and of the
agent only where it lives and how it starts on this kind of device
(:meth:`Transport.agent_root`, :meth:`Transport.agent_cmd`); speaking to the agent is
``fleet.agent_client``'s job. Synchronous on purpose: concurrency lives in the one
fan-out only (``fleet.rollout.fanout.call_each``). Foreign
exceptions (paramiko, adbutils, tidevice, OSError) are mapped at this boundary to the
most specific :class:`fleet.core.errors.TransportError`, raised ``from`` the original.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from fleet.core import errors

if TYPE_CHECKING:  # the mailbox pulls in the package crypto: only transports that use it
    from fleet.core.mailbox import MailboxCredentials

__all__ = [
    "CommandResult",
    "ProgressCallback",
    "RemoteStat",
    "TransferResult",
    "Transport",
    "TransportOptions",
]

#: ``progress(bytes_done, bytes_total)``; called from the transferring thread.
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    exit_code: int
    stdout: bytes
    stderr: bytes
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True)
class TransferResult:
    local: str
    remote: str
    size: int
    bytes_sent: int  #: bytes that crossed the wire in this call (resume skips the rest)
    resumed_from: int
    sha256: str
    duration_s: float


@dataclass(frozen=True)
class RemoteStat:
    path: str
    size: int
    mode: int
    mtime: float
    is_dir: bool


@dataclass
class TransportOptions:
    """What a transport needs from the controller's home, beyond the URI."""

    home: Path | None = None
    known_hosts: Path | None = None
    ssh_key: Path | None = None
    accept_host_key: str | None = None  #: "SHA256:..." fingerprint accepted on first contact
    connect_timeout: float = 10.0
    adb_host: str = "127.0.0.1"
    adb_port: int = 5037
    usbmux_socket: str | None = None
    mailbox_timeout: float = 60.0
    #: keys of the authenticated mailbox (ios://, adb app mode): the controller's signing
    #: key and the device's registered key (:class:`fleet.core.mailbox.MailboxCredentials`)
    mailbox: MailboxCredentials | None = None
    extra: dict[str, str] = field(default_factory=dict)


class Transport(ABC):
    """Base of all transports. Subclasses fill :attr:`error_map` and the five verbs."""

    scheme: ClassVar[str]
    #: (foreign exception type, fleet error type), first match wins.
    error_map: ClassVar[tuple[tuple[type[BaseException], type[errors.TransportError]], ...]] = (
        (TimeoutError, errors.TransportTimeout),
        (ConnectionRefusedError, errors.ConnectError),
        (ConnectionResetError, errors.ConnectionLostError),
        (BrokenPipeError, errors.ConnectionLostError),
        (FileNotFoundError, errors.RemoteFileError),
        (PermissionError, errors.RemoteFileError),
    )
    #: Where the agent keeps its store on this kind of device, and how to start it.
    default_agent_root: ClassVar[str] = "/var/lib/fleet-agent"
    default_agent_cmd: ClassVar[tuple[str, ...]] = ("fleet-agent",)

    def __init__(self, uri: str, options: TransportOptions | None = None) -> None:
        self.uri = uri
        self.options = options or TransportOptions()

    # -- the contract -------------------------------------------------------------------
    @abstractmethod
    def run(self, argv: Sequence[str], *, timeout: float, stdin: bytes | None = None
            ) -> CommandResult: ...

    @abstractmethod
    def push(self, local: Path, remote: str, *, resume: bool = True,
             progress: ProgressCallback | None = None) -> TransferResult: ...

    @abstractmethod
    def pull(self, remote: str, local: Path) -> TransferResult: ...

    @abstractmethod
    def stat(self, remote: str) -> RemoteStat | None:
        """The remote file's facts, or ``None`` when it does not exist."""

    @abstractmethod
    def close(self) -> None: ...

    # -- shared machinery ---------------------------------------------------------------
    def agent_root(self) -> str:
        """The agent's device root for this device (URI may override the default)."""
        return self.default_agent_root

    def agent_cmd(self) -> list[str]:
        return list(self.default_agent_cmd)

    @contextlib.contextmanager
    def mapped_errors(self, what: str) -> Iterator[None]:
        """Translate foreign exceptions raised inside the block (httpx-style)."""
        try:
            yield
        except errors.FleetError:
            raise
        except Exception as exc:
            for foreign, ours in self.error_map:
                if isinstance(exc, foreign):
                    raise ours(f"{what}: {exc}", uri=self.uri) from exc
            raise errors.TransportError(f"{what}: {type(exc).__name__}: {exc}",
                                        uri=self.uri) from exc

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
