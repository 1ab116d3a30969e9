"""``ssh://user@host:port``: Linux boards over OpenSSH, with paramiko on the controller.

Security: host keys are checked strictly against the fleet-managed known_hosts
(:mod:`fleet.transports._known_hosts`); there is no auto-add and no way to turn checking
off. First contact with an unknown host fails with its ``SHA256:`` fingerprint; the operator
accepts exactly that key with ``accept_host_key``. A changed key is refused.

Pushes go over SFTP into ``<remote>.part`` (``<remote>.<n>.part`` while another push of
the same file runs: :mod:`fleet.transports._parts`). A later push resumes from that partial file
when its bytes equal the local prefix: the device hashes the partial file with
``sha256sum`` and the controller compares with the hash of the same number of local bytes
(a full hash, not a size guess: a truncated or foreign ``.part`` restarts from zero). The
finished file is hashed on the device and renamed into place only when it matches.

Query parameters: ``root`` (agent root), ``agent`` (agent command, shell words),
``io_timeout`` (seconds without progress before a transfer is declared lost).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import select
import shlex
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import paramiko

from fleet.core import errors
from fleet.home import FleetHome
from fleet.transports._bounded import CappedBuffer
from fleet.transports._known_hosts import (
    KnownHosts,
    ensure_ssh_key,
    fingerprint,
    host_pattern,
    load_private_key,
)
from fleet.transports._parts import part_slot
from fleet.transports.base import (
    CommandResult,
    ProgressCallback,
    RemoteStat,
    TransferResult,
    Transport,
    TransportOptions,
)
from fleet.transports.uri import parse_uri

__all__ = ["SshTransport", "ensure_ssh_key", "fingerprint"]

_CHUNK = 1 << 20
_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
#: SFTP write size that fits one ssh channel packet (OpenSSH: 32 KiB of channel data) with
#: the SFTP header; paramiko's default 32 KiB of data makes every write two packets.
_SFTP_WRITE = 32768 - 128
_DEFAULT_IO_TIMEOUT = 30.0


def _prefix_sha256(path: Path, length: int) -> Any:
    """A sha256 object fed with the first ``length`` bytes of ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = length
        while left > 0 and (block := f.read(min(_CHUNK, left))):
            h.update(block)
            left -= len(block)
    return h


def _shell_path(remote: str) -> str:
    """``~/x`` -> ``x``: exec sessions and SFTP both start in the user's home."""
    if remote == "~":
        return "."
    return remote[2:] if remote.startswith("~/") else remote


