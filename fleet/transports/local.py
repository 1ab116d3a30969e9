"""``local://NAME?root=DIR``: a device that is this machine.

The agent runs as a subprocess with its own device root, so several local devices
coexist. Paths are this machine's paths. Pushes go to their own partial file
(``<remote>.part``, or ``<remote>.<n>.part`` while another push of it runs:
:mod:`fleet.transports._parts`) and resume from it, then are renamed into place: the same
contract the remote transports keep. A push that hits ENOSPC removes its partial file and
raises :class:`~fleet.core.errors.RemoteDiskFullError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat as stat_mod
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, ClassVar

from fleet.core import errors
from fleet.core.fsutil import DISK_FULL_ERRNOS
from fleet.transports._bounded import run_capped
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

__all__ = ["LocalTransport"]

_BLOCK = 1 << 20


class LocalTransport(Transport):
    scheme: ClassVar[str] = "local"
    default_agent_cmd: ClassVar[tuple[str, ...]] = (sys.executable, "-m", "fleet_agent")

    def __init__(self, uri: str, options: TransportOptions | None = None) -> None:
        super().__init__(uri, options)
        parsed = parse_uri(uri)
        self.name = parsed.host
        self.root = Path(parsed.query["root"]).expanduser()

    def agent_root(self) -> str:
        return str(self.root)

    def run(self, argv: Sequence[str], *, timeout: float, stdin: bytes | None = None
            ) -> CommandResult:
        start = time.monotonic()
        env = dict(os.environ, FLEET_AGENT_ROOT=str(self.root))
        with self.mapped_errors(f"run {argv[0] if argv else ''}"):
            try:
                code, out, err = run_capped(argv, stdin=stdin, timeout=timeout, env=env,
                                            uri=self.uri)
            except subprocess.TimeoutExpired as exc:
                raise errors.TransportTimeout(
                    f"command timed out after {timeout:.0f}s on {self.name}: {argv[:3]}",
                    uri=self.uri) from exc
        return CommandResult(tuple(argv), code, out, err, time.monotonic() - start)

    def push(self, local: Path, remote: str, *, resume: bool = True,
             progress: ProgressCallback | None = None) -> TransferResult:
        with part_slot(self.options.home, self.uri, remote) as part_path:
            return self._push(local, remote, Path(part_path), resume, progress)

    def _push(self, local: Path, remote: str, part: Path, resume: bool,
              progress: ProgressCallback | None) -> TransferResult:
        start = time.monotonic()
        dest = Path(remote)
        size = local.stat().st_size
        with self.mapped_errors(f"push {local} -> {remote}"), self._disk_full(part, size):
            _private_parent(dest.parent, self.uri)
            offset = _own_part_size(part) if resume else 0
            if not resume:
                _drop_foreign(part)
            h = hashlib.sha256()
            with open(local, "rb") as src:
                # the partial file must be a prefix of ours; hash it as we go
                if offset:
                    if offset > size or not _same_prefix(src, part, offset, h):
                        offset = 0
                        h = hashlib.sha256()
                    src.seek(offset)
                sent = 0
                with _open_part(part, append=bool(offset), uri=self.uri) as dst:
                    while block := src.read(_BLOCK):
                        dst.write(block)
                        h.update(block)
                        sent += len(block)
                        if progress:
                            progress(offset + sent, size)
                    dst.flush()
                    os.fsync(dst.fileno())
            os.replace(part, dest)
        return TransferResult(str(local), remote, size, sent, offset, h.hexdigest(),
                              time.monotonic() - start)

    @contextlib.contextmanager
    def _disk_full(self, part: Path, size: int) -> Iterator[None]:
        """ENOSPC/EDQUOT: the partial file cannot complete, so it only keeps the disk full."""
        try:
            yield
        except OSError as exc:
            if exc.errno not in DISK_FULL_ERRNOS:
                raise
            part.unlink(missing_ok=True)
            raise errors.RemoteDiskFullError(
                f"{self.name}: no space left for {size} bytes under {part.parent}",
                uri=self.uri, path=str(part), needed=size) from exc

    def pull(self, remote: str, local: Path) -> TransferResult:
        start = time.monotonic()
        with self.mapped_errors(f"pull {remote}"):
            shutil.copyfile(remote, local)
        size = local.stat().st_size
        from fleet.core.fsutil import sha256_file
        return TransferResult(str(local), remote, size, size, 0, sha256_file(local),
                              time.monotonic() - start)

    def stat(self, remote: str) -> RemoteStat | None:
        try:
            st = os.stat(remote)
        except FileNotFoundError:
            return None
        return RemoteStat(remote, st.st_size, st.st_mode, st.st_mtime,
                          stat_mod.S_ISDIR(st.st_mode))

    def close(self) -> None:
        pass


def _same_prefix(src: object, part: Path, offset: int, h: hashlib._Hash) -> bool:
    """Does ``part`` hold the first ``offset`` bytes of ``src``? Feeds ``h`` as it reads."""
    import io
    assert isinstance(src, io.BufferedReader)
    with os.fdopen(os.open(part, os.O_RDONLY | os.O_NOFOLLOW), "rb") as p:
        remaining = offset
        while remaining:
            n = min(_BLOCK, remaining)
            a, b = src.read(n), p.read(n)
            if a != b:
                return False
            h.update(a)
            remaining -= n
    return True


# -- the partial file: never through a planted link ----------------------------------------
def _private_parent(folder: Path, uri: str) -> None:
    """Create the push's folder 0700 (whatever the umask) and refuse one that is a link."""
    if not os.path.lexists(folder):
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(folder, 0o700)
    st = os.lstat(folder)
    if stat_mod.S_ISLNK(st.st_mode) or not stat_mod.S_ISDIR(st.st_mode):
        raise errors.RemoteFileError(f"{folder} is a symbolic link or not a folder; refusing "
                                     "to push through it", uri=uri, path=str(folder))


def _is_own_file(st: os.stat_result) -> bool:
    return stat_mod.S_ISREG(st.st_mode) and st.st_uid == os.getuid()


def _drop_foreign(part: Path) -> None:
    """Remove whatever sits at ``part`` unless it is our own regular file; a planted link
    is removed itself (``unlink`` never follows), its target is never touched."""
    try:
        st = os.lstat(part)
    except FileNotFoundError:
        return
    if not _is_own_file(st) or stat_mod.S_ISLNK(st.st_mode):
        part.unlink()


def _own_part_size(part: Path) -> int:
    """Bytes of a partial file worth resuming: our own regular file, else 0 (and gone)."""
    _drop_foreign(part)
    try:
        return os.lstat(part).st_size
    except FileNotFoundError:
        return 0


@contextlib.contextmanager
def _open_part(part: Path, *, append: bool, uri: str) -> Iterator[BinaryIO]:
    """The partial file, opened without following a link: created ``O_EXCL`` (a stale one
    is removed first) or appended to after checking it is still our regular file."""
    if append:
        fd = os.open(part, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
        if not _is_own_file(os.fstat(fd)):
            os.close(fd)
            raise errors.RemoteFileError(f"{part} is not this controller's partial file",
                                         uri=uri, path=str(part))
    else:
        part.unlink(missing_ok=True)  # a stale partial (or a link: the link goes)
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        yield f
