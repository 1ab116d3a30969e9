"""``local://NAME?root=DIR``: a device that is this machine.

The agent runs as a subprocess with its own device root, so several local devices
coexist. Paths are this machine's paths. Pushes go to ``<remote>.part`` and resume from
it, then are renamed into place: the same contract the remote transports keep.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from fleet.core import errors
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
                proc = subprocess.run(list(argv), input=stdin, capture_output=True,
                                      timeout=timeout, env=env, check=False)
            except subprocess.TimeoutExpired as exc:
                raise errors.TransportTimeout(
                    f"command timed out after {timeout:.0f}s on {self.name}: {argv[:3]}",
                    uri=self.uri) from exc
        return CommandResult(tuple(argv), proc.returncode, proc.stdout, proc.stderr,
                             time.monotonic() - start)

    def push(self, local: Path, remote: str, *, resume: bool = True,
             progress: ProgressCallback | None = None) -> TransferResult:
        start = time.monotonic()
        dest = Path(remote)
        part = dest.with_name(dest.name + ".part")
        size = local.stat().st_size
        with self.mapped_errors(f"push {local} -> {remote}"):
            dest.parent.mkdir(parents=True, exist_ok=True)
            offset = part.stat().st_size if resume and part.exists() else 0
            h = hashlib.sha256()
            with open(local, "rb") as src:
                # the partial file must be a prefix of ours; hash it as we go
                if offset:
                    if offset > size or not _same_prefix(src, part, offset, h):
                        offset = 0
                        h = hashlib.sha256()
                    src.seek(offset)
                mode = "ab" if offset else "wb"
                sent = 0
                with open(part, mode) as dst:
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
        import stat as stat_mod
        return RemoteStat(remote, st.st_size, st.st_mode, st.st_mtime,
                          stat_mod.S_ISDIR(st.st_mode))

    def close(self) -> None:
        pass


def _same_prefix(src: object, part: Path, offset: int, h: hashlib._Hash) -> bool:
    """Does ``part`` hold the first ``offset`` bytes of ``src``? Feeds ``h`` as it reads."""
    import io
    assert isinstance(src, io.BufferedReader)
    with open(part, "rb") as p:
        remaining = offset
        while remaining:
            n = min(_BLOCK, remaining)
            a, b = src.read(n), p.read(n)
            if a != b:
                return False
            h.update(a)
            remaining -= n
    return True