class SshTransport(Transport):
    scheme = "ssh"
    default_agent_root = "~/.fleet-agent"
    default_agent_cmd = ("fleet-agent",)
    error_map: ClassVar[tuple[tuple[type[BaseException], type[errors.TransportError]], ...]] = (
        (paramiko.AuthenticationException, errors.AuthError),
        (paramiko.ssh_exception.NoValidConnectionsError, errors.ConnectError),
        (paramiko.SSHException, errors.ConnectionLostError),
        (EOFError, errors.ConnectionLostError),
        (TimeoutError, errors.TransportTimeout),
        (ConnectionRefusedError, errors.ConnectError),
        (ConnectionResetError, errors.ConnectionLostError),
        (BrokenPipeError, errors.ConnectionLostError),
        (FileNotFoundError, errors.RemoteFileError),
        (PermissionError, errors.RemoteFileError),
    )

    def __init__(self, uri: str, options: TransportOptions | None = None) -> None:
        super().__init__(uri, options)
        parsed = parse_uri(uri)
        if parsed.scheme != "ssh":
            raise errors.UnknownSchemeError(f"not an ssh URI: {uri!r}", uri=uri)
        self.host = parsed.host
        self.port = parsed.port or 22
        self.user = parsed.user or "root"
        self.query = parsed.query
        io = self.query.get("io_timeout") or self.options.extra.get("ssh_io_timeout")
        self.io_timeout = float(io) if io else _DEFAULT_IO_TIMEOUT
        self._lock = threading.RLock()
        self._t: paramiko.Transport | None = None
        self._sftp_client: paramiko.SFTPClient | None = None

    # -- identity ------------------------------------------------------------------------
    def agent_root(self) -> str:
        return self.query.get("root") or self.default_agent_root

    def agent_cmd(self) -> list[str]:
        agent = self.query.get("agent")
        return shlex.split(agent) if agent else list(self.default_agent_cmd)

    @property
    def target(self) -> str:
        return f"{self.user}@{host_pattern(self.host, self.port)}"

    def _known_hosts(self) -> KnownHosts:
        path = self.options.known_hosts
        if path is None and self.options.home is not None:
            path = FleetHome(Path(self.options.home)).known_hosts
        if path is None:
            raise errors.KeyMaterialError(
                "no known_hosts configured for ssh (TransportOptions.known_hosts or .home); "
                "host keys are always checked")
        return KnownHosts(path)

    def _client_keys(self) -> list[paramiko.PKey]:
        keys: list[paramiko.PKey] = []
        key_path = self.options.ssh_key
        if key_path is None and self.options.home is not None:
            key_path = FleetHome(Path(self.options.home)).ssh_key
        if key_path is not None and Path(key_path).exists():
            keys.append(load_private_key(Path(key_path)))
        if os.environ.get("SSH_AUTH_SOCK"):
            with contextlib.suppress(paramiko.SSHException, OSError):
                keys.extend(paramiko.Agent().get_keys())
        return keys

    # -- connection ----------------------------------------------------------------------
    def _connect(self) -> paramiko.Transport:
        known = self._known_hosts()
        pinned = known.lookup(self.host, self.port)
        timeout = self.options.connect_timeout
        try:
            sock = socket.create_connection((self.host, self.port), timeout=timeout)
        except OSError as exc:
            raise errors.ConnectError(f"cannot reach {self.target}: {exc}", uri=self.uri,
                                      host=self.host, port=self.port) from exc
        # A peer that stops acknowledging (link down) kills the socket after io_timeout
        # instead of blocking a send for the kernel's ~15 minutes of retransmissions.
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                            int(self.io_timeout * 1000))
        t = paramiko.Transport(sock)
        opts = t.get_security_options()
        # AEAD first: one pass per packet instead of AES-CTR plus a separate HMAC
        opts.ciphers = tuple([c for c in _CIPHERS if c in opts.ciphers]
                             + [c for c in opts.ciphers if c not in _CIPHERS])
        if pinned:
            preferred = [k for k in pinned if k in opts.key_types]
            opts.key_types = tuple(preferred + [k for k in opts.key_types if k not in pinned])
        try:
            t.start_client(timeout=timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            t.close()
            raise errors.ConnectError(f"ssh handshake with {self.target} failed: {exc}",
                                      uri=self.uri) from exc
        try:
            self._check_host_key(known, t.get_remote_server_key(), pinned)
            self._authenticate(t)
        except BaseException:
            t.close()
            raise
        t.set_keepalive(max(1, int(self.io_timeout // 3)))
        return t

    def _check_host_key(self, known: KnownHosts, key: paramiko.PKey,
                        pinned: dict[str, paramiko.PKey]) -> None:
        fp = fingerprint(key)
        where = host_pattern(self.host, self.port)
        if not pinned:
            wanted = self.options.accept_host_key
            if wanted is not None and wanted == fp:
                known.pin(self.host, self.port, key)
                return
            if wanted is not None:
                raise errors.UnknownHostKeyError(
                    f"host {where} offers {key.get_name()} key {fp}, not the accepted {wanted}; "
                    "refusing", uri=self.uri, host=where, fingerprint=fp, accepted=wanted)
            raise errors.UnknownHostKeyError(
                f"unknown host {where}: its {key.get_name()} key fingerprint is {fp}. "
                f"Check it out of band, then accept it with `--accept-host-key {fp}`",
                uri=self.uri, host=where, fingerprint=fp, key_type=key.get_name())
        old = pinned.get(key.get_name())
        if old is not None and old.asbytes() == key.asbytes():
            return
        old_fp = fingerprint(old) if old is not None else ", ".join(
            f"{t} {fingerprint(k)}" for t, k in pinned.items())
        raise errors.ChangedHostKeyError(
            f"HOST KEY CHANGED for {where}: known {old_fp}, now offered {key.get_name()} {fp}. "
            "This may be an attack; if the board was re-imaged, remove the old key from "
            f"{known.path} and accept the new one explicitly",
            uri=self.uri, host=where, known_fingerprint=old_fp, offered_fingerprint=fp)

    def _authenticate(self, t: paramiko.Transport) -> None:
        keys = self._client_keys()
        if not keys:
            raise errors.AuthError(
                f"no ssh key for {self.target}: create the fleet key (fleet home keys/) or "
                "start an ssh agent", uri=self.uri)
        last: Exception | None = None
        for key in keys:
            try:
                t.auth_publickey(self.user, key)
            except paramiko.AuthenticationException as exc:
                last = exc
                continue
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise errors.ConnectionLostError(f"ssh auth with {self.target}: {exc}",
                                                 uri=self.uri) from exc
            if t.is_authenticated():
                return
        raise errors.AuthError(f"{self.target} refused the fleet's ssh key(s): {last}",
                               uri=self.uri) from last

    def _transport(self) -> paramiko.Transport:
        with self._lock:
            if self._t is None or not self._t.is_active():
                self._drop()
                self._t = self._connect()
            return self._t

    def _sftp(self) -> paramiko.SFTPClient:
        with self._lock:
            t = self._transport()
            if self._sftp_client is None:
                client = paramiko.SFTPClient.from_transport(t)
                if client is None:
                    raise errors.ConnectionLostError(f"no sftp subsystem on {self.target}",
                                                     uri=self.uri)
                client.get_channel().settimeout(self.io_timeout)
                self._sftp_client = client
            return self._sftp_client

    def _drop(self) -> None:
        """Forget the connection (after a failure the next call reconnects)."""
        with self._lock:
            if self._sftp_client is not None:
                with contextlib.suppress(Exception):
                    self._sftp_client.close()
            if self._t is not None:
                with contextlib.suppress(Exception):
                    self._t.close()
            self._sftp_client = None
            self._t = None

    @contextlib.contextmanager
    def _op(self, what: str) -> Iterator[None]:
        """Map errors; a retryable failure also drops the connection for a clean retry."""
        try:
            with self.mapped_errors(f"{what} on {self.target}"):
                yield
        except errors.TransportError as exc:
            if exc.retryable or isinstance(exc, errors.ConnectionLostError):
                self._drop()
            raise

    # -- the contract --------------------------------------------------------------------
    def run(self, argv: Sequence[str], *, timeout: float, stdin: bytes | None = None
            ) -> CommandResult:
        argv = tuple(str(a) for a in argv)
        start = time.monotonic()
        deadline = start + timeout
        with self._op(f"run {argv[0] if argv else ''}"):
            t = self._transport()
            chan = t.open_session(timeout=max(0.1, min(self.options.connect_timeout,
                                                       deadline - time.monotonic())))
            try:
                chan.exec_command(shlex.join(argv))
                out, err = self._pump(chan, stdin, deadline, argv, timeout)
                code = chan.recv_exit_status()
            finally:
                chan.close()
        return CommandResult(argv=argv, exit_code=code, stdout=out, stderr=err,
                             duration_s=time.monotonic() - start)

    def _pump(self, chan: paramiko.Channel, stdin: bytes | None, deadline: float,
              argv: tuple[str, ...], timeout: float) -> tuple[bytes, bytes]:
        """Feed stdin and drain stdout/stderr together (no pipe deadlock) until EOF."""
        # capped: a device that prints without end fails the call (OutputLimitError)
        out = CappedBuffer("stdout", uri=self.uri)
        err = CappedBuffer("stderr", uri=self.uri)
        pending = memoryview(stdin or b"")
        if not pending:
            chan.shutdown_write()
        t = chan.get_transport()
        for _ in range(10_000_000):  # bounded; the deadline ends it long before
            busy = False
            if pending and chan.send_ready():
                n = chan.send(bytes(pending[:32768]))
                pending = pending[n:]
                if not pending:
                    chan.shutdown_write()
                busy = True
            while chan.recv_ready():
                out.add(chan.recv(65536))
                busy = True
            while chan.recv_stderr_ready():
                err.add(chan.recv_stderr(65536))
                busy = True
            if chan.exit_status_ready() and (chan.eof_received or chan.closed):
                while chan.recv_ready():
                    out.add(chan.recv(65536))
                while chan.recv_stderr_ready():
                    err.add(chan.recv_stderr(65536))
                return bytes(out), bytes(err)
            if time.monotonic() > deadline:
                raise errors.TransportTimeout(
                    f"{shlex.join(argv)[:120]} did not finish within {timeout:g}s on "
                    f"{self.target}", uri=self.uri, argv=list(argv), timeout=timeout)
            if t is None or not t.is_active():
                raise errors.ConnectionLostError(f"connection to {self.target} dropped",
                                                 uri=self.uri)
            if not busy:
                select.select([chan], [], [], 0.01)
        raise errors.TransportTimeout(f"runaway exec loop on {self.target}", uri=self.uri)

    def _sh(self, script: str, *args: str, timeout: float | None = None) -> CommandResult:
        return self.run(["sh", "-c", script, "sh", *args],
                        timeout=timeout if timeout is not None else self.io_timeout)

    def push(self, local: Path, remote: str, *, resume: bool = True,
             progress: ProgressCallback | None = None) -> TransferResult:
        path = _shell_path(remote)
        with part_slot(self.options.home, self.uri, path) as part:
            return self._push(Path(local), remote, path, part, resume, progress)

    def _push(self, local: Path, remote: str, path: str, part: str, resume: bool,
              progress: ProgressCallback | None) -> TransferResult:
        start = time.monotonic()
        size = local.stat().st_size
        offset, hasher = self._prepare_push(local, path, part, size, resume)
        sent = 0
        try:
            with self._op(f"push {local.name}"):
                sftp = self._sftp()
                if progress:
                    progress(offset, size)
                try:
                    if offset < size:
                        with sftp.open(part, "r+b" if offset else "wxb") as f, \
                                open(local, "rb") as src:
                            f.MAX_REQUEST_SIZE = _SFTP_WRITE
                            f.set_pipelined(True)
                            f.seek(offset)
                            src.seek(offset)
                            while block := src.read(_CHUNK):
                                f.write(block)
                                hasher.update(block)
                                sent += len(block)
                                if progress:
                                    progress(offset + sent, size)
                except OSError as exc:
                    alive = self._t is not None and self._t.is_active()
                    if alive and not isinstance(exc, (TimeoutError, ConnectionError)):
                        self._maybe_disk_full(exc, path, part, size - offset)
                    raise
                digest = self._finish_push(path, part, hasher.hexdigest())
        except errors.TransportError as exc:
            # how far this attempt got; the next push resumes from what the device kept
            exc.details.setdefault("bytes_sent", sent)
            exc.details.setdefault("resumed_from", offset)
            raise
        return TransferResult(local=str(local), remote=remote, size=size, bytes_sent=sent,
                              resumed_from=offset, sha256=digest,
                              duration_s=time.monotonic() - start)

    def _prepare_push(self, local: Path, path: str, part: str, size: int,
                      resume: bool) -> tuple[int, Any]:
        """One round trip: make the parent, measure free space and the partial file."""
        parent = os.path.dirname(path) or "."
        # The partial file is never followed: a planted link (or anything that is not our
        # own regular file) is removed -- rm removes the link, not its target -- and a fresh
        # push creates the file O_EXCL (SFTP "x"), which fails on anything planted since.
        res = self._sh(
            '[ -L "$1" ] && exit 6; mkdir -p -m 700 -- "$1" || exit 3; [ -L "$1" ] && exit 6; '
            'df -Pk -- "$1" | tail -n 1; '
            'if [ -L "$2" ] || { [ -e "$2" ] && { [ ! -f "$2" ] || [ ! -O "$2" ]; }; }; then '
            'rm -f -- "$2"; fi; '
            'if [ "$3" = 1 ] && [ -f "$2" ] && [ ! -L "$2" ]; then echo "part $(wc -c < "$2") '
            '$(sha256sum < "$2" | cut -d" " -f1)"; else rm -f -- "$2"; fi',
            parent, part, "1" if resume else "0")
        if res.exit_code == 6:
            raise errors.RemoteFileError(
                f"{parent} on {self.target} is a symbolic link; refusing to push through it",
                uri=self.uri, path=parent)
        if res.exit_code == 3:
            raise errors.RemoteFileError(
                f"cannot create {parent} on {self.target}: {res.stderr.decode(errors='replace')}",
                uri=self.uri, path=parent)
        lines = res.stdout.decode(errors="replace").splitlines()
        offset, hasher = 0, hashlib.sha256()
        stale = False
        for line in lines:
            if line.startswith("part "):
                _, psize, phash = line.split()
                n = int(psize)
                stale = True
                if 0 < n <= size:
                    prefix = _prefix_sha256(local, n)
                    if prefix.hexdigest() == phash:
                        offset, hasher, stale = n, prefix, False
        if stale:  # a partial file that is not a prefix of ours: start over (O_EXCL below)
            self._sh('rm -f -- "$1"', part)
        avail_kb = None
        df = [ln for ln in lines if not ln.startswith("part ")]
        if df:
            fields = df[-1].split()
            if len(fields) >= 4 and fields[3].isdigit():
                avail_kb = int(fields[3])
        if avail_kb is not None and avail_kb * 1024 < size - offset:
            if offset == 0:
                self._sh('rm -f -- "$1"', part)
            raise errors.RemoteDiskFullError(
                f"{self.target}: {size - offset} bytes to push but only {avail_kb} KiB free "
                f"under {parent}", uri=self.uri, path=path, needed=size - offset,
                available=avail_kb * 1024)
        return offset, hasher

    def _maybe_disk_full(self, exc: OSError, path: str, part: str, needed: int) -> None:
        """SFTP reports ENOSPC as a generic failure: ask the device about free space."""
        if getattr(exc, "errno", None) == errno.ENOSPC or "space" in str(exc).lower():
            full = True
        else:
            try:
                res = self._sh('df -Pk -- "$1" | tail -n 1', os.path.dirname(path) or ".")
                fields = res.stdout.split()
                full = len(fields) >= 4 and fields[3].isdigit() and int(fields[3]) < 64
            except errors.TransportError:
                return
        if full:
            # a partial file that cannot complete only keeps the device's disk full
            with contextlib.suppress(errors.TransportError):
                self._sh('rm -f -- "$1"', part)
            raise errors.RemoteDiskFullError(
                f"{self.target}: disk full while writing {path}", uri=self.uri, path=path,
                needed=needed) from exc

    def _finish_push(self, path: str, part: str, digest: str) -> str:
        res = self._sh(
            '[ -L "$1" ] && exit 6; h=$(sha256sum < "$1" | cut -d" " -f1) || exit 4; '
            'echo "$h"; [ "$h" = "$2" ] || exit 5; if [ -L "$3" ]; then rm -f -- "$3"; fi; '
            '[ -d "$3" ] && exit 6; mv -f -- "$1" "$3"',
            part, digest, path, timeout=max(self.io_timeout, 60.0))
        if res.exit_code == 5:
            self._sh('rm -f -- "$1"', part)
            raise errors.RemoteFileError(
                f"{self.target}: {path} arrived with sha256 "
                f"{res.stdout.decode().strip()}, expected {digest}; partial file removed",
                uri=self.uri, path=path, expected=digest)
        if res.exit_code != 0:
            raise errors.RemoteFileError(
                f"{self.target}: cannot verify/rename {path}: "
                f"{res.stderr.decode(errors='replace').strip()}", uri=self.uri, path=path)
        return digest

    def pull(self, remote: str, local: Path) -> TransferResult:
        local = Path(local)
        start = time.monotonic()
        tmp = local.with_name(f".{local.name}.part")
        local.parent.mkdir(parents=True, exist_ok=True)
        with self._op(f"pull {remote}"):
            sftp = self._sftp()
            h = hashlib.sha256()
            n = 0
            with sftp.open(_shell_path(remote), "rb") as src, open(tmp, "wb") as dst:
                src.prefetch()
                while block := src.read(_CHUNK):
                    dst.write(block)
                    h.update(block)
                    n += len(block)
            os.replace(tmp, local)
        return TransferResult(local=str(local), remote=remote, size=n, bytes_sent=n,
                              resumed_from=0, sha256=h.hexdigest(),
                              duration_s=time.monotonic() - start)

    def stat(self, remote: str) -> RemoteStat | None:
        import stat as _stat
        with self._op(f"stat {remote}"):
            try:
                st = self._sftp().stat(_shell_path(remote))
            except FileNotFoundError:
                return None
        mode = st.st_mode or 0
        return RemoteStat(path=remote, size=st.st_size or 0, mode=mode,
                          mtime=float(st.st_mtime or 0), is_dir=_stat.S_ISDIR(mode))

    def close(self) -> None:
        self._drop()
